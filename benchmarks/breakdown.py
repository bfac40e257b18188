"""Where a batch-1 request's time goes, on each side: the student's stages and the graph's nodes.

    python -m benchmarks.breakdown [--preset tiny|full] [--workdir DIR] [--student DIR] [--inputs N] [--repeats R]

The speed-up is a quotient of two sums, and the two sums are made of different things: the graph's
of its models' compute (which a faster machine shrinks), the student's of fixed costs per request
(decoding the PNG, which the graph pays too, two ONNX Runtime calls, turning its outputs into the
teacher's shapes). This prints both sums term by term, and what the student would have to take
for the >= 20x goal, so the figure can be read, not only compared.

The stages are timed inside the real code paths (``StudentPredictor.predict``, ``run_shard``) by
wrapping the calls each stage makes; nothing else changes. Both sides are loaded at once and
timed in alternating passes (medians), as the paired speed-up is. On the ONNX path the text graph runs
on a second thread beside the detection post-processing, so those two overlap and the stages add
up to more than the request.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks.common import GOAL_SPEEDUP_B1, parser, prepared, test_inputs


class _Clock:
    """Seconds and calls per stage, summed over a pass; thread-safe enough for two threads that
    never write the same stage (the GIL makes each ``+=`` on a float whole)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - t0
                self.calls[stage] += 1

        return timed


class _Session:
    """An ONNX Runtime session whose ``run`` is timed as ``stage``."""

    def __init__(self, session, clock: _Clock, stage: str):
        self._session, self.run = session, clock.wrap(stage, session.run)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def _summary(rows: list[tuple[float, _Clock]]) -> dict[str, Any]:
    """Median over the passes of the request's ms and of each stage's ms (and calls) per request."""
    stages = list(dict.fromkeys(s for _, c in rows for s in c.seconds))  # (in the order they first ran)
    return {"request_ms": statistics.median(t for t, _ in rows), "request_ms_passes": [t for t, _ in rows],
            "stages_ms": {s: statistics.median(c.seconds.get(s, 0.0) * 1e3 for _, c in rows) for s in stages},
            "calls": {s: statistics.median(c.calls.get(s, 0) for _, c in rows) for s in stages}}


def _alternate(passes: dict[str, Callable[[_Clock], float]], repeats: int) -> dict[str, dict[str, Any]]:
    """``repeats`` timed passes of each side, in alternating order (as ``paired_speedup``: the
    machine's speed drifts by tens of percent from one minute to the next), each summarized."""
    rows: dict[str, list[tuple[float, _Clock]]] = {side: [] for side in passes}
    for r in range(max(1, repeats)):
        for side in (list(passes) if r % 2 == 0 else list(passes)[::-1]):
            clock = _Clock()
            rows[side].append((passes[side](clock), clock))
    return {side: _summary(rows[side]) for side in passes}


def _per_request(clock: _Clock, n: int) -> None:
    for s in clock.seconds:
        clock.seconds[s] /= n
        clock.calls[s] /= n


def student_pass(model_dir: str | Path, pairs: list[tuple[bytes, str]],
                 backend: str = "auto") -> tuple[Callable[[_Clock], float], dict[str, Any]]:
    """A loaded, warmed-up student (on the CPU) and one timed pass over ``pairs`` at batch 1 (ms a request)."""
    from distillery.students.serving.folder import student_dir
    from distillery.images import read_image
    from distillery.students.serving.predictor import StudentPredictor

    p = StudentPredictor.load(student_dir(model_dir), backend=backend)
    requests = [[{"image": img, "question": q}] for img, q in pairs]
    for req in requests:  # warm-up: lazy init, caches, input shapes
        p.predict(req)

    def run_pass(clock: _Clock) -> float:
        p.prepare = clock.wrap("prepare: decode, resize, tokenize", type(p).prepare.__get__(p))
        if p.runner is not None:
            r = p.runner
            r.vision = _Session(getattr(r.vision, "_session", r.vision), clock, "vision graph")
            r.text = _Session(getattr(r.text, "_session", r.text), clock, "text graph (beside the detection post)")
            r.step_session = _Session(getattr(r.step_session, "_session", r.step_session), clock, "greedy steps")
        else:
            p.model.predict_raw = clock.wrap("model forward (torch)", type(p.model).predict_raw.__get__(p.model))
        for head in p.model.heads.values():
            stage = "text heads' post" if head.reads_text else "detection post (beside the text graph)"
            object.__setattr__(head, "postprocess", clock.wrap(stage, type(head).postprocess.__get__(head)))
        t0 = time.perf_counter()
        for req in requests:
            p.predict(req)
        total = time.perf_counter() - t0
        decode = clock.wrap("of which: image decode", lambda img: read_image(img, "breakdown").load())
        for img, _ in pairs:  # the PNG decode alone (prepare does it too), outside the request's clock
            decode(img)
        _per_request(clock, len(requests))
        return total / len(requests) * 1e3

    return run_pass, {"side": "student", "backend": p.backend}


