"""Recording on Dask (prefect-dask, distributed): a real LocalCluster of worker processes on the
tiny world, a worker killed mid-run, every record exactly once, no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

from distillery.flows.spec import Spec, load_spec
from distillery.teachers.record import RecordConfig
from distillery.teachers.store import TraceStore
from test_record_flow import _inputs

pytest.importorskip("prefect_dask")
distributed = pytest.importorskip("distributed")


def _spawned_since(before: set[int]) -> list[psutil.Process]:
    """This test process's descendants that were not there before (alive ones only), but for
    multiprocessing's resource tracker: one per Python process, started with its first child
    process and ended by the kernel with it (it exits when its pipe from the parent closes)."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "multiprocessing.resource_tracker" not in " ".join(p.cmdline())]


def _kill_a_busy_worker(client, store: Path, killed: dict, stop: threading.Event) -> None:
    """Once a shard is committed, SIGKILL the worker process that is running a task right then."""
    pids = client.run(os.getpid)
    while not stop.is_set():
        busy = [w for w, keys in client.processing().items() if keys]
        if busy and store.exists() and (TraceStore(store).count() or 0) >= 2:
            killed["pid"] = pids[busy[0]]
            os.kill(killed["pid"], signal.SIGKILL)
            return
        time.sleep(0.05)


def test_a_killed_dask_worker_loses_and_duplicates_nothing(tiny_demo, tmp_path, prefect_harness):
    """Two worker processes (one thread each); one is killed with SIGKILL while it runs a node
    task: the run finishes on the other (Dask runs the lost task again; the flow commits each
    shard once) or its rerun completes it. Every input lands exactly once, each worker loaded the
    graph at most once, and no process outlives the cluster."""
    from distillery.flows.record import record_flow
    from distillery.flows.runners import environ_kept, graph_loads

    spec = load_spec(tiny_demo["spec_path"])
    spec = spec.model_copy(update={"record": RecordConfig(shard_size=2, retry_delay_s=0.0)})
    n = 8
    inputs = _inputs(tiny_demo, tmp_path, n=n)
    traces = tmp_path / "traces.lance"
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    with environ_kept(), distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        on_dask = spec.model_copy(update={"record": spec.record.model_copy(
            update={"runner": "dask", "dask_address": cluster.scheduler_address})})
        killed, stop = {}, threading.Event()
        killer = threading.Thread(target=_kill_a_busy_worker, args=(client, traces, killed, stop), daemon=True)
        killer.start()
        try:
            first = record_flow(spec=on_dask, inputs=str(inputs), traces=str(traces))
        except Exception as e:  # the lost task failed for good (KilledWorker): the rerun completes it
            first = {"written": None, "error": repr(e)}
        stop.set()
        killer.join(10)
        assert killed, "no worker was killed: the run ended before a shard was committed"
        assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE

        rerun = record_flow(spec=on_dask, inputs=str(inputs), traces=str(traces))
        assert (first["written"] == n and rerun["skipped"] == n) or rerun["written"] + rerun["skipped"] == n, first
        loads = client.run(graph_loads)  # the surviving worker and the nanny's replacement
        assert loads and all(v <= 1 for v in loads.values()), loads

    ids = [r.input_id for r in TraceStore(traces).read(with_images=False)]
    assert len(ids) == n and len(set(ids)) == n  # 0 lost, 0 duplicated
    assert all(r.status == "ok" for r in TraceStore(traces).read(with_images=False))
    versions = TraceStore(traces).versions()
    assert all(TraceStore(traces).count(v["version"]) is not None for v in versions)  # history readable
    gone = psutil.wait_procs(_spawned_since(before), timeout=15)[1]
    assert gone == [], f"processes left behind: {[p.cmdline() for p in gone]}"


def test_cli_records_on_a_local_cluster_it_starts_and_stops(tiny_demo, tmp_path):
    """`distillery record --runner dask --dask-workers 1`: the flow starts its own LocalCluster,
    records every input (the same records as the local runner), and no worker outlives it."""
    inputs = _inputs(tiny_demo, tmp_path, n=4)
    traces = tmp_path / "dask.lance"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}  # (a busy machine)
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "distillery.cli", "record", str(tiny_demo["spec_path"]), "--inputs", str(inputs),
           "--traces", str(traces), "--json", "--runner", "dask", "--dask-workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    while proc.poll() is None:  # every process the CLI starts (Prefect server, nanny, worker)
        try:
            seen |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["written"] == 4 and summary["quarantined"] == 0
    assert seen, "the CLI started no process"
    alive = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left behind by the CLI: {alive}"
    from distillery.teachers.record import record  # the local runner on the same inputs: the same outputs

    spec = load_spec(tiny_demo["spec_path"])
    record(spec, str(inputs), str(tmp_path / "local.lance"))
    on_dask = {r.input_id: r for r in TraceStore(traces).read()}
    here = {r.input_id: r for r in TraceStore(tmp_path / "local.lance").read()}
    assert on_dask.keys() == here.keys()
    for key, rec in here.items():
        assert on_dask[key].outputs["reasoner"]["text"] == rec.outputs["reasoner"]["text"]
        assert on_dask[key].outputs["detector"]["summary"] == rec.outputs["detector"]["summary"]
        assert list(on_dask[key].outputs["retriever"]["ids"]) == list(rec.outputs["retriever"]["ids"])
        # the worker sends no image bytes back; the flow stores the ones it read (training needs them)
        assert on_dask[key].image_bytes == rec.image_bytes and len(rec.image_bytes) > 0


