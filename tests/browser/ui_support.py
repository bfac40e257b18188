"""Helpers of the browser tests (their fixtures are in ``conftest.py`` beside this file): the
system Chromium, screenshots, and servers run in their own process group on 127.0.0.1.

A server starts in its own process group, with the kernel's parent-death signal armed on the
group leader, and the whole group is stopped when the tests that use it are done, also when one
fails. Screenshots go to each test's tmp dir; ``save_shot(..., keep=True)`` also puts the page
in ``docs/img/`` for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from distillery.prefect_server import die_with, free_port  # noqa: F401  (free_port: for the fixtures)

REPO = Path(__file__).resolve().parents[2]
DOCS_IMG = REPO / "docs" / "img"
VIEWPORT = {"width": 1400, "height": 1000}
BIN = Path(sys.executable).parent  # the venv's console scripts (prefect, mlflow, distillery)


def chromium_path() -> str | None:
    """The system Chromium: ``DISTILLERY_CHROMIUM``, else ``chromium`` (Debian's) on PATH."""
    explicit = os.environ.get("DISTILLERY_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def save_shot(page, tmp_path: Path, name: str, keep: bool = False, full_page: bool = True) -> Path:
    """Screenshot of the page (the whole page, or the window when not ``full_page``) into the
    test's tmp dir, and into docs/img/ when ``keep``."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    if keep:
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        tmp = DOCS_IMG / f".{name}.png.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, DOCS_IMG / f"{name}.png")  # atomic: the README never shows half an image
    return path


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Call ``check`` until it returns something truthy (returned); fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{what}: not after {timeout:.0f} s")


def http_json(url: str, body: Any = None) -> Any:
    """GET ``url`` (or POST ``body`` as JSON); the decoded answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait until ``url`` answers 200; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path, ready_url: str | None = None,
               timeout: float = 90, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group (output to ``log``), wait for ``ready_url``, stop the group."""
    out = open(log, "wb")
    arm = die_with(os.getpid()) if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=arm)
    try:
        if ready_url:
            wait_http(ready_url, proc, log, timeout)
        yield proc
    finally:
        stop_group(proc)
        out.close()


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the whole group (Prefect's runner ignores SIGTERM);
    then SIGKILL to what the leader left behind (uvicorn workers, MLflow's job consumer)."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def quiet_env(**extra: str) -> dict[str, str]:
    """The test process's environment with telemetry off and no Prefect API, plus ``extra``."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_API_URL", None)
    return {**env, **extra}
