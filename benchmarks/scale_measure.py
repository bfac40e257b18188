"""How ``benchmarks.scale`` measures: sides (a loaded teacher graph or student answering batches of
(image bytes, question)), timed in alternating rounds in one process, and each side's peak
resident memory in a fresh subprocess of its own.

Per side: latency at batch 1 (every request timed alone; median and p90 over the rounds), the
throughput at batch ``B`` (requests a second, median over the rounds), and the process CPU time
(``time.process_time``: every thread of this process, so a busy neighbour on a shared machine
does not inflate it) per 1,000 requests, at batch 1 and at batch ``B``. The graph runs as the
recorder runs it and the student through the product's predictor (``students.evaluation.efficiency``).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_MEMORY = float("nan")


@dataclass
class Side:
    """One thing that answers requests: ``run(batch)`` over (image bytes, question) pairs."""

    name: str
    run: Callable[[list], Any]
    parameters: int
    backend: str
    b1_requests: int = 1  # requests timed alone per round (the costly graphs: one)
    sync: Callable[[], None] = lambda: None  # torch.cuda.synchronize on a GPU
    b1_s: list[float] = field(default_factory=list)
    b1_cpu_s: list[float] = field(default_factory=list)
    batch_s: list[float] = field(default_factory=list)  # seconds per request at batch B, per round
    batch_cpu_s: list[float] = field(default_factory=list)
    one_thread: Callable[[list], Any] | None = None  # run(batch) on one CPU thread (a CPU side's cheapest)
    one_thread_cold: bool = False  # one_thread runs other objects than run (the runtime's): warm them first
    batch_cpu_1t_s: list[float] = field(default_factory=list)  # CPU seconds per request at batch B, one thread
    peak_rss_bytes: float = NO_MEMORY
    memory_note: str = ""

    def figures(self, batch: int) -> dict[str, Any]:
        """The side's figures; its cost at the batch is the cheaper of its default threads and one
        thread (``cpu_s_per_1000_batch_threads`` says which; both are kept)."""
        b1 = sorted(self.b1_s)
        costs = {"default": statistics.median(self.batch_cpu_s) * 1e3}
        if self.batch_cpu_1t_s:
            costs["1"] = statistics.median(self.batch_cpu_1t_s) * 1e3
        cheapest = min(costs, key=costs.get)
        return {"side": self.name, "backend": self.backend, "parameters": self.parameters,
                "b1_median_ms": statistics.median(b1) * 1e3, "b1_p90_ms": percentile(b1, 0.9) * 1e3,
                "batch": batch, "batch_rps": 1.0 / statistics.median(self.batch_s),
                "cpu_s_per_1000_b1": statistics.median(self.b1_cpu_s) * 1e3,
                "cpu_s_per_1000_batch": costs[cheapest], "cpu_s_per_1000_batch_threads": cheapest,
                "cpu_s_per_1000_batch_by_threads": costs,
                "peak_rss_mib": self.peak_rss_bytes / 2**20, "memory_note": self.memory_note,
                "b1_samples": len(b1)}


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default) of sorted values."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def graph_side(name: str, spec, device: str, backend: str) -> Side:
    """The spec's teacher graph, every node on ``device``, loaded."""
    from distillery.students.evaluation.efficiency import (
        count_parameters,
        graph_modules,
        graph_runner,
        spec_on_device,
    )
    from distillery.teachers.graph import TeacherGraph

    graph = TeacherGraph(spec_on_device(spec, device).teachers).load()
    side = Side(name, graph_runner(graph), count_parameters(graph_modules(graph))[0], backend, sync=_sync(device))
    side.graph = graph  # (kept alive with the side)
    side.one_thread = _on_one_torch_thread(side.run) if device == "cpu" else None
    return side


def _on_one_torch_thread(run: Callable[[list], Any]) -> Callable[[list], Any]:
    from distillery.runtime import torch_threads

    def one(batch: list) -> Any:
        with torch_threads(1):
            return run(batch)

    return one


