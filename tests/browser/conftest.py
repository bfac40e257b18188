"""Fixtures of the browser tests: the system Chromium driven by Playwright, a Prefect server with
its UI and an MLflow tracking server, each on 127.0.0.1 at a free port, one of each per session.

The browser is Debian's ``chromium`` (``tests/browser/install-chromium.sh`` installs it; ``make
test`` runs that script), driven by Playwright for Python with ``executable_path`` set to it:
Playwright's own browser download cannot work offline. Where the browser cannot be had (no
``chromium`` on PATH nor ``DISTILLERY_CHROMIUM``, no ``playwright`` module, or a browser that
does not start), every test here skips with the reason, which pytest's ``-ra`` prints.
"""

from __future__ import annotations

import pytest
from ui_support import BIN, VIEWPORT, background, chromium_path, free_port, quiet_env


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (Playwright driving the system browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests: the playwright module is not installed (pip install -e '.[dev]')")
    exe = chromium_path()
    if exe is None:
        pytest.skip("browser tests: no Chromium (none on PATH, or DISTILLERY_CHROMIUM names no file); "
                    "tests/browser/install-chromium.sh installs Debian's as root (apt-get install chromium)")
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)  # the UIs answer slowly while a run takes the machine's 2 cores
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        except Exception as e:  # a browser that cannot start here (missing libraries, ...)
            pytest.skip(f"browser tests: {exe} does not start: {str(e).splitlines()[0]}")
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh page in its own context (no cookies or saved UI choices carry over)."""
    context = browser.new_context(viewport=VIEWPORT, locale="en-US", timezone_id="UTC")  # cron shown in UTC
    context.set_default_timeout(30_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, browser):
    """``mlflow server`` (SQLite store, artifacts served through it) on 127.0.0.1: its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with background(cmd, quiet_env(), root / "server.log", f"{url}/health", timeout=120, cwd=root):
        yield url


@pytest.fixture(scope="session")
def prefect_ui_server(tmp_path_factory, browser):
    """``prefect server start`` with its UI on 127.0.0.1: its base URL (the API under /api).

    A server of its own: the session's ``prefect_harness`` is Prefect's ephemeral server, which
    serves no UI. Its scheduler runs every 5 s, so a paused deployment is seen staying unscheduled."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = quiet_env(PREFECT_HOME=str(root), PREFECT_UI_ENABLED="true", PREFECT_UI_API_URL=f"{url}/api",
                    PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(cmd, env, root / "server.log", f"{url}/api/health", timeout=120, cwd=root):
        yield url
