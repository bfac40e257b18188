"""Recording on Dask: records per second of the record flow on the local runner and on 1 and 2
Dask worker processes (one task thread each), on the standard demo graph.

    python -m benchmarks.dask_record [--n 1024] [--preset full] [--repeats 3] [--workdir DIR]

1,024 inputs are 8 shards of the demo spec's 128: at 256 (2 shards) the 2-worker figure timed two
tasks, one per worker, and its rounds' ratios spread over 1.35-1.91.

Each timed run records the same inputs into a fresh trace store through ``record_flow`` (the
Prefect server is started once, untimed). The local runner loads the graph in this process; a
Dask run gets a fresh ``LocalCluster`` (the settings ``--runner dask`` uses) whose workers have
imported the libraries, loaded the graph and recorded one shard into nothing (untimed, as this
process has for the local side); afterwards every worker is asked how many graphs it loaded
(goal: one each, so no load after a worker's first shard). One more run, untimed in the ratios, is the cold path a user
gets from ``distillery record --runner dask``: the flow starts its LocalCluster itself.

Prints the figures and the ratios, each the median of the rounds' own ratios: 2 workers / 1 worker
in records per second (goal >= 1.6) and Dask with 1 worker / local in time (goal <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from distillery import runtime


def _warm_imports() -> int:
    """Run in each worker before timing: the libraries this process has already imported."""
    import faiss  # noqa: F401
    import sentence_transformers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import ultralytics  # noqa: F401

    import prefect.events.clients  # noqa: F401  (Prefect's task engine on a worker: ~2 s on first use)
    import prefect.task_engine  # noqa: F401

    import distillery.flows.runners  # noqa: F401

    return 1


def _warm_graph(teachers: dict, fingerprint: str, shard: list) -> int:
    """Run in each worker before timing: load the graph once and record one shard with it into
    nothing, exactly as ``benchmarks.record.warm_up`` does in this process for the local runner
    (first-call costs: kernels, the FAISS index, the LLM's first generate). The cold figure below
    pays all of that."""
    from distillery.flows.runners import worker_graph
    from distillery.teachers.record import run_shard

    run_shard(worker_graph(teachers, fingerprint), shard)
    return 1


def time_local(spec, inputs: Path, traces: str) -> tuple[float, dict]:
    from distillery.flows.record import record_flow

    with runtime.local_prefect():
        t0 = time.perf_counter()
        summary = record_flow(spec=spec, inputs=str(inputs), traces=traces)
        return time.perf_counter() - t0, summary


def time_dask(spec, inputs: Path, traces: str, workers: int, shard: list) -> tuple[float, dict, dict]:
    """One run on a fresh LocalCluster of ``workers`` processes, each with the graph loaded before
    the clock starts (as the local side's is): (seconds, summary, graph loads per worker) and the
    cluster's start-up and load seconds (untimed in the run)."""
    import distributed

    from distillery.flows.record import record_flow
    from distillery.flows.runners import environ_kept, graph_loads, local_cluster_kwargs, worker_settings

    cfg = spec.record.model_copy(update={"runner": "dask", "dask_workers": workers})
    t0 = time.perf_counter()
    with environ_kept(), worker_settings(), distributed.LocalCluster(**local_cluster_kwargs(cfg)) as cluster, \
            distributed.Client(cluster) as client:
        client.run(_warm_imports)
        from distillery.teachers.graph import TeacherGraph

        client.run(_warm_graph, {n: c.model_dump(mode="json") for n, c in spec.teachers.items()},
                   TeacherGraph(spec.teachers).fingerprint, shard)
        startup = time.perf_counter() - t0
        on_dask = spec.model_copy(update={"record": cfg.model_copy(update={"dask_address": cluster.scheduler_address})})
        with runtime.local_prefect():
            t0 = time.perf_counter()
            summary = record_flow(spec=on_dask, inputs=str(inputs), traces=traces)
            seconds = time.perf_counter() - t0
        loads = client.run(graph_loads)
    return seconds, summary, {"loads": sorted(loads.values()), "startup_s": round(startup, 2)}


def time_cold(spec, inputs: Path, traces: str, workers: int) -> float:
    """`--runner dask` as a user runs it: the flow starts (and stops) its own LocalCluster."""
    from distillery.flows.record import record_flow

    cold = spec.model_copy(update={"record": spec.record.model_copy(update={"runner": "dask",
                                                                             "dask_workers": workers})})
    with runtime.local_prefect():
        t0 = time.perf_counter()
        record_flow(spec=cold, inputs=str(inputs), traces=traces)
        return time.perf_counter() - t0


def paired_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """The goals' ratios, each the median of the rounds' own ratios: the three sides of a round run
    back to back, so a slow minute of this shared machine weighs on all three of that round rather
    than on one side's median (a single slow local run once read the 1-worker ratio as 1.093
    where its rounds' ratios had the median 1.102). The ratios of the medians are kept beside them."""
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = list(zip(times["local"], times["dask1"], times["dask2"], strict=True))
    return {"dask2_over_dask1_speed": round(statistics.median(d1 / d2 for _, d1, d2 in pairs), 3),
            "dask1_over_local_time": round(statistics.median(d1 / lo for lo, d1, _ in pairs), 3),
            "of_medians": {"dask2_over_dask1_speed": round(med["dask1"] / med["dask2"], 3),
                           "dask1_over_local_time": round(med["dask1"] / med["local"], 3)}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="inputs")
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    ap.add_argument("--workdir", type=Path, default=None, help="reused: its world is built once")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the three sides (median of each)")
    ap.add_argument("--shard-size", type=int, default=None, help="default: the demo spec's")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-dask-record-"))
    runtime.configure()

    from benchmarks.record import _inputs, demo_graph, first_shard, warm_up

    world, teachers, spec = demo_graph(work, args.preset)
    if args.shard_size:
        spec = spec.model_copy(update={"record": spec.record.model_copy(update={"shard_size": args.shard_size})})
    inputs = _inputs(world, args.n, work / "inputs")

    n_inputs = warm_up(spec, inputs, work)  # untimed: index and file caches, first-call costs (then the server)
    shard = first_shard(spec, inputs, work)  # each Dask worker's warm-up, the same
    from prefect import flow

    with runtime.local_prefect():
        flow(name="warm-up")(lambda: None)()

    times: dict[str, list[float]] = {"local": [], "dask1": [], "dask2": []}
    extra: dict[str, list] = {"dask1": [], "dask2": []}
    written = set()
    for r in range(args.repeats):
        order = ["local", "dask1", "dask2"] if r % 2 == 0 else ["dask2", "dask1", "local"]
        for side in order:
            store = work / f"{side}-{r}.lance"
            shutil.rmtree(store, ignore_errors=True)
            if side == "local":
                seconds, summary = time_local(spec, inputs, str(store))
            else:
                seconds, summary, info = time_dask(spec, inputs, str(store), int(side[-1]), shard)
                extra[side].append(info)
            times[side].append(seconds)
            written.add(summary["written"])
            print(f"  round {r} {side}: {seconds:.2f} s, {summary['written']} written", flush=True)
    cold_store = work / "cold.lance"
    shutil.rmtree(cold_store, ignore_errors=True)
    cold = time_cold(spec, inputs, str(cold_store), 2)

    med = {k: statistics.median(v) for k, v in times.items()}
    rps = {k: n_inputs / v for k, v in med.items()}
    figures = {
        "inputs": n_inputs, "shard_size": spec.record.shard_size, "written": sorted(written),
        "local_s": round(med["local"], 2), "dask1_s": round(med["dask1"], 2), "dask2_s": round(med["dask2"], 2),
        "local_records_per_s": round(rps["local"], 2), "dask1_records_per_s": round(rps["dask1"], 2),
        "dask2_records_per_s": round(rps["dask2"], 2),
        **paired_ratios(times),
        "graph_loads_per_worker": {k: [x["loads"] for x in v] for k, v in extra.items()},
        "cluster_startup_s": {k: [x["startup_s"] for x in v] for k, v in extra.items()},
        "cold_dask2_s": round(cold, 2), "samples_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
    }
    print(f"local runner:        {med['local']:.2f} s  {rps['local']:.1f} records/s")
    print(f"dask, 1 worker:      {med['dask1']:.2f} s  {rps['dask1']:.1f} records/s  "
          f"time / local {figures['dask1_over_local_time']:.3f} (goal <= 1.10)")
    print(f"dask, 2 workers:     {med['dask2']:.2f} s  {rps['dask2']:.1f} records/s  "
          f"speed / 1 worker {figures['dask2_over_dask1_speed']:.3f} (goal >= 1.6)")
    print(f"graph loads per worker (each run): {figures['graph_loads_per_worker']} (goal: 1 each)")
    print(f"LocalCluster start-up + imports (untimed above): {figures['cluster_startup_s']}")
    print(f"cold `--runner dask` with 2 workers (the flow starts its cluster): {cold:.2f} s")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
