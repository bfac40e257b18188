"""Efficiency: parameters, peak memory and latency of a student and of the teacher graph it replaces.

    student = measure_student("out/student", images, questions)
    graph = measure_graph(spec, images, questions)
    compare(student, graph)  # {"speedup_batch1": .., "speedup_batch16": .., "param_ratio": .., ...}

Both sides answer the same requests (image bytes + question) in the same process, so the ratios
compare like with like on this machine:

* ``parameters``: every torch parameter of every model (student: the one model; graph: each
  node's models, e.g. YOLO + MiniLM + the LLM), counted once even if shared; ``weights_bytes``
  their storage.
* ``peak_memory_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` over load + runs; on CPU the
  peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS
  before loading: the memory the model and its activations cost this process (never less than
  the weights' bytes: memory freed earlier in the process is reused without growing the RSS).
* ``latency_b{B}_s``: seconds per image when answering batches of B requests (every input once
  per pass, the median of ``repeats`` passes after one untimed pass), from encoded image bytes to
  outputs (decode included on both sides). The graph runs exactly as the recorder does
  (``teachers.record.run_shard``: every node in topological order over the batch, each in its
  own ``batch_size``).
* ``paired_speedup``: the speed-up read in alternating student / graph rounds (median ratio), the
  figure to trust on a machine whose speed drifts between two measurements.
* ``device``: where both sides ran. ``device=`` puts the student and every teacher node there
  (each node's ``device`` setting is overridden), so a CPU figure is a CPU figure even on a
  machine with a GPU; without it each side picks CUDA when present.
"""

from __future__ import annotations

import gc
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from distillery.runtime import resolve_device
from distillery.teachers.records import Request, make_input_id

BATCH_SIZES = (1, 16)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def read_inputs(images: Sequence[str | Path | bytes], questions: Sequence[str]) -> list[tuple[bytes, str]]:
    """(image bytes, question) pairs; images are paths or encoded bytes."""
    if len(images) != len(questions):
        raise ValueError(f"efficiency: {len(images)} images for {len(questions)} questions")
    if not images:
        raise ValueError("efficiency: no inputs to measure on (images and questions are empty)")
    pairs = []
    for i, (img, q) in enumerate(zip(images, questions)):
        if isinstance(img, (str, Path)):
            if not Path(img).is_file():
                raise ValueError(f"efficiency: input {i}: image {img} is not a file")
            img = Path(img).read_bytes()
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"efficiency: input {i}: the question must be a non-empty string")
        pairs.append((bytes(img), q))
    return pairs


