"""Recording: run the teacher graph over inputs and commit one TeacherRecord per input.

Plain functions, no Prefect: ``record`` is the one record loop; ``flows/record.py`` drives it
with one Prefect task per (node, shard), never per input (its ``shard_runner``), and its progress
artifact (``on_progress``); tests and the benchmark's direct baseline call it as is.

Order of work: find the inputs -> per shard, as the loop needs it: validate its inputs, skip those
already recorded for this graph fingerprint, set the bad ones aside -> each node in topological
order over the shard -> assemble records -> one atomic commit per shard, with the inputs refused
since the last one (so a crash loses at most the shards in flight, and a run holds only those).

Where the nodes run is the shard runner's business (``RecordConfig.runner``: this process, or Dask
workers through ``flows/runners.py``); the commits always happen here, in the caller's thread, one
at a time: one committer per store, whatever runs the nodes.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator, Literal, Mapping, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillery.teachers.base import NodeConfig
from distillery.teachers.graph import NodeResult, TeacherGraph
from distillery.teachers.inputs import InputsConfig, ScanCounts, discover, iter_inputs, scan_inputs
from distillery.teachers.records import Quarantined, Request, TeacherRecord
from distillery.teachers.store import TraceStore

RUNNER_FIELDS = ("runner", "dask_address", "dask_workers", "dask_threads_per_worker")
"""``RecordConfig`` fields that say where the nodes run, not what they record (no record changes)."""
_DASK_ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:]+\]|[^\s/:\[\]]+)(:\d{1,5})?")


class RecordConfig(BaseModel):
    """How the record flow maps work onto tasks (the spec's ``record:``)."""

    model_config = ConfigDict(extra="forbid")
    shard_size: int = Field(128, ge=1, description="Inputs per (node, shard) task and per commit (a crash loses "
                            "at most one shard in flight).")
    retries: int = Field(2, ge=0, description="Task retries on transient (whole-shard) errors.")
    retry_delay_s: float = Field(1.0, ge=0)
    runner: Literal["local", "dask"] = Field("local", description=(
        "Where the (node, shard) tasks run: 'local' in the flow's own process, one shard after the "
        "other; 'dask' on Dask worker processes (prefect-dask), several shards at once, each worker "
        "loading the teacher graph once. Records are committed by the flow either way."))
    dask_address: str | None = Field(None, description=(
        "runner 'dask': the scheduler of an existing cluster (tcp://host:8786); none: a "
        "distributed.LocalCluster on this machine for the run, closed at its end."))
    dask_workers: int = Field(2, ge=1, description=(
        "runner 'dask' without an address: worker processes of the LocalCluster (each holds its own "
        "copy of every teacher model)."))
    dask_threads_per_worker: int = Field(1, ge=1, description=(
        "runner 'dask' without an address: task threads per worker process (a node never runs in "
        "two threads of one worker at once; torch's own threads are the cores shared among workers)."))

    @model_validator(mode="after")
    def _runner_ok(self) -> "RecordConfig":
        if self.dask_address is not None:
            if self.runner != "dask":
                raise ValueError(f"record.dask_address {self.dask_address!r} is set but record.runner is "
                                 f"{self.runner!r}: set runner: dask to record on that cluster")
            if not _DASK_ADDRESS.fullmatch(self.dask_address):
                raise ValueError(f"record.dask_address {self.dask_address!r}: expected a Dask scheduler "
                                 "address such as tcp://scheduler:8786 (tcp:// or tls://, host, port)")
        return self


class RecordSpec(Protocol):
    """What recording reads of a spec (``distillery.flows.spec.Spec`` has it)."""

    teachers: Mapping[str, NodeConfig]
    inputs: InputsConfig
    record: RecordConfig


RunNode = Callable[[str, list[Request], list[dict], list], list[NodeResult]]


@dataclass
class Plan:
    """What a record run will do: the inputs to run and the ones it will not."""

    todo: list[Request]
    bad: list[TeacherRecord]  # refused before any teacher saw them (not yet in the store)
    skipped: int  # already recorded for this fingerprint


@dataclass
class RecordSummary:
    written: int = 0
    skipped: int = 0
    quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    traces: str = ""
    version: int | None = None
    fingerprint: str = ""
    seconds: float = 0.0
    quarantined_inputs: list[dict] = field(default_factory=list)  # path, reason, detail
    to_retry: int = 0  # of the quarantined: failed for now (status retry); the next run tries them again
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per node whose outputs report ``usage`` (the ``openai`` node): the sums of its prompt and
    completion tokens, requests and, where the spec gives prices, estimated cost (only requests
    whose output was recorded count)."""
    node_seconds: dict[str, float] = field(default_factory=dict)
    """Per node: the wall time it spent on this run's inputs (a batch's time shared by its inputs)."""

    def to_json(self) -> dict:
        return asdict(self)


def cost_rows(summary: Mapping) -> list[dict]:
    """One row per node of a summary (``RecordSummary.to_json()``): its seconds and, for nodes
    behind an API, requests, prompt and completion tokens and estimated cost (None: not reported)."""
    usage, seconds = summary.get("usage") or {}, summary.get("node_seconds") or {}
    rows = []
    for node in [*seconds, *(n for n in usage if n not in seconds)]:
        u = usage.get(node, {})
        rows.append({"node": node, "seconds": round(seconds.get(node, 0.0), 3), "requests": u.get("requests"),
                     "prompt_tokens": u.get("prompt_tokens"), "completion_tokens": u.get("completion_tokens"),
                     "estimated_cost": None if u.get("estimated_cost") is None else round(u["estimated_cost"], 6)})
    return rows


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def quarantine_record(q: Quarantined, fingerprint: str) -> TeacherRecord:
    return TeacherRecord(input_id=q.input_id, graph_fingerprint=fingerprint, image_path=q.image_path,
                         question=q.question, status="quarantined", reason=q.reason, detail=q.detail,
                         created_at=_now())


def plan(spec: RecordSpec, inputs: str, store: TraceStore, fingerprint: str) -> Plan:
    """Validate every input at once and drop the ones this graph has already recorded (the
    benchmarks' view of a run's work; ``record`` checks the inputs shard by shard instead)."""
    scan = scan_inputs(inputs, spec.inputs, skip=store.recorded_ids(fingerprint))
    return Plan(todo=scan.requests, bad=[quarantine_record(q, fingerprint) for q in scan.quarantined],
                skipped=scan.skipped)


def shards(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_shard(graph: TeacherGraph, requests: list[Request], run_node: RunNode | None = None) -> list[TeacherRecord]:
    """Run every node (topological order) over one shard and assemble its records.

    A node that fails on an input quarantines that input (status ``retry`` when the node says a
    later run may succeed); its downstream nodes skip it."""
    run_node = run_node or graph.run_node
    images = [r.image() for r in requests]
    upstream: list[dict[str, dict]] = [{} for _ in requests]
    errors: list[dict[str, str]] = [{} for _ in requests]
    retry = [False] * len(requests)
    timings: list[dict[str, float]] = [{} for _ in requests]
    for name in graph.order:
        live = [i for i in range(len(requests)) if not errors[i]]
        if not live:
            break
        results = run_node(name, [requests[i] for i in live], [upstream[i] for i in live], [images[i] for i in live])
        for i, res in zip(live, results):
            timings[i][name] = res.seconds
            if res.error is not None:
                errors[i][name], retry[i] = res.error, res.retry
            else:
                upstream[i][name] = res.output
    return [assemble(graph.fingerprint, r, upstream[i], timings[i], errors[i], retry[i])
            for i, r in enumerate(requests)]


def assemble(fingerprint: str, req: Request, outputs: dict, timings: dict, errors: dict,
             retry: bool = False) -> TeacherRecord:
    failed = next(iter(errors), None)
    return TeacherRecord(
        input_id=req.input_id, graph_fingerprint=fingerprint, image_path=req.image_path,
        question=req.question, status=("retry" if retry else "quarantined") if failed else "ok",
        reason=f"node_error:{failed}" if failed else None,
        detail=errors[failed] if failed else None,
        image_bytes=req.image_bytes, outputs=outputs, timings=timings, errors=errors, created_at=_now(),
    )


def summarize(summary: RecordSummary, records: list[TeacherRecord]) -> None:
    """Fold a committed batch of records into the run summary."""
    reasons = Counter(summary.by_reason)
    for rec in records:
        if rec.status == "ok":
            summary.written += 1
        else:
            summary.quarantined += 1
            summary.to_retry += rec.status == "retry"
            reasons[rec.reason or "unknown"] += 1
            summary.quarantined_inputs.append({"image": rec.image_path, "reason": rec.reason, "detail": rec.detail})
        add_usage(summary.usage, rec.outputs)
        for node, sec in (rec.timings or {}).items():
            summary.node_seconds[node] = summary.node_seconds.get(node, 0.0) + sec
    summary.by_reason = dict(reasons)


def add_usage(totals: dict[str, dict[str, float]], outputs: dict[str, dict]) -> None:
    """Add each node output's numeric ``usage`` fields (tokens, requests, cost) to ``totals``."""
    for node, out in outputs.items():
        usage = out.get("usage") if isinstance(out, dict) else None
        if isinstance(usage, dict):
            node_totals = totals.setdefault(node, {})
            for key, value in usage.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    node_totals[key] = node_totals.get(key, 0) + value