def student_side(name: str, folder: Path, device: str, backend: str, b1_requests: int) -> Side:
    """The student through the product's predictor (``backend``: auto, torch, onnx)."""
    from distillery.students.evaluation.efficiency import count_parameters
    from distillery.students.serving.folder import student_dir
    from distillery.students.serving.predictor import StudentPredictor

    p = StudentPredictor.load(student_dir(folder), device=device, backend=backend)
    run = lambda batch: p.predict([{"image": img, "question": q} for img, q in batch])
    side = Side(f"{name} ({p.backend})", run, count_parameters([p.model])[0], p.backend, b1_requests, _sync(device))
    side.one_thread = _on_one_torch_thread(run) if device == "cpu" and p.backend == "torch" else None
    return side


def runtime_side(name: str, folder: Path, b1_requests: int) -> Side:
    """The student on the torch-free runtime (``StudentRuntime``, its default int8 graphs): what
    ``distillery predict`` and the MLflow model run where the folder has current graphs."""
    from distillery.students.serving.folder import student_dir
    from distillery.students.serving.runtime import StudentRuntime

    rt, rt1 = StudentRuntime.load(student_dir(folder)), StudentRuntime.load(student_dir(folder), threads=1)
    run = lambda batch: rt.predict([{"image": img, "question": q} for img, q in batch])
    side = Side(f"{name} (runtime {rt.graphs})", run, 0, f"runtime {rt.graphs}", b1_requests)
    side.one_thread = lambda batch: rt1.predict([{"image": img, "question": q} for img, q in batch])
    side.one_thread_cold = True
    return side


def student_sides(name: str, folder: Path, device: str, b1_requests: int, probe: list,
                  log: Callable[[str], None] = print) -> list[Side]:
    """The student as the product deploys it (the torch-free runtime where the folder has its
    graphs, else the predictor's ``auto`` backend), then on torch too; when that fails on
    ``probe``, torch alone (logged)."""
    from distillery.students.serving.folder import student_dir
    from distillery.students.serving.graphs import runtime_ready

    torch_side = lambda: student_side(name, folder, device, "torch", b1_requests)
    try:
        if device == "cpu" and runtime_ready(student_dir(folder)):
            auto = runtime_side(name, folder, b1_requests)
            auto.run(probe)
            on_torch = torch_side()
            auto.parameters = on_torch.parameters  # (the same weights, counted on the torch student)
            return [auto, on_torch]
        auto = student_side(name, folder, device, "auto", b1_requests)
        auto.run(probe)
    except Exception as e:  # noqa: BLE001  (any failure of the deployed path: torch is measured instead)
        log(f"{name}: the predictor's auto backend failed ({type(e).__name__}: {str(e)[:200]}); torch only")
        return [torch_side()]
    return [auto] if auto.backend == "torch" else [auto, torch_side()]