def take(pairs: list, n: int) -> list:
    """The first ``n`` items, cycling when there are fewer (a batch of 16 from 8 inputs)."""
    return [pairs[i % len(pairs)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def count_parameters(modules: Iterable[torch.nn.Module]) -> tuple[int, int]:
    """(parameters, bytes) over all modules, each parameter tensor counted once."""
    seen: dict[int, torch.Tensor] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return sum(p.numel() for p in seen.values()), sum(p.numel() * p.element_size() for p in seen.values())


def _rss_kib(field: str) -> int | None:
    try:
        m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak memory of what runs inside the ``with`` block, in bytes (``.peak``), see module doc."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss_peak_delta"
        self.peak = 0
        self._samples: list[int] = []
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = (_rss_kib("VmRSS") or 0) * 1024
        self.hwm = self._reset_hwm()
        if not self.hwm:  # no resettable VmHWM: sample the RSS every 5 ms instead
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _reset_hwm(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _rss_kib("VmHWM") is not None
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._samples.append((_rss_kib("VmRSS") or 0) * 1024)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.hwm:
            self.peak = (_rss_kib("VmHWM") or 0) * 1024 - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._samples or [self.base]) - self.base
        self.peak = max(int(self.peak), 0)


def time_per_image(run: Callable[[list], Any], pairs: list, batch_sizes: Sequence[int], repeats: int,
                   device: torch.device, warmup: bool = True) -> dict[str, float]:
    """``{"latency_b{B}_s": seconds per image}`` for each batch size: one pass over every input in
    batches of B (at least one full batch, cycling), after one untimed pass; the median of
    ``repeats`` passes. Every input counts, not the first one alone (inputs differ in their number
    of objects, and so in the work after the forward pass)."""
    out = {}
    for b in batch_sizes:
        items = take(pairs, max(b, len(pairs) // b * b))  # whole batches only
        batches = [items[i:i + b] for i in range(0, len(items), b)]
        for batch in batches if warmup else []:  # warm-up: lazy init, caches, allocator, input shapes
            run(batch)
        times = []
        for _ in range(max(1, repeats)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for batch in batches:
                run(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / len(items))
        out[f"latency_b{b}_s"] = statistics.median(times)
    return out


def spec_on_device(spec, device: str | torch.device):
    """A copy of ``spec`` whose every teacher node runs on ``device`` (YOLO, embedder, LLM)."""
    teachers = {name: cfg.model_copy(update={"device": str(device)}) for name, cfg in spec.teachers.items()}
    return spec.model_copy(update={"teachers": teachers})


def measure_student(model_dir: str | Path, images: Sequence[str | Path | bytes], questions: Sequence[str],
                    batch_sizes: Sequence[int] = BATCH_SIZES, repeats: int = 5,
                    device: str | torch.device | None = None, backend: str = "auto") -> dict[str, Any]:
    """Parameters, peak memory and per-image latency of a saved student (a folder or a pulled one),
    on ``backend`` (``StudentPredictor.load``: auto, torch, onnx, onnx-int8; the result names it)."""
    from distillery.students.serving.folder import student_dir
    from distillery.students.serving.predictor import StudentPredictor

    pairs = read_inputs(images, questions)
    device = resolve_device(device)
    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        predictor = StudentPredictor.load(student_dir(model_dir), device=device, backend=backend)
        load_s = time.perf_counter() - t0
        run = lambda batch: predictor.predict([{"image": img, "question": q} for img, q in batch])  # noqa: E731
        lat = time_per_image(run, pairs, batch_sizes, repeats, device)
    params, nbytes = count_parameters([predictor.model])
    result = {"what": "student", "backend": predictor.backend, "parameters": params, "weights_bytes": nbytes,
              "peak_memory_bytes": max(mem.peak, nbytes),
              "memory_kind": mem.kind, "device": str(device), "load_s": load_s, "inputs": len(pairs),
              "repeats": repeats, **lat}
    del predictor
    gc.collect()
    return result


def graph_modules(graph) -> list[torch.nn.Module]:
    """Every torch module a loaded graph's nodes hold (YOLO, the sentence embedder, the LLM...)."""
    modules = []
    for node in graph.nodes.values():
        modules.extend(v for v in vars(node).values() if isinstance(v, torch.nn.Module))
    return modules


def requests_of(pairs: list[tuple[bytes, str]]) -> list[Request]:
    return [Request(input_id=make_input_id(img, q), image_path=f"input-{i}", image_bytes=img, question=q)
            for i, (img, q) in enumerate(pairs)]


def measure_graph(spec, images: Sequence[str | Path | bytes], questions: Sequence[str],
                  batch_sizes: Sequence[int] = BATCH_SIZES, repeats: int = 3,
                  device: str | torch.device | None = None) -> dict[str, Any]:
    """The same figures for the spec's whole teacher graph, run as the recorder runs it; with
    ``device``, every node is forced onto it (see ``spec_on_device``)."""
    from distillery.teachers.graph import TeacherGraph

    pairs = read_inputs(images, questions)
    if device is not None:
        spec = spec_on_device(spec, device)
    device = resolve_device(device)

    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        graph = TeacherGraph(spec.teachers).load()
        load_s = time.perf_counter() - t0
        lat = time_per_image(graph_runner(graph), pairs, batch_sizes, repeats, device)
    modules = graph_modules(graph)
    params, nbytes = count_parameters(modules)
    result = {"what": "teacher graph", "nodes": list(graph.order), "parameters": params, "weights_bytes": nbytes,
              "parameters_by_node": {n: count_parameters(graph_modules_of(graph, n))[0] for n in graph.order},
              "peak_memory_bytes": max(mem.peak, nbytes), "memory_kind": mem.kind, "device": str(device), "load_s": load_s,
              "inputs": len(pairs), "repeats": repeats, **lat}
    del graph, modules
    gc.collect()
    return result


def graph_runner(graph) -> Callable[[list], None]:
    """Run a loaded graph over a batch of (image bytes, question) as the recorder does."""
    from distillery.teachers.record import run_shard

    def run(batch: list) -> None:
        recs = run_shard(graph, requests_of(batch))
        failed = [r.detail for r in recs if r.status != "ok"]
        if failed:
            raise RuntimeError(f"the teacher graph failed on an input: {failed[0]}")

    return run


def paired_speedup(model_dir: str | Path, spec, images: Sequence, questions: Sequence[str], rounds: int = 5,
                   batch_size: int = 1, device: str | torch.device | None = None,
                   backend: str = "auto") -> dict[str, Any]:
    """The batch-``batch_size`` speed-up in alternating rounds: each round times one pass of the
    student and one of the graph over the same inputs, in alternating order, so a change in the
    machine's speed between two measurements (a shared 2-core machine swings by 20-50% from one
    minute to the next) hits both sides of a ratio. Returns the median ratio and every round's."""
    from distillery.students.serving.folder import student_dir
    from distillery.students.serving.predictor import StudentPredictor
    from distillery.teachers.graph import TeacherGraph

    pairs = read_inputs(images, questions)
    if device is not None:
        spec = spec_on_device(spec, device)
    device = resolve_device(device)
    predictor = StudentPredictor.load(student_dir(model_dir), device=device, backend=backend)
    graph = TeacherGraph(spec.teachers).load()
    runs = {"student": lambda batch: predictor.predict([{"image": img, "question": q} for img, q in batch]),
            "graph": graph_runner(graph)}
    key = f"latency_b{batch_size}_s"
    times: dict[str, list[float]] = {"student": [], "graph": []}
    for side, run in runs.items():  # one untimed pass each
        time_per_image(run, pairs, [batch_size], 1, device)
    for r in range(max(1, rounds)):
        for side in (("student", "graph") if r % 2 == 0 else ("graph", "student")):
            times[side].append(time_per_image(runs[side], pairs, [batch_size], 1, device, warmup=False)[key])
    ratios = [g / s for s, g in zip(times["student"], times["graph"])]
    return {"batch_size": batch_size, "rounds": len(ratios), "backend": predictor.backend,
            "speedup": statistics.median(ratios), "speedups": ratios, "student_s": times["student"],
            "graph_s": times["graph"], "student_parameters": count_parameters([predictor.model])[0],
            "graph_parameters": count_parameters(graph_modules(graph))[0]}


def graph_modules_of(graph, name: str) -> list[torch.nn.Module]:
    return [v for v in vars(graph.nodes[name]).values() if isinstance(v, torch.nn.Module)]


def compare(student: dict[str, Any], graph: dict[str, Any]) -> dict[str, float]:
    """Graph / student ratios: ``speedup_batch{B}`` (latency), ``param_ratio``, ``memory_ratio``."""
    out: dict[str, float] = {}
    for key in sorted(k for k in student if k.startswith("latency_b") and k in graph):
        b = key[len("latency_b"):-len("_s")]
        out[f"speedup_batch{b}"] = graph[key] / student[key] if student[key] > 0 else float("inf")
    out["param_ratio"] = graph["parameters"] / max(student["parameters"], 1)
    out["weights_ratio"] = graph["weights_bytes"] / max(student["weights_bytes"], 1)
    out["memory_ratio"] = graph["peak_memory_bytes"] / max(student["peak_memory_bytes"], 1)
    return out


def measure(model_dir: str | Path, spec, images: Sequence, questions: Sequence[str],
            batch_sizes: Sequence[int] = BATCH_SIZES, repeats: int = 5, graph_repeats: int = 3,
            device: str | torch.device | None = None, backend: str = "auto") -> dict[str, Any]:
    """Student and graph in one process run, both on ``device``: ``{"student", "graph", "ratios",
    "device"}``."""
    student = measure_student(model_dir, images, questions, batch_sizes, repeats, device, backend)
    graph = measure_graph(spec, images, questions, batch_sizes, graph_repeats, device)
    return {"student": student, "graph": graph, "ratios": compare(student, graph), "device": student["device"]}
