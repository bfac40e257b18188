"""Deployments against a real `prefect server start` on loopback: `distillery serve` registers
distill/manual, distill/recurring (cron) and train/local with their parameter schemas, and a run
triggered through the API completes and registers a student version in MLflow."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-server"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(f"http://127.0.0.1:{port}/api/health", 90)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_registers_deployments_and_a_triggered_run_registers_a_student(tiny_demo, tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = tmp_path / "spec.yaml"
    shutil.copy(tiny_demo["spec_path"], spec)
    inputs = tiny_demo["world"].split_dir("train")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_uri}
    serve = subprocess.Popen([sys.executable, "-m", "distillery.cli", "serve", str(spec), "--inputs", str(inputs),
                              "--workdir", str(tmp_path / "runs"), "--cron", "0 4 * * *"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            deps = _wait_for_deployments(get_client, 3, 120)
            names = {d.name: d for d in deps}
            assert set(names) == {"manual", "recurring", "local"}
            schema = names["manual"].parameter_openapi_schema
            assert {"spec", "inputs", "traces"} <= set(schema["properties"])
            recurring = names["recurring"]
            assert [s.schedule.cron for s in recurring.schedules] == ["0 4 * * *"]

            run = run_deployment("distill/manual", timeout=900, poll_interval=2)
            assert run.state.is_completed(), run.state
        import mlflow

        client = mlflow.MlflowClient(mlflow_uri)
        versions = client.search_model_versions("name = 'shapes-tiny'")
        assert len(versions) == 1
        assert versions[0].tags["prefect_flow_run_id"] == str(run.id)
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()


def _wait_for_deployments(get_client, n: int, timeout: float):
    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            deps = client.read_deployments()
            if len(deps) >= n:
                return deps
            time.sleep(1)
    raise TimeoutError(f"fewer than {n} deployments after {timeout} s")
