"""Prefect's local API server, as a child that dies with the process that started it.

With no Prefect API configured, Prefect starts a temporary API server (uvicorn on 127.0.0.1) for
the process that runs a flow and stops it at exit; a ``kill -9`` of that process skips the exit,
and the server (~200 MB) lived on, one per kill. Started from here instead, the same server is
the child of a process whose death the kernel reports to it as SIGKILL (Linux's parent-death
signal, ``PR_SET_PDEATHSIG``), so none outlives its parent, however the parent ends. (Elsewhere
than Linux it is stopped at exit, as Prefect's own.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import get_current_settings

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with(parent: int):
    """A ``preexec_fn``: in the child, ask for SIGKILL when the parent dies, and die now if the
    parent is already gone (it may die between the fork and the ``prctl``)."""

    def arm() -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or os.getppid() != parent:
            os._exit(1)

    return arm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer(SubprocessASGIServer):
    """Prefect's own temporary server (its health wait, port and stop logic; the command and
    environment of ``SubprocessASGIServer._run_uvicorn_command`` in Prefect 3.8), started with
    ``die_with`` on Linux."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        arm = die_with(os.getpid()) if sys.platform.startswith("linux") else None
        return subprocess.Popen(command, env=env, preexec_fn=arm)


def drain(timeout_s: float = 5.0) -> None:
    """Send the logs and events Prefect still holds to the server (as Prefect's test harness
    does before it stops its server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


_shared: LocalServer | None = None


def shared() -> LocalServer:
    """This process's local server, started on first use on a free port of 127.0.0.1 and kept for
    the flows that follow (as Prefect keeps its temporary one); stopped at exit, and by the
    kernel with this process however it ends."""
    global _shared
    if _shared is None or not _shared.running:
        _shared = LocalServer(free_port())
        _shared.start()  # (SubprocessASGIServer.start registers its stop at exit)
    return _shared