def _sync(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _timed(side: Side, batch: list) -> tuple[float, float]:
    side.sync()
    w, c = time.perf_counter(), time.process_time()
    side.run(batch)
    side.sync()
    return time.perf_counter() - w, time.process_time() - c


def alternate(sides: list[Side], pairs: list, batch: int, rounds: int, batch_rounds: int,
              log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Time every side in alternating rounds (the order reversed every other round, so a drift in
    the machine's speed hits every side alike): batch 1 in ``rounds`` rounds, each side answering
    ``b1_requests`` requests alone (the next inputs in turn); then batch ``batch`` in
    ``batch_rounds`` rounds, one batch a side. One untimed request per side first, and one untimed
    batch before the batch rounds: a side's first batch pays one-off costs (ONNX Runtime's
    arena and torch's allocator growing to the batch's tensors: 55 CPU-ms a request in the
    student's first batch of 16 at 640 px against 42 in the next ones), which a single timed
    round would otherwise charge to its cost. Returns each round's seconds per batch-1 request
    by side name (for the paired ratios)."""
    from distillery.students.evaluation.efficiency import take

    for side in sides:  # warm-up: lazy init, caches, allocator
        side.run(pairs[:1])
    per_round: list[dict[str, float]] = []
    cursor = 1
    for r in range(max(1, rounds)):
        order = sides if r % 2 == 0 else sides[::-1]
        this = {}
        for side in order:
            reqs = take(pairs[cursor % len(pairs):] + pairs[:cursor % len(pairs)], side.b1_requests)
            walls = []
            for pair in reqs:
                wall, cpu = _timed(side, [pair])
                side.b1_s.append(wall)
                side.b1_cpu_s.append(cpu)
                walls.append(wall)
            this[side.name] = statistics.median(walls)
            log(f"  round {r + 1} batch 1: {side.name}: {this[side.name] * 1e3:.1f} ms a request")
        cursor += 1
        per_round.append(this)
    items = take(pairs, batch)
    for side in sides:  # warm-up at the batch size (untimed)
        side.run(items)
        log(f"  warm-up batch {batch}: {side.name}")
    for r in range(max(1, batch_rounds)):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            wall, cpu = _timed(side, items)
            side.batch_s.append(wall / batch)
            side.batch_cpu_s.append(cpu / batch)
            log(f"  round {r + 1} batch {batch}: {side.name}: {batch / wall:.2f} requests/s")
    # The cost at the batch on one thread too: a second thread makes a request faster but can cost
    # more CPU-seconds than it saves (the realistic teacher, bfloat16 at batch 16: 2.1-2.3 CPU-s a
    # request on one thread, 2.8-3.3 on two), and each side's cost is taken at its cheapest.
    cheap = [s for s in sides if s.one_thread is not None]
    for s in cheap:
        if s.one_thread_cold:
            s.one_thread(items)  # (its own sessions, warmed at the batch)
    for r in range(max(1, batch_rounds) if cheap else 0):
        for side in (cheap if r % 2 == 0 else cheap[::-1]):
            c = time.process_time()
            side.one_thread(items)
            side.batch_cpu_1t_s.append((time.process_time() - c) / batch)
            log(f"  round {r + 1} batch {batch}, one thread: {side.name}: "
                f"{side.batch_cpu_1t_s[-1] * 1e3:.1f} CPU-ms a request")
    return per_round


def paired_ratio(per_round: list[dict[str, float]], slow: str, fast: str) -> tuple[float, list[float]]:
    """Median over the rounds of slow / fast seconds a request (and every round's ratio)."""
    ratios = [r[slow] / r[fast] for r in per_round if r.get(fast)]
    return statistics.median(ratios), ratios


# -- peak memory, each side in a fresh process ------------------------------------------------------

def peak_rss() -> int:
    """This process's peak resident set (Linux VmHWM; else ru_maxrss), bytes."""
    try:
        m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(argv: list[str]) -> None:
    """In a fresh process: load one side, answer one batch-1 request, print the peak RSS as JSON.
    ``argv``: ``graph SPEC_JSON IMAGE QUESTION`` or ``student FOLDER IMAGE QUESTION``."""
    kind, source, image, question = argv
    pair = [(Path(image).read_bytes(), question)]
    if kind == "graph":
        from distillery import runtime

        runtime.configure()
        from distillery.flows.spec import Spec

        side = graph_side("graph", Spec.model_validate(json.loads(Path(source).read_text())), "cpu", "")
        side.run(pair)
        note = "load + one batch-1 request"
    else:
        try:  # the torch-free runtime (students/serving/runtime.py), as the student is deployed
            from distillery.students.serving.runtime import StudentRuntime

            rt = StudentRuntime.load(source)
            rt.predict([{"image": pair[0][0], "question": question}])
            note = f"torch-free runtime ({rt.graphs} graphs), load + one batch-1 request"
        except Exception as e:  # noqa: BLE001  (no usable runtime: the predictor in this process)
            from distillery import runtime

            runtime.configure()
            side = student_sides("student", Path(source), "cpu", 1, pair, log=lambda m: None)[0]
            side.run(pair)
            note = f"predictor ({side.backend}; the torch-free runtime failed: {type(e).__name__}: {str(e)[:160]})"
    print(json.dumps({"peak_rss_bytes": peak_rss(), "note": note, "torch_imported": "torch" in sys.modules}))


def measure_memory(side: Side, kind: str, source: Path, image: Path, question: str, timeout: float = 900) -> None:
    """Run ``memory_child`` in a fresh interpreter; its peak RSS becomes the side's."""
    cmd = [sys.executable, "-m", "benchmarks.scale", "--memory-child", kind, str(source), str(image), question]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        tail = getattr(e, "stderr", "") or ""
        side.memory_note = f"memory not measured: {type(e).__name__} {tail.strip().splitlines()[-1:]}"
        return
    side.peak_rss_bytes = float(res["peak_rss_bytes"])
    side.memory_note = res["note"] + ("" if res["torch_imported"] else ", torch never imported")
