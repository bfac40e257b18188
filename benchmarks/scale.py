"""What distillation buys at realistic scale: a teacher graph of the sizes real teams run against
the student the project builds for it, and the demo's graph and student beside them.

    python -m benchmarks.scale [--quick] [--workdir DIR] [--demo-workdir DIR] [--no-demo]

The graph (``benchmarks.scale_build``, offline, random weights: timing only): YOLO11n-seg from
Ultralytics' model YAML at 640 px -> all-MiniLM-L6-v2 (the real one) + FAISS over 100,000
synthetic documents -> a Qwen2.5-0.5B-shaped Qwen2 writing exactly 128 new tokens, in float32 and
in bfloat16 (each ratio takes the teacher at its best for that figure: the faster dtype at batch 1,
the cheaper at the batch, the smaller in memory; the table names which); the retriever alone
over a flat and an HNSW index. The student: the project's StudentConfig (the demo's student
settings at 640 px, the teacher's 151,936-token vocabulary, answering directly) with random
weights, through the product's predictor (ONNX Runtime where exported, and torch).

Every side is timed in one process in alternating rounds (``benchmarks.scale_measure``): batch-1
latency (median, p90), throughput at batch 16, process CPU-seconds per 1,000 requests; peak
resident memory in a fresh process per side (the student's on the torch-free runtime where it
runs). On a machine with CUDA a GPU row follows (graph and student on the GPU, in one run).
The demo's rows need its workdir (``make demo``). ``--quick``: 10,000 documents, 16 new tokens,
fewer rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.scale_build import (
    FULL,
    QUICK,
    TINY,
    Size,
    llm_dtypes,
    make_spec,
    prepare,
    retriever_spec,
    with_size,
)
from benchmarks.scale_measure import (
    alternate,
    graph_side,
    measure_memory,
    memory_child,
    paired_ratio,
    student_side,
    student_sides,
)

GOALS = {"speedup_b1": 300.0, "cost_ratio_batch": 100.0, "memory_ratio": 10.0, "demo_student_b1_ms": 3.0}
RANDOM = "timing only, random weights"
COLUMNS = ("scale", "side", "device", "parameters", "b1 median ms", "b1 p90 ms", "batch req/s",
           "CPU-s / 1,000 req (batch; its cheapest threads)", "CPU-s / 1,000 req (b1)", "peak RSS MiB", "weights")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 documents, 16 new tokens, fewer rounds")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test's size
    ap.add_argument("--workdir", type=Path, default=None, help="where the graph, student and indexes are kept")
    ap.add_argument("--demo-workdir", type=Path, default=None, help="the demo's workdir (default: the demo's own)")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo's rows")
    ap.add_argument("--rounds", type=int, default=None, help="alternating batch-1 rounds")
    ap.add_argument("--batch-rounds", type=int, default=None, help="alternating rounds at the throughput batch")
    return ap.parse_args(argv)


def size_of(args) -> tuple[Size, str]:
    size, name = (TINY, "tiny") if args.tiny else (QUICK, "quick") if args.quick else (FULL, "full")
    changes = {k: v for k, v in (("rounds", args.rounds), ("batch_rounds", args.batch_rounds)) if v is not None}
    return with_size(size, **changes), name


def inputs_of(folder: Path, n: int) -> tuple[list[tuple[bytes, str]], list[Path]]:
    reqs = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines()][:n]
    return [((folder / r["image"]).read_bytes(), r["question"]) for r in reqs], [folder / r["image"] for r in reqs]


def realistic(work: Path, size: Size, log=print) -> dict[str, Any]:
    """The realistic-scale sides on the CPU, timed together; peak memory of the best graph and the student."""
    built = prepare(work, size)
    log(f"built/reused the graph and student in {work} ({built['build_s']:.0f} s)")
    pairs, images = inputs_of(built["inputs"], size.inputs)
    sides = student_sides("student", built["student"], "cpu", len(pairs), pairs[:1], log)
    student = sides[0]
    graphs = {dt: graph_side(f"teacher graph (llm {dt})", make_spec(work, size, dt), "cpu", f"llm {dt}")
              for dt in llm_dtypes()}
    retrievers = [graph_side(f"retriever only ({ix})", retriever_spec(work, size, ix), "cpu", ix)
                  for ix in (("flat", "hnsw") if size.hnsw else ("flat",))]
    for r in retrievers:
        r.b1_requests = len(pairs)
    sides += [*graphs.values(), *retrievers]
    per_round = alternate(sides, pairs, size.batch, size.rounds, size.batch_rounds, log)
    best = min(graphs, key=lambda dt: _median(graphs[dt].b1_s))
    for dt, side in graphs.items():  # each dtype's memory: the ratio takes the teacher's smallest
        spec_json = work / f"spec-{dt}.json"
        spec_json.write_text(json.dumps(make_spec(work, size, dt).model_dump(mode="json")))
        measure_memory(side, "graph", spec_json, images[0], pairs[0][1])
    measure_memory(student, "student", built["student"], images[0], pairs[0][1])
    return {"sides": sides, "per_round": per_round, "student": student, "graph": graphs[best], "best_dtype": best,
            "graphs": list(graphs.values()), "pairs": pairs, "work": work, "built": built}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def demo(args, size: Size, work: Path, log=print) -> dict[str, Any] | None:
    """The demo's graph and pulled student, timed as the realistic sides are (None without ``make demo``)."""
    from distillery.demo.pipeline import default_workdir

    workdir = Path(args.demo_workdir or default_workdir()).resolve()
    report = workdir / "report.json"
    rep = json.loads(report.read_text()) if report.is_file() else {}
    pulled = rep.get("paths", {}).get("pulled_student")
    if rep.get("preset") != "full" or not pulled or not Path(pulled).exists():
        log(f"demo rows skipped: no full demo with a pulled student in {workdir} (they need `make demo`)")
        return None
    from distillery.demo.fidelity import demo_setup

    from benchmarks.common import test_inputs

    world, spec = demo_setup(workdir, "full")
    images, questions = test_inputs(world, 16)
    pairs = [(Path(i).read_bytes(), q) for i, q in zip(images, questions)]
    students = student_sides("demo student", Path(pulled), "cpu", len(pairs), pairs[:1], log)
    student = students[0]
    graph = graph_side("demo teacher graph", spec, "cpu", "trained")
    graph.b1_requests = len(pairs)
    per_round = alternate([*students, graph], pairs, 16, max(size.rounds, 3), max(size.batch_rounds, 2), log)
    spec_json = work / "demo-spec.json"
    spec_json.write_text(json.dumps(spec.model_dump(mode="json")))
    measure_memory(graph, "graph", spec_json, Path(images[0]), questions[0])
    measure_memory(student, "student", Path(pulled), Path(images[0]), questions[0])
    return {"sides": [*students, graph], "per_round": per_round, "student": student, "graph": graph}