def test_the_runner_is_a_typed_choice_of_the_spec_and_its_form():
    """The Prefect UI's forms of the record and distill flows (and so of their deployments) offer
    the runner as a choice; the CLI's flags go through the same validation."""
    from prefect.utilities.callables import parameter_schema

    from distillery.flows.distill import distill_flow
    from distillery.flows.record import record_flow, with_runner

    for flow_ in (record_flow, distill_flow):
        form = parameter_schema(flow_).model_dump_for_openapi()
        assert "spec" in form["properties"]
        record_schema = form["definitions"]["RecordConfig"]["properties"]
        assert record_schema["runner"]["enum"] == ["local", "dask"] and record_schema["runner"]["default"] == "local"
        assert {"dask_address", "dask_workers", "dask_threads_per_worker"} <= set(record_schema)
    assert RecordConfig().runner == "local"  # today's runner stays the default
    with pytest.raises(ValidationError, match="dask_address.*runner is 'local'"):
        RecordConfig(dask_address="tcp://scheduler:8786")
    with pytest.raises(ValidationError, match="expected a Dask scheduler address"):
        RecordConfig(runner="dask", dask_address="scheduler:8786")
    with pytest.raises(ValidationError):
        RecordConfig(runner="ray")
    spec = Spec.model_validate({"name": "x", "teachers": {}})
    assert with_runner(spec) is spec
    moved = with_runner(spec, dask_address="tcp://10.0.0.5:8786")
    assert moved.record.runner == "dask" and moved.record.dask_address == "tcp://10.0.0.5:8786"
    assert with_runner(moved, runner="local").record.dask_address is None
    assert spec.record.runner == "local"  # the original is untouched


def test_shards_in_flight_run_in_the_callers_context_and_an_error_stops_new_ones():
    """The record loop's concurrency (teachers.record.as_completed): each call sees the caller's
    context (a flow run's), results come back to the caller's thread, the first error stops new
    calls, and the calls already in flight are still yielded (their shards get committed)."""
    import contextvars

    from distillery.teachers.record import as_completed

    assert list(as_completed(lambda i: i * 2, range(5))) == [0, 2, 4, 6, 8]  # in_flight=1: in order, here
    var = contextvars.ContextVar("run", default=None)
    var.set("flow-run-1")
    started, caller = [], threading.get_ident()

    def shard(i):
        started.append(i)
        assert var.get() == "flow-run-1" and threading.get_ident() != caller
        if i == 3:
            raise RuntimeError("shard 3 failed")
        time.sleep(0.05)  # every other shard outlasts the failure, however busy the machine
        return i

    got = []
    with pytest.raises(RuntimeError, match="shard 3 failed"):
        for i in as_completed(shard, range(20), in_flight=2):
            assert threading.get_ident() == caller
            got.append(i)
    assert len(started) <= 6  # no new shard after the failure is seen (20 would all run otherwise)
    assert sorted(got) == sorted(set(started) - {3})


def test_the_workers_keep_glibc_malloc_and_run_no_profiler():
    """Dask's default MALLOC_TRIM_THRESHOLD_ made the teacher's torch work ~1.4x slower on a worker:
    the clusters the flow starts (worker_settings) and the compose workers (docker/dask) unset it,
    and both wake their workers less often (tick, memory and system monitors)."""
    import copy

    import dask
    import yaml
    from distributed.nanny import _get_env_variables

    from distillery.flows.runners import WORKER_DASK_CONFIG, worker_settings

    assert dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_") == 65536  # Dask's default
    with worker_settings():
        assert "MALLOC_TRIM_THRESHOLD_" not in _get_env_variables("distributed.nanny.pre-spawn-environ")
        assert dask.config.get("distributed.worker.profile.enabled") is False
    assert dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_") == 65536  # put back
    root = Path(__file__).resolve().parents[1]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    folder = compose["services"]["dask-worker"]["environment"]["DASK_CONFIG"]
    assert folder == "/app/docker/dask"  # the image's copy of the repository's docker/dask
    merged = dask.config.update(copy.deepcopy(dask.config.config),  # as DASK_CONFIG's folder is read
                                yaml.safe_load((root / "docker" / "dask" / "distillery.yaml").read_text()))
    assert merged["distributed"]["nanny"]["pre-spawn-environ"]["MALLOC_TRIM_THRESHOLD_"] is None
    assert merged["distributed"]["nanny"]["pre-spawn-environ"]["OMP_NUM_THREADS"] == 1  # the rest kept
    assert merged["distributed"]["worker"]["profile"]["enabled"] is False
    for key, value in WORKER_DASK_CONFIG.items():  # compose's workers get what the flow's LocalClusters get
        assert dask.config.get(key, config=merged) == value, key
