"""Deployments against a real `prefect server start` on loopback: `distillery serve` registers
distill/manual, distill/recurring (cron) and train/local with their parameter schemas, and a run
triggered through the API completes and registers a student version in MLflow. Its spec sets
``training.deployment: train/local``, so the train step runs as a deployment of its own (as it
would on the gpu pool) and the distill run reads its result back from the shared out_dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml


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
    data = yaml.safe_load(Path(tiny_demo["spec_path"]).read_text())
    data.setdefault("training", {})["deployment"] = "train/local"  # the train step as its own deployment
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    inputs = tiny_demo["world"].split_dir("train")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_uri,
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}  # pick up triggered runs (distill, then train) quickly
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
            train_run = _train_run(get_client, names["local"].id)
        import mlflow

        client = mlflow.MlflowClient(mlflow_uri)
        versions = client.search_model_versions("name = 'shapes-tiny'")
        assert len(versions) == 1
        assert versions[0].tags["prefect_flow_run_id"] == str(run.id)
        assert train_run.state.is_completed() and train_run.parameters["mlflow_run_id"] == versions[0].run_id
        assert "train_loss/total" in client.get_run(versions[0].run_id).data.metrics  # logged by the train run
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()


def _train_run(get_client, deployment_id):
    """The one flow run of the train/local deployment."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert len(runs) == 1, runs
    return runs[0]


def _wait_for_deployments(get_client, n: int, timeout: float):
    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            deps = client.read_deployments()
            if len(deps) >= n:
                return deps
            time.sleep(1)
    raise TimeoutError(f"fewer than {n} deployments after {timeout} s")
