"""`mlflow models serve -m models:/NAME@champion --env-manager local` answers /invocations.

The champion is a real tiny student logged, registered and promoted in a temp SQLite store
(``registry_env``); the MLflow scoring server runs as a subprocess on a free loopback port and
is stopped (its whole process group) after the module.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from registry_support import CHAMPION_NAME, QUESTION, image_bytes, registry_env  # noqa: F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(registry_env, tmp_path_factory):
    """The scoring server on 127.0.0.1:<free port>; killed (its whole process group) afterwards."""
    uri = registry_env["uri"]
    tmp_path = tmp_path_factory.mktemp("server")
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)  # `mlflow models serve` execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{CHAMPION_NAME}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc, log)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


def _wait_ready(base: str, proc: subprocess.Popen, log, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    log.seek(0)
    pytest.fail(f"mlflow models serve not ready after {timeout} s:\n{log.read()[-3000:]}")


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _invoke(base: str, image: str) -> tuple[int, dict]:
    return _post(f"{base}/invocations", {"dataframe_records": [{"image": image, "question": QUESTION}]})


def test_served_champion_answers_invocations(server, registry_env):
    direct = registry_env["direct"]
    status, body = _invoke(server, base64.b64encode(image_bytes()).decode())
    assert status == 200, body
    row = body["predictions"][0]
    assert row["answer"] == direct["answer"]
    assert row["boxes"] == [[float(c) for c in b] for b in direct["detector"]["boxes"]]
    assert json.loads(row["masks"]) == direct["detector"]["masks"]
    assert row["documents"] == [str(i) for i in direct["retriever"]["ids"]]
    status, body = _invoke(server, "not base64!")
    assert status >= 400 and "row 0: 'image' is neither valid base64" in json.dumps(body)


def test_served_model_refuses_server_side_paths(server, tmp_path):
    """A client must not make the server open its files: paths are refused over HTTP."""
    on_server = tmp_path / "server-side.png"
    on_server.write_bytes(image_bytes())
    status, body = _invoke(server, str(on_server))
    assert status >= 400 and "a served model takes no paths" in json.dumps(body)


def test_served_answers_equal_distillery_predict_on_the_pulled_folder(server, registry_env, tmp_path):
    from distillery.registry.pull import predict_dir, pull

    folder = pull(f"{CHAMPION_NAME}@champion", tmp_path / "pulled", tracking_uri=registry_env["uri"])
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes())
    local = predict_dir(folder, image, QUESTION)  # what `distillery predict` prints
    status, body = _invoke(server, base64.b64encode(image_bytes()).decode())
    assert status == 200, body
    row = body["predictions"][0]
    assert row["answer"] == local["answer"]
    assert row["labels"] == list(local["detector"]["labels"]) and row["labels"]
    assert row["documents"][0] == str(local["retriever"]["ids"][0])  # the top document


@pytest.mark.parametrize("case, payload, names", [
    ("not an image", {"dataframe_records": [{"image": base64.b64encode(b"%PDF-1.4 not a picture").decode(),
                                             "question": QUESTION}]}, "image"),
    ("missing column", {"dataframe_records": [{"image": base64.b64encode(b"x").decode()}]}, "question"),
    ("50 MB body", {"dataframe_records": [{"image": base64.b64encode(b"\0" * (37 << 20)).decode(),
                                           "question": QUESTION}]}, "image"),
])
def test_a_malformed_request_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, case, payload,
                                                                                         names):
    status, body = _post(f"{server}/invocations", payload)
    text = json.dumps(body)
    assert 400 <= status < 500, f"{case}: {status} {text[:500]}"
    assert names in text and "Traceback" not in text, f"{case}: {text[:500]}"
    ok, answer = _invoke(server, base64.b64encode(image_bytes()).decode())
    assert ok == 200 and answer["predictions"][0]["answer"], case
