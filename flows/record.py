"""The record flow: run the teacher graph over inputs and commit TeacherRecords.

Thin by design: the loop is ``teachers.record.record``; the flow gives it how a shard's nodes
run (one task per (node, shard), never per input, with retries for transient whole-shard
failures; per-input failures are recorded as quarantines, not retried), a progress artifact, and
two tables: the outcome counts and the cost per node (seconds; tokens and estimated cost of nodes
behind an API).
Each shard's records are committed in the flow itself, one atomic append (a task run per commit
cost more than the commit). Parameters are the pydantic ``Spec`` so the Prefect UI renders a
typed form.

``spec.record.runner`` picks where the node tasks run: ``local`` (here, one shard after the other)
or ``dask`` (Dask worker processes through prefect-dask, several shards at once, each worker
loading the graph once: ``flows/runners.py``); the commits stay in the flow either way.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from distillery import runtime
from distillery.flows.spec import Spec
from distillery.teachers.graph import NodeResult, TeacherGraph
from distillery.teachers.record import RecordConfig, RecordSummary, cost_rows, record
from distillery.teachers.records import Request


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
    progress: dict = {}

    def on_plan(found: int, recorded: int, graph: TeacherGraph) -> None:
        logger.info("graph %s: %d inputs found, checked shard by shard (the store holds %d of this graph's "
                    "records)", graph.fingerprint[:12], found, recorded)

    def on_progress(done: int, total: int) -> None:
        share = 100.0 * done / total if total else 100.0
        if "id" not in progress:
            progress["id"] = create_progress_artifact(progress=share, key="record-progress",
                                                      description="Inputs recorded in this run (%)")
        else:
            update_progress_artifact(progress["id"], share)
        if done:
            _notify(done, total)

    def shard_runner(graph: TeacherGraph, shard_no: int):
        return _shard_runner(graph, shard_no, spec.record.retries, spec.record.retry_delay_s)

    cfg = spec.record
    if cfg.runner == "dask":
        from distillery.flows.runners import dask_runner, dask_shard_runner

        with dask_runner(cfg) as (runner, in_flight):
            where = cfg.dask_address or f"a LocalCluster of {cfg.dask_workers} worker processes"
            logger.info("recording on Dask (%s), %d shards in flight", where, in_flight)
            summary = record(spec, inputs, traces, on_plan=on_plan, on_progress=on_progress, in_flight=in_flight,
                             remote=dask_shard_runner(runner, spec.teachers, cfg.retries, cfg.retry_delay_s))
    else:
        summary = record(spec, inputs, traces, on_plan=on_plan, on_progress=on_progress, shard_runner=shard_runner)
    _publish(summary)
    return summary.to_json()


def with_runner(spec: Spec, runner: str | None = None, dask_address: str | None = None,
                dask_workers: int | None = None) -> Spec:
    """The spec with its record runner replaced where an argument is given (the CLI's
    ``--runner``/``--dask-address``/``--dask-workers``); an address alone means ``dask``.
    Validated again: a bad address is an error naming the field."""
    changes = {k: v for k, v in {"runner": runner, "dask_address": dask_address, "dask_workers": dask_workers}.items()
               if v is not None}
    if not changes:
        return spec
    if dask_address is not None and runner is None:
        changes["runner"] = "dask"
    if changes.get("runner") == "local":
        changes.setdefault("dask_address", None)
    cfg = RecordConfig.model_validate({**spec.record.model_dump(), **changes})
    return spec.model_copy(update={"record": cfg})


def run_record(spec: Spec, inputs: str | Path, traces: str, show_progress: bool = True) -> dict:
    """Run the record flow in this process (Prefect's local server unless ``PREFECT_API_URL`` is
    set), with a progress bar on stderr; its summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("recording"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not show_progress) as bar:
        task_id = bar.add_task("record", total=None)
        remove = add_progress_listener(lambda done, total: bar.update(task_id, completed=done, total=total))
        try:
            with runtime.local_prefect():
                return record_flow(spec=spec, inputs=str(inputs), traces=traces)
        finally:
            remove()  # a later run in this process draws its own bar


def _publish(summary: RecordSummary) -> None:
    rows = [{"outcome": "written", "count": summary.written},
            {"outcome": "skipped (already recorded)", "count": summary.skipped}]
    rows += [{"outcome": f"quarantined: {k}", "count": v} for k, v in sorted(summary.by_reason.items())]
    create_table_artifact(table=rows, key="record-summary",
                          description=f"Trace store {summary.traces} at version {summary.version}")
    cost = cost_rows(summary.to_json())
    if cost:
        create_table_artifact(table=cost, key="record-cost", description=(
            f"Per teacher node: wall seconds on this run's {summary.written + summary.quarantined} inputs; "
            "requests, tokens and estimated cost for nodes behind an API (None: not reported)"))
