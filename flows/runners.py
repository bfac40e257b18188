"""Where the record flow's shards run: Dask worker processes, through prefect-dask (one task per shard).

``RecordConfig.runner`` picks it; ``local`` (the default) needs nothing from here. ``dask`` runs
each task on ``prefect_dask.DaskTaskRunner``: a ``distributed.LocalCluster`` started for the run
(``dask_workers`` processes on 127.0.0.1, closed at its end), or an existing scheduler
(``dask_address``, e.g. the compose ``dask`` profile's ``tcp://dask-scheduler:8786``).

A shard is one task: it carries the spec's teachers config (as JSON), the graph fingerprint and
the shard's requests, never a loaded graph. Each worker process validates that config and builds the graph
from it once, checks that it sees the same teacher files and node code as the flow (the same
fingerprint), loads the models, and keeps the graph for every later task of that fingerprint
(``worker_graph``: a per-process cache). The shard's records go
back to the flow, which commits each shard itself (one committer:
``teachers.record``): a killed worker loses only results that no commit has seen, Dask runs its
task again elsewhere, and the store never sees a record twice.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import distillery.teachers.nodes  # noqa: F401  (registers every node type in a worker process)
from distillery import runtime
from distillery.teachers.base import NodeConfig, parse_nodes
from distillery.teachers.graph import TeacherGraph
from distillery.teachers.record import RecordConfig, RemoteShard, run_shard
from distillery.teachers.records import Request, TeacherRecord

KEEP_GRAPHS = 2  # loaded graphs a worker keeps (each holds every teacher model of its spec)
_graphs: OrderedDict[str, TeacherGraph] = OrderedDict()
_graphs_lock = threading.Lock()
_run_locks: dict[str, threading.Lock] = {}
LOADS: list[dict[str, Any]] = []  # one entry per graph this process loaded: fingerprint, seconds


class ShardWork:
    """What one shard's task needs, in one object that Prefect and Dask do not walk into
    (neither looks for futures inside it; Dask would turn Prefect's ``quote`` into a tuple)."""

    __slots__ = ("teachers", "fingerprint", "requests", "token")

    def __init__(self, teachers: dict, fingerprint: str, requests: list[Request]):
        self.teachers, self.fingerprint, self.requests = teachers, fingerprint, requests
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:  # Dask would otherwise hash the whole shard to name the task
        return self.token

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)