ShardRunner = Callable[[TeacherGraph, int], RunNode]  # (graph, shard number) -> how its nodes run
RemoteShard = Callable[[TeacherGraph, int, list[Request]], list[TeacherRecord]]  # (graph, shard number, requests) -> records
T = TypeVar("T")
R = TypeVar("R")
_END = object()


def as_completed(fn: Callable[[T], R], items: Iterable[T], in_flight: int = 1) -> Iterator[R]:
    """``fn(item)`` for every item, yielded as each finishes, at most ``in_flight`` at once.

    ``in_flight=1``: one after the other in this thread, in order. More: each call in a thread of
    its own, in a copy of the caller's context (so a Prefect flow run's context reaches it); the
    caller consumes the results in its own thread. The first error stops new calls; the ones in
    flight finish (their results are still yielded), then the error is raised."""
    if in_flight <= 1:
        yield from map(fn, items)
        return
    todo, error = iter(items), None
    pending: set[Future] = set()
    pool = ThreadPoolExecutor(in_flight, thread_name_prefix="record-shard")
    try:
        while True:
            while error is None and len(pending) < in_flight and (item := next(todo, _END)) is not _END:
                pending.add(pool.submit(contextvars.copy_context().run, fn, item))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is not None:
                    error = error or fut.exception()
                else:
                    yield fut.result()
        if error is not None:
            raise error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def record(spec: RecordSpec, inputs: str, traces: str, graph: TeacherGraph | None = None,
           on_progress: Callable[[int, int], None] | None = None, shard_runner: ShardRunner | None = None,
           on_plan: Callable[[int, int, TeacherGraph], None] | None = None, in_flight: int = 1,
           remote: RemoteShard | None = None) -> RecordSummary:
    """Record every input of ``inputs`` not yet recorded in ``traces`` under this graph: the one
    record loop (the record flow drives it with Prefect tasks; tests and benchmarks call it as is).

    Find the inputs (names and questions: nothing read yet) -> per shard, as it is needed: check
    each input, skip those recorded, set the refused ones aside -> every node in topological order
    -> one atomic commit (the shard's records and the inputs refused since the last commit). So
    the first shard starts after its own inputs are checked, not everyone's, the inputs of the
    next shards are checked while the shards in flight run, and a run holds the shards in flight,
    never the whole input set. ``on_plan(found, recorded, graph)`` once the inputs are found (and
    how many records of this graph the store holds); ``on_progress(done, total)`` with (0, total)
    first, then after each commit (inputs done: recorded, refused or skipped, out of those found);
    ``shard_runner(graph, shard_no)`` how a shard's nodes run (default: ``graph.run_node``).
    ``in_flight``: shards run at once (threads of this process waiting on the shard runner);
    ``remote(graph, shard_no, requests)``: runs a whole shard in another process (a Dask worker), which
    loads the models, decodes the images and runs ``run_shard`` itself, and returns the shard's
    records (nothing is loaded here). Wherever the nodes run, every commit is made here, in this
    thread, one at a time, in the order the shards finish."""
    t0 = time.perf_counter()
    graph = graph or TeacherGraph(spec.teachers)
    store = TraceStore(traces)
    recorded = store.recorded_ids(graph.fingerprint)
    found = discover(inputs, spec.inputs)
    summary = RecordSummary(traces=str(traces), fingerprint=graph.fingerprint)
    if on_plan:
        on_plan(len(found), len(recorded), graph)
    if on_progress:
        on_progress(0, len(found))
    counts, refused, flow = ScanCounts(), [], {"sent": 0, "committed": 0}

    def work() -> Iterator[tuple[int, list[Request]]]:
        """The shards, each checked as the record loop asks for it (in this thread)."""
        shard: list[Request] = []
        no = 0
        for item in iter_inputs(found, spec.inputs, recorded, counts):
            if isinstance(item, Quarantined):
                refused.append(quarantine_record(item, graph.fingerprint))
            else:
                shard.append(item)
            if len(shard) == spec.record.shard_size:
                yield ready(no, shard)
                no, shard = no + 1, []
        if shard:
            yield ready(no, shard)

    def ready(no: int, shard: list[Request]) -> tuple[int, list[Request]]:
        if not remote and not flow["sent"]:
            graph.load()
        flow["sent"] += len(shard)
        return no, shard

    def run(numbered: tuple[int, list[Request]]) -> tuple[list[Request], list[TeacherRecord]]:
        no, shard = numbered
        if remote is not None:
            return shard, remote(graph, no, shard)
        return shard, run_shard(graph, shard, shard_runner(graph, no) if shard_runner else None)

    def commit(recs: list[TeacherRecord]) -> None:
        batch = refused + recs
        refused.clear()
        if batch:
            store.append(batch)  # one atomic commit, by this thread only
            summarize(summary, batch)
        if on_progress:  # every input looked at, less those of the shards still in flight
            on_progress(counts.seen - (flow["sent"] - flow["committed"]), len(found))

    for shard, recs in as_completed(run, work(), in_flight):
        flow["committed"] += len(shard)
        commit(recs)
    if refused or not flow["sent"]:
        commit([])  # refused inputs after the last shard (or a run with no shard at all)
    summary.skipped = counts.skipped
    summary.version = store.version
    summary.seconds = time.perf_counter() - t0
    return summary
