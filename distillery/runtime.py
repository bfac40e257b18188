"""Process-wide settings that keep the stack quiet and offline-safe.

`configure()` is called once by the CLI, the flows and the tests before heavy libraries are
imported. It only sets defaults (``os.environ.setdefault``): a user who *does* have the Hugging
Face hub, or wants telemetry, overrides them in the environment. See docs in README "Offline".
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import platformdirs

_DONE = False


def data_dir() -> Path:
    """Per-user data folder (demo workdir, Ultralytics settings, Prefect home by default)."""
    return Path(os.environ.get("DISTILLERY_HOME", platformdirs.user_data_dir("distillery")))


# Services of Prefect's temporary (ephemeral) server that watch workers, leases, pauses and
# automations: nothing of this process needs them, and their loops share its cores with the
# teachers (record flow / plain loop over 3 benchmark runs each: 0.96-1.06 with them off,
# 1.06-1.13 on). The scheduler (deployments' cron under `distillery serve`) and the recorders the
# UI reads stay on.
EPHEMERAL_SERVICES_OFF = ("LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CLEANUP_RECONCILER",
                          "CANCELLATION_CLEANUP", "TRIGGERS")


def configure(offline: bool | None = None) -> None:
    """Set telemetry-off defaults and make Ultralytics safe to use with no network.

    offline: when True also set ``HF_HUB_OFFLINE``/``YOLO_OFFLINE`` so a missing model fails fast
    instead of trying the network. Default: ``DISTILLERY_OFFLINE`` env var (tests set it).
    """
    global _DONE
    if offline is None:
        offline = os.environ.get("DISTILLERY_OFFLINE", "0") == "1"
    env = os.environ
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "true")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's 20 s for its temporary server to start is too short on a busy 2-core machine
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("YOLO_AUTOINSTALL", "false")  # Ultralytics must never pip-install at run time
    # Importing Ultralytics before torch would set OMP_NUM_THREADS=1 for the whole process.
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                          else os.cpu_count() or 1))
    if not env.get("PREFECT_API_URL"):  # Prefect's temporary server, in this process's lifetime
        for service in EPHEMERAL_SERVICES_OFF:
            env.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")
    if offline:
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("YOLO_OFFLINE", "1")
    yolo_dir = Path(env.setdefault("YOLO_CONFIG_DIR", str(data_dir() / "ultralytics")))
    if not _DONE:
        _prepare_ultralytics(yolo_dir)
    _DONE = True


@contextmanager
def torch_threads(n: int | None = None):
    """torch's intra-op thread count set to ``n`` inside (None: left as it is), restored afterwards
    (~0.4 us a switch). Around Ultralytics: its ``select_device`` (every YOLO predict/train) sets
    it to ``cpu_count - 1`` (1 on a 2-core machine), which would halve the speed of everything that
    runs later in the process (the student's training). ``n = 1`` for tensor glue around another
    runtime: waking a second thread for an op on a few hundred numbers costs more than the op (5x
    slower on 2 cores, and 10x when the other core is busy)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(choice=None, index: int = 0):
    """The torch device a setting names: ``None`` or ``auto``: CUDA (device ``index``, the local
    rank under torchrun) when torch sees one, else the CPU; ``cuda`` without a GPU is a clear
    error; anything else as torch reads it (``cpu``, ``cuda:1``, a ``torch.device``)."""
    import torch

    if choice is None or choice == "auto":
        return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
        return torch.device("cuda", index)
    return torch.device(choice)


@contextmanager
def local_prefect():
    """Flows run inside on a Prefect API: the configured one (``PREFECT_API_URL``), else the local
    server of this process, started on first use and kept for later flows, which dies with the
    process, even by ``kill -9`` (``distillery.prefect_server``; Prefect's own temporary server
    outlived a killed process).
    On the local server flows send no heartbeats: no worker watches them there, and each flow
    would wait ~1 s for the heartbeat thread at its end (a rerun that records nothing would take
    1.1 s instead of 0.15 s)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from distillery import prefect_server

    server = prefect_server.shared()
    with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        try:
            yield
        finally:
            prefect_server.drain()  # logs and events still queued reach the server (it stops at exit)


def _prepare_ultralytics(yolo_dir: Path) -> None:
    """Pre-place the fonts Ultralytics would otherwise download on every train/val run."""
    fonts = yolo_dir / "Ultralytics"
    fonts.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (fonts / name).exists() and src.exists():
                shutil.copyfile(src, fonts / name)
    except ImportError:  # matplotlib is a dependency; keep going if a slim install lacks it
        pass


def quiet_ultralytics() -> None:
    """Stop Ultralytics from logging its own training runs into ./mlruns (call after import)."""
    from ultralytics import settings

    if settings.get("mlflow", False) or settings.get("sync", False):
        settings.update({"mlflow": False, "sync": False, "tensorboard": False, "wandb": False})