def worker_graph(teachers: dict[str, dict], fingerprint: str) -> TeacherGraph:
    """This process's loaded graph for ``fingerprint``: built from ``teachers`` (each node's config
    as JSON, validated here) and loaded on the first call, the same object on every later one.
    Raises when the graph seen here differs from the flow's (another fingerprint: other teacher
    files, or another version of a node's code): its records would carry the wrong one."""
    with _graphs_lock:
        graph = _graphs.get(fingerprint)
        if graph is not None:
            _graphs.move_to_end(fingerprint)
            return graph
        runtime.configure()
        t0 = time.perf_counter()
        graph = TeacherGraph(parse_nodes(teachers))
        if graph.fingerprint != fingerprint:
            raise RuntimeError(f"Dask worker (pid {os.getpid()}): the teacher graph here has fingerprint "
                               f"{graph.fingerprint[:12]}, the flow's is {fingerprint[:12]}: the worker sees "
                               "other teacher files (weights, documents) at the spec's paths, or runs another "
                               "version of the node code; give every worker the flow's files and image")
        graph.load()
        while len(_graphs) >= KEEP_GRAPHS:
            _graphs.popitem(last=False)
        _graphs[fingerprint] = graph
        LOADS.append({"fingerprint": fingerprint, "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid()})
        return graph


def graph_loads() -> int:
    """How many graphs this process has loaded (the benchmark asks every worker)."""
    return len(LOADS)


@task(name="record-shard", cache_policy=NO_CACHE, task_run_name="shard {shard}")
def run_shard_on_worker(shard: int, work: ShardWork) -> list[TeacherRecord]:
    """One shard through every node of the graph, on a Dask worker (its graph loaded once per
    process): the shard's records, which the flow commits. One task per shard, not per node: a
    task's round trip (Prefect's task engine, Dask's scheduler, the upstream outputs and the
    decoded images going back and forth) is paid once per shard, and the images are decoded once."""
    t0 = time.perf_counter()
    graph = worker_graph(work.teachers, work.fingerprint)
    with _graph_lock(work.fingerprint):
        records = run_shard(graph, work.requests)
    for rec in records:  # the flow has these bytes already: ~16 MB a shard less to send back
        rec.image_bytes = b""
    get_run_logger().info("shard %d: %d records in %.2f s on worker pid %d", shard, len(records),
                          time.perf_counter() - t0, os.getpid())
    return records


def _graph_lock(fingerprint: str) -> threading.Lock:
    """One lock per loaded graph: with several task threads in a worker, two shards never run the
    same models at once (a model need not be thread-safe)."""
    with _graphs_lock:
        return _run_locks.setdefault(fingerprint, threading.Lock())


def dask_shard_runner(runner, teachers: Mapping[str, NodeConfig], retries: int, delay: float) -> RemoteShard:
    """How a shard runs on Dask: one task, submitted and waited for (the record loop runs several
    shards at once, each in its own thread)."""
    shard_task = run_shard_on_worker.with_options(retries=retries, retry_delay_seconds=delay)
    teachers = {name: cfg.model_dump(mode="json") for name, cfg in teachers.items()}  # no pickled classes

    def remote(graph: TeacherGraph, shard_no: int, requests: list[Request]) -> list[TeacherRecord]:
        work = ShardWork(teachers, graph.fingerprint, requests)
        # The future is dropped once read: a worker that dies later holds no result Dask would
        # have to compute again.
        records = runner.submit(shard_task, {"shard": shard_no, "work": work}).result()
        for rec, req in zip(records, requests, strict=True):  # the bytes run_shard_on_worker left out
            if rec.input_id != req.input_id:
                raise RuntimeError(f"shard {shard_no}: the worker returned {rec.input_id!r} where "
                                   f"{req.input_id!r} was asked")
            rec.image_bytes = req.image_bytes
        return records

    return remote


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def environ_kept() -> Iterator[None]:
    """Dask's nannies set their workers' variables (OMP_NUM_THREADS=1, ...) in this process's own
    environment before each spawn; put them back when the cluster is gone, so that later child
    processes of the flow (a training run) do not inherit them."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            os.environ.pop(key, None)
        os.environ.update({k: v for k, v in before.items() if os.environ.get(k) != v})


# Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers (to hand freed memory back to the
# OS). Set at all, it stops glibc from raising its mmap threshold, so every large, short-lived torch
# tensor costs an mmap, a munmap and fresh page faults: a 128-record shard of the demo graph took
# 7.2 s on a worker against 3.8 s in the flow's process. Unset (glibc's defaults) in the workers of
# the clusters the flow starts; an existing cluster's workers need the same (compose's dask profile
# sets it). And no statistical profiler: every 10 ms it walks the task thread's stack under the GIL
# (for the dashboard's profile page), while the nodes' Python (tokenizing, NMS, decoding) needs it.
# The event loop's tick (20 ms: a warning when the loop was blocked), the memory monitor (100 ms)
# and the system monitor (500 ms) wake every worker, and the flow's process (which holds the
# LocalCluster's scheduler and nannies), far more often than a recording worker needs: each wake
# takes a core from a worker whose torch threads use both (benchmarks/dask_record.py, 256 inputs:
# 1 worker / local runner went from 1.16-1.17x to 1.02-1.03x).
WORKER_DASK_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                      "distributed.worker.profile.enabled": False,
                      "distributed.admin.tick.interval": "1s",
                      "distributed.worker.memory.monitor-interval": "1s",
                      "distributed.admin.system-monitor.interval": "2s"}


LARGE_SHARD = {"distributed.admin.large-graph-warning-threshold": "1GB"}


@contextmanager
def worker_settings() -> Iterator[None]:
    """Dask's config for the LocalCluster workers started inside this block (``WORKER_DASK_CONFIG``)."""
    import dask

    with dask.config.set(WORKER_DASK_CONFIG):
        yield


def local_cluster_kwargs(cfg: RecordConfig) -> dict[str, Any]:
    """A LocalCluster of ``dask_workers`` processes on 127.0.0.1 (no dashboard on other
    interfaces); torch's threads in each are the cores shared among the workers."""
    torch_threads = str(max(1, _cores() // cfg.dask_workers))
    return {"n_workers": cfg.dask_workers, "threads_per_worker": cfg.dask_threads_per_worker, "processes": True,
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0" if _has_dashboard() else None,
            "env": {"OMP_NUM_THREADS": torch_threads, "MKL_NUM_THREADS": torch_threads,
                    "OPENBLAS_NUM_THREADS": torch_threads}}


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401  (the dashboard's optional dependency)
    except ImportError:
        return False
    return True


@contextmanager
def dask_runner(cfg: RecordConfig) -> Iterator[tuple[Any, int]]:
    """A started ``DaskTaskRunner`` for ``cfg`` and how many shards to keep in flight (twice the
    cluster's task threads: each worker has the next shard waiting). Its LocalCluster, if it
    started one, is closed on the way out."""
    import dask

    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RuntimeError("record.runner 'dask' needs prefect-dask: pip install prefect-dask") from None

    if cfg.dask_address:
        runner = DaskTaskRunner(address=cfg.dask_address)
    else:
        runner = DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(cfg))
    # A shard's task carries its images (so workers need no shared filesystem): ~16 MB for the
    # demo's 128; Dask's 10-MB "Sending large graph" warning would fire for every shard.
    with environ_kept(), worker_settings(), dask.config.set(LARGE_SHARD), runner:
        threads = sum(runner.client.nthreads().values())
        yield runner, max(2, 2 * threads)