def graph_pass(spec, pairs: list[tuple[bytes, str]]) -> tuple[Callable[[_Clock], float], dict[str, Any]]:
    """The loaded teacher graph (every node on the CPU), warmed up, and one timed pass over
    ``pairs`` at batch 1 as the recorder runs it, node by node (ms a request)."""
    from distillery.students.evaluation.efficiency import requests_of, spec_on_device
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.record import run_shard

    graph = TeacherGraph(spec_on_device(spec, "cpu").teachers).load()
    shards = [requests_of([pair]) for pair in pairs]
    for shard in shards:
        run_shard(graph, shard)

    def run_pass(clock: _Clock) -> float:
        t0 = time.perf_counter()
        for shard in shards:
            (rec,) = run_shard(graph, shard)
            if rec.status != "ok":
                raise RuntimeError(f"the teacher graph failed on an input: {rec.detail}")
            for node in graph.order:
                clock.seconds[f"node {node}"] += rec.timings.get(node, 0.0)
                clock.calls[f"node {node}"] += 1
        total = time.perf_counter() - t0
        decode = clock.wrap("of which: image decode", lambda shard: shard[0].image())
        for shard in shards:  # the decode that run_shard does once a request, outside the nodes
            decode(shard)
        _per_request(clock, len(shards))
        return total / len(shards) * 1e3

    return run_pass, {"side": "graph", "nodes": list(graph.order)}


def student_breakdown(model_dir: str | Path, pairs: list[tuple[bytes, str]], repeats: int = 3,
                      backend: str = "auto") -> dict[str, Any]:
    """The student's batch-1 request alone, stage by stage (ms a request, medians of ``repeats``)."""
    run, info = student_pass(model_dir, pairs, backend)
    return {**info, **_alternate({"student": run}, repeats)["student"]}


def breakdown(model_dir: str | Path, spec, images: Sequence, questions: Sequence[str], repeats: int = 5,
              backend: str = "auto") -> dict[str, Any]:
    """Both sides' breakdowns on the CPU, on the same inputs in alternating passes; the speed-up
    (the median of the passes' ratios, as ``paired_speedup``) and the student's budget for the goal."""
    from distillery.students.evaluation.efficiency import read_inputs

    pairs = read_inputs(images, questions)
    (g_run, g_info), (s_run, s_info) = graph_pass(spec, pairs), student_pass(model_dir, pairs, backend)
    res = _alternate({"graph": g_run, "student": s_run}, repeats)
    graph, student = {**g_info, **res["graph"]}, {**s_info, **res["student"]}
    ratios = [g / s for g, s in zip(graph["request_ms_passes"], student["request_ms_passes"])]
    return {"student": student, "graph": graph, "device": "cpu", "speedup": statistics.median(ratios),
            "speedups": ratios, "goal": GOAL_SPEEDUP_B1, "student_budget_ms": graph["request_ms"] / GOAL_SPEEDUP_B1}


def report(res: dict[str, Any]) -> None:
    for side in ("graph", "student"):
        b = res[side]
        name = f"student ({b['backend']})" if side == "student" else "teacher graph"
        print(f"{name}: {b['request_ms']:.2f} ms per batch-1 request")
        for stage, ms in b["stages_ms"].items():
            calls = b["calls"][stage]
            print(f"  {stage:<42s} {ms:7.2f} ms  {100 * ms / b['request_ms']:5.1f}%"
                  + (f"  ({calls:.1f} calls)" if calls > 1 else ""))
    s = res["student"]["stages_ms"]
    decode = s.get("of which: image decode", float("nan"))
    print(f"speed-up (median of the passes' ratios) {res['speedup']:.1f}x; for {res['goal']:.0f}x the student may take "
          f"{res['student_budget_ms']:.2f} ms a request, of which its image decode alone takes {decode:.2f} ms")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__)
    ap.add_argument("--inputs", type=int, default=16, help="distinct test requests to time on")
    ap.add_argument("--repeats", type=int, default=5, help="alternating passes of each side; medians are shown")
    args = ap.parse_args(argv)
    student, world, spec = prepared(args)
    res = breakdown(student, spec, *test_inputs(world, args.inputs), repeats=args.repeats)
    report(res)
    return res


if __name__ == "__main__":
    main()
