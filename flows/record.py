"""The record flow: run the teacher graph over inputs and commit TeacherRecords.

Thin by design: every step is a plain function in ``teachers/record.py``. Tasks are one per
(node, shard) — never per input — with retries for transient whole-shard failures (per-input
failures are recorded as quarantines, not retried). Each shard's records are committed in the
flow itself, one atomic append (a task run per commit cost more than the commit). Parameters
are the pydantic ``Spec`` so the Prefect UI renders a typed form.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from distillery.flows.spec import Spec
from distillery.teachers.graph import NodeResult, TeacherGraph
from distillery.teachers.record import RecordSummary, plan, run_shard, shards, summarize
from distillery.teachers.records import Request
from distillery.teachers.store import TraceStore


@task(name="run-node", cache_policy=NO_CACHE, task_run_name="{name} shard {shard}")
def run_node_task(graph: TeacherGraph, name: str, shard: int, requests: list[Request],
                  upstream: list[dict], images: list) -> list[NodeResult]:
    """One teacher node over one shard (batched inside)."""
    return graph.run_node(name, requests, upstream, images)


_listeners: list = []


def add_progress_listener(fn):
    """Call ``fn(done, total)`` after every committed shard (the CLI draws its progress bar).
    Returns a function that removes the listener again (call it when the run is over)."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn) if fn in _listeners else None


def _notify(done: int, total: int) -> None:
    for fn in list(_listeners):
        fn(done, total)


def _shard_runner(graph: TeacherGraph, shard_no: int, retries: int, delay: float):
    node_task = run_node_task.with_options(retries=retries, retry_delay_seconds=delay)

    def run_node(name, requests, upstream, images):
        # quote(): Prefect would otherwise walk the graph (its models), the image bytes and the
        # images, looking for upstream futures in them: ~0.1 s per task, 25% of a record run.
        return node_task(quote(graph), name, shard_no, quote(requests), quote(upstream), quote(images))

    return run_node


@flow(name="record", log_prints=True)
def record_flow(spec: Spec, inputs: str, traces: str) -> dict:
    """Record teacher outputs for every input not yet recorded under this graph's fingerprint.

    Args:
        spec: the distillation spec (teacher graph and record settings).
        inputs: folder of images, with an optional requests.jsonl.
        traces: trace store URI (a Lance dataset path).
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    graph = TeacherGraph(spec.teachers)
    store = TraceStore(traces)
    p = plan(spec, inputs, store, graph.fingerprint)
    summary = RecordSummary(skipped=p.skipped, traces=traces, fingerprint=graph.fingerprint)
    logger.info("graph %s: %d to record, %d already recorded, %d refused",
                graph.fingerprint[:12], len(p.todo), p.skipped, len(p.bad))
    if p.bad:
        store.append(p.bad)
        summarize(summary, p.bad)
    progress_id = create_progress_artifact(progress=0.0 if p.todo else 100.0, key="record-progress",
                                           description="Inputs recorded in this run (%)")
    if p.todo:
        graph.load()
    done = 0
    for no, shard in enumerate(shards(p.todo, spec.record.shard_size)):
        recs = run_shard(graph, shard, _shard_runner(graph, no, spec.record.retries, spec.record.retry_delay_s))
        store.append(recs)  # one atomic commit per shard, in the flow (a task would add ~0.1 s)
        summarize(summary, recs)
        done += len(shard)
        update_progress_artifact(progress_id, 100.0 * done / len(p.todo))
        _notify(done, len(p.todo))
    summary.version = store.version
    summary.seconds = time.perf_counter() - t0
    _publish(summary)
    return summary.to_json()


def _publish(summary: RecordSummary) -> None:
    rows = [{"outcome": "written", "count": summary.written},
            {"outcome": "skipped (already recorded)", "count": summary.skipped}]
    rows += [{"outcome": f"quarantined: {k}", "count": v} for k, v in sorted(summary.by_reason.items())]
    create_table_artifact(table=rows, key="record-summary",
                          description=f"Trace store {summary.traces} at version {summary.version}")
