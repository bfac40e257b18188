"""Shared test set-up: offline, telemetry off, one Prefect harness per session.

Environment variables are set before any heavy library is imported, so nothing in the suite
can reach the Hugging Face hub or Ultralytics' asset servers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="distillery-tests-"))
os.environ["DISTILLERY_OFFLINE"] = "1"
os.environ.setdefault("DISTILLERY_HOME", str(_HOME / "home"))
os.environ.setdefault("PREFECT_HOME", str(_HOME / "prefect"))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_HOME / 'mlflow.db'}")

from distillery import runtime  # noqa: E402

runtime.configure(offline=True)

# Prefect binds its console log handler to the sys.stderr of the moment it is first imported. Import
# it now, so that the first import never happens inside a CliRunner (whose stream is closed after
# the command, which would break every later flow's logging).
import prefect  # noqa: E402,F401
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's ephemeral local server, started once for the whole session (~10 s)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        try:
            ctx = temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
        except Exception:  # setting absent in this Prefect version: keep the default
            ctx = None
        if ctx is None:
            yield
        else:
            with ctx:
                yield


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The demo's tiny world and teachers (built once per session) and a spec over them.

    Returns a dict: world, teachers (TeacherArtifacts), spec_path, workdir."""
    from distillery.demo.pipeline import write_spec
    from distillery.demo.teachers import ensure_teachers
    from distillery.demo.world import WorldConfig, build_world

    workdir = tmp_path_factory.mktemp("tiny-demo")
    world = build_world(WorldConfig.preset("tiny"), workdir / "world")
    teachers = ensure_teachers(world, "tiny", workdir / "teachers")
    spec_path = write_spec(workdir / "spec.yaml", "shapes-tiny", teachers.yolo_weights, world.kb_path,
                           teachers.llm_dir, "tiny")
    return {"world": world, "teachers": teachers, "spec_path": spec_path, "workdir": workdir}


def pytest_collection_modifyitems(session, config, items):
    """The browser tests (tests/browser/) run last: Playwright's sync API keeps an event loop
    running in the main thread while its session-wide browser lives, and Prefect's sync-compatible
    calls (``run_deployment``, ...) would return coroutines in any test after it."""
    items.sort(key=lambda item: "browser" in item.path.parent.name)  # stable: the rest keep their order


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tiny models of the tests gain nothing from a second thread, and on a busy shared CPU the
    idle thread's spin-waiting makes every training step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