def gpu(work: Path, size: Size, pairs: list, log=print) -> dict[str, Any] | None:
    """The best graph and the torch student on the GPU, in one run (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        log("no GPU row: torch.cuda.is_available() is False")
        return None
    dtype = "bfloat16" if "bfloat16" in llm_dtypes() else "float32"
    student = student_side("student", work / "student", "cuda", "torch", b1_requests=len(pairs))
    graph = graph_side(f"teacher graph (llm {dtype})", make_spec(work, size, dtype), "cuda", f"llm {dtype}")
    per_round = alternate([student, graph], pairs, size.batch, size.rounds, size.batch_rounds, log)
    return {"sides": [student, graph], "per_round": per_round, "student": student, "graph": graph}


def _threads(fig: dict[str, Any]) -> str:
    t = fig.get("cpu_s_per_1000_batch_threads")
    return "" if t is None else " 1 thread" if t == "1" else " default threads"


def ratios(run: dict[str, Any], scale: str, batch: int) -> list[dict[str, Any]]:
    """Graph / student figures of one run, each with its goal (where the issue sets one). Each
    ratio takes the teacher at its best for that figure: the fastest dtype at batch 1 (paired
    rounds), the cheapest at the batch (each side on its default threads or on one, whichever costs
    fewer CPU-seconds), the fastest at the batch, the smallest in memory."""
    s = run["student"].figures(batch)
    graphs = [g.figures(batch) for g in run.get("graphs", [run["graph"]])]
    speed, rounds = paired_ratio(run["per_round"], run["graph"].name, run["student"].name)
    cheapest = min(graphs, key=lambda g: g["cpu_s_per_1000_batch"])
    fastest = max(graphs, key=lambda g: g["batch_rps"])
    measured = [g for g in graphs if not math.isnan(g["peak_rss_mib"])] or graphs
    smallest = min(measured, key=lambda g: g["peak_rss_mib"])
    of = (lambda g: f" {g['backend']}") if len(graphs) > 1 else (lambda g: "")
    gated = scale == "realistic (cpu)"
    rows = [(f"speed-up at batch 1 (median of alternating rounds{'; ' + run['graph'].backend if len(graphs) > 1 else ''})",
             speed, GOALS["speedup_b1"] if gated else None),
            (f"cost per request at batch {batch} (CPU-s, each at its cheapest: graph{of(cheapest)}{_threads(cheapest)} "
             f"/ student{_threads(s)})",
             cheapest["cpu_s_per_1000_batch"] / s["cpu_s_per_1000_batch"], GOALS["cost_ratio_batch"] if gated else None),
            (f"throughput at batch {batch} (student / graph{of(fastest)})", s["batch_rps"] / fastest["batch_rps"], None),
            (f"peak resident memory (graph{of(smallest)} / student)", smallest["peak_rss_mib"] / s["peak_rss_mib"],
             GOALS["memory_ratio"] if gated else None),
            ("parameters (graph / student)", graphs[0]["parameters"] / s["parameters"], None)]
    out = [{"scale": scale, "figure": f, "value": v, "goal": goal,
            "met": None if goal is None or math.isnan(v) else v >= goal} for f, v, goal in rows]
    out[0]["rounds"] = rounds
    if scale == "demo":
        ms = s["b1_median_ms"]
        out.append({"scale": scale, "figure": "student latency at batch 1 (ms, median)", "value": ms,
                    "goal": GOALS["demo_student_b1_ms"], "met": ms <= GOALS["demo_student_b1_ms"],
                    "note": "reported, not gated"})
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(rows: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> str:
    """The markdown for benchmarks/RESULTS.md: one row per side, then the ratios and goals."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["scale"], r["side"], r["device"], _fmt(r["parameters"]), _fmt(r["b1_median_ms"], 2),
                 _fmt(r["b1_p90_ms"], 2), _fmt(r["batch_rps"], 2), _fmt(r["cpu_s_per_1000_batch"]),
                 _fmt(r["cpu_s_per_1000_b1"]), _fmt(r["peak_rss_mib"], 0), r["weights"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| scale | graph / student | value | goal | met |", "|---|---|---|---|---|"]
    for r in ratio_rows:
        goal = "" if r["goal"] is None else (f"<= {r['goal']:g} ms" if "ms" in r["figure"] else f">= {r['goal']:g}x")
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO") + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['scale']} | {r['figure']} | {_fmt(r['value'], 2 if 'ms' in r['figure'] else 1)} "
                     f"| {goal} | {met} |")
    return "\n".join(lines)


