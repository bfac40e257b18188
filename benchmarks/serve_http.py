"""The served student over HTTP: requests per second and p50/p99 latency of `mlflow models serve`
on the demo's pulled champion, at concurrency 1 and 8, beside the same pyfunc model called in
process, so the HTTP overhead is a ratio.

    python -m benchmarks.serve_http [--preset tiny|full] [--workdir DIR] [--requests 200]

The server is started on 127.0.0.1 (a free port) and always stopped; the load loop sends a fixed
number of requests (the demo's test images, base64 PNG/JPEG, one per request) and stops by itself,
with an overall deadline. Both sides answer the same payloads.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import get_student, parser, test_inputs, workdir_of

DEADLINE_S = 600  # the whole load loop of one setting stops here, finished or not


def registered(student: Path) -> tuple[str, str]:
    """(``models:/NAME@champion``, its tracking URI) from the pulled folder's ``registry.json``."""
    for folder in (student, student.parent):
        if (folder / "registry.json").is_file():
            reg = json.loads((folder / "registry.json").read_text())
            return f"models:/{reg['name']}@champion", reg["tracking_uri"]
    raise SystemExit(f"{student}: not a pulled model (no registry.json beside it); run `make demo` first, or "
                     "pass --student with a folder `distillery pull` wrote")


def payloads(world, n: int) -> list[dict]:
    images, questions = test_inputs(world, n)
    return [{"dataframe_records": [{"image": base64.b64encode(Path(i).read_bytes()).decode(), "question": q}]}
            for i, q in zip(images, questions)]


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * at(0.99)}


def in_process(model_uri: str, bodies: list[dict], n: int) -> dict:
    """The same pyfunc model, loaded here, one request at a time."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    frames = [pd.DataFrame(b["dataframe_records"]) for b in bodies]
    model.predict(frames[0])  # warm-up
    lat, t0 = [], time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        model.predict(frames[i % len(frames)])
        lat.append(time.perf_counter() - t)
    return {"rps": n / (time.perf_counter() - t0), **percentiles(lat), "requests": n}


def start_server(model_uri: str, tracking_uri: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    from distillery.prefect_server import free_port

    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking_uri}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow models serve exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2):
                return proc, base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    stop_server(proc)
    raise SystemExit(f"mlflow models serve not ready after 120 s: {log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def post(url: str, body: bytes) -> float:
    t = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        json.loads(r.read())
    return time.perf_counter() - t


def load(base: str, bodies: list[dict], n: int, concurrency: int) -> dict:
    """``n`` requests with ``concurrency`` in flight, cycling through ``bodies``; stops by itself."""
    url, raw = f"{base}/invocations", [json.dumps(b).encode() for b in bodies]
    post(url, raw[0])  # warm-up (the server loads the model lazily on some versions)
    deadline = time.monotonic() + DEADLINE_S
    lat: list[float] = []

    def one(i: int) -> None:
        if time.monotonic() < deadline:
            lat.append(post(url, raw[i % len(raw)]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"rps": len(lat) / wall, **percentiles(lat), "requests": len(lat), "concurrency": concurrency}


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--requests", type=int, default=200, help="requests per setting")
    args = ap.parse_args(argv)
    from distillery import runtime

    runtime.configure()
    from distillery.demo.fidelity import demo_setup

    workdir = workdir_of(args)
    model_uri, tracking_uri = registered(get_student(args, workdir))
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    world, _ = demo_setup(workdir, args.preset)
    bodies = payloads(world, 32)
    local = in_process(model_uri, bodies, args.requests)
    proc, base = start_server(model_uri, tracking_uri, workdir / "serve_http.log")
    try:
        http = {c: load(base, bodies, args.requests, c) for c in (1, 8)}
    finally:
        stop_server(proc)
    out = {"in_process": local, "http_c1": http[1], "http_c8": http[8], "model": model_uri,
           "http_over_in_process_p50": http[1]["p50_ms"] / local["p50_ms"],
           "c8_over_c1_rps": http[8]["rps"] / http[1]["rps"]}
    print(f"served student {model_uri} ({args.requests} requests a setting, demo test images)")
    print(f"{'setting':<22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, r in (("in process (pyfunc)", local), ("HTTP, concurrency 1", http[1]), ("HTTP, concurrency 8", http[8])):
        print(f"{name:<22}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}")
    print(f"HTTP overhead at concurrency 1: p50 {out['http_over_in_process_p50']:.2f}x the in-process call; "
          f"concurrency 8 gives {out['c8_over_c1_rps']:.2f}x the requests/s of concurrency 1")
    return out


if __name__ == "__main__":
    main()