def collect(scale: str, device: str, run: dict[str, Any], batch: int, weights: str) -> list[dict[str, Any]]:
    return [{**side.figures(batch), "scale": scale, "device": device, "weights": weights} for side in run["sides"]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    t0 = time.perf_counter()
    from distillery import runtime

    runtime.configure()
    size, name = size_of(args)
    suffix = "" if name == "full" else f"-{name}"
    work = Path(args.workdir or runtime.data_dir() / f"scale-benchmark{suffix}").resolve()
    print(f"scale benchmark ({name}): {size.documents:,} documents, {size.new_tokens} new tokens, "
          f"{size.rounds} batch-1 rounds, {size.batch_rounds} at batch {size.batch}; {RANDOM}", flush=True)
    log = lambda msg: print(msg, flush=True)
    real = realistic(work, size, lambda msg: log(f"{msg} ({RANDOM})"))
    rows = collect("realistic", "cpu", real, size.batch, RANDOM)
    ratio_rows = ratios(real, "realistic (cpu)", size.batch)
    dm = None if args.no_demo else demo(args, size, work, log)
    if dm is not None:
        rows += collect("demo", "cpu", dm, 16, "trained (demo)")
        ratio_rows += ratios(dm, "demo", 16)
    gp = gpu(work, size, real["pairs"], log)
    if gp is not None:
        rows += collect("realistic", "cuda", gp, size.batch, RANDOM)
        ratio_rows += ratios(gp, "realistic (cuda)", size.batch)
    text = table(rows, ratio_rows)
    seconds = time.perf_counter() - t0
    print(f"\nteacher LLM at its best on this CPU: {real['best_dtype']} (faster at batch 1; the ratios use it)")
    for side in real["sides"] + (dm["sides"] if dm else []):
        if side.memory_note:
            print(f"peak memory of {side.name}: {side.memory_note}")
    print(f"\n{text}\n\n({RANDOM} on the realistic rows; {seconds:.0f} s in all)", flush=True)
    return {"size": name, "rows": rows, "ratios": ratio_rows, "table": text, "best_dtype": real["best_dtype"],
            "seconds": seconds, "demo": dm is not None, "gpu": gp is not None}


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--memory-child"]:
        memory_child(sys.argv[2:])
    else:
        main()
