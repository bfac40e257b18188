"""Efficiency figures on the tiny demo: a real (tiny) student and the real teacher graph (YOLO +
MiniLM + LLM) answer the same requests in one process; parameters, memory and latency are
positive and the ratios are the quotients of the measured figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.students.evaluation.efficiency import PeakMemory, compare, measure, read_inputs, spec_on_device, take


@pytest.fixture(scope="module")
def measured(tiny_demo, tmp_path_factory):
    from distillery.flows.spec import load_spec
    from student_support import tiny_config
    from distillery.students.data import build_schema, load_tokenizer
    from distillery.students.model.student import MultimodalStudent
    from distillery.teachers.record import record
    from distillery.teachers.store import TraceStore

    world, spec = tiny_demo["world"], load_spec(tiny_demo["spec_path"])
    traces = str(tmp_path_factory.mktemp("eff") / "traces.lance")
    record(spec, str(world.split_dir("test")), traces)
    schema = build_schema(spec, TraceStore(traces).read(status="ok"))
    torch.manual_seed(0)
    model = MultimodalStudent(tiny_config(), schema)
    model.tokenizer = load_tokenizer(schema)
    folder = model.save_pretrained(tmp_path_factory.mktemp("student") / "student")
    reqs = world.annotations("test")["requests"][:3]
    images = [world.split_dir("test") / r["image"] for r in reqs]
    res = measure(folder, spec, images, [r["question"] for r in reqs], batch_sizes=(1, 4), repeats=2, graph_repeats=1,
                  device="cpu")
    return res, MultimodalStudent.from_pretrained(folder), spec, (folder, images, [r["question"] for r in reqs])


def test_figures_are_positive_and_count_every_model(measured):
    res, model, _, _ = measured
    student, graph = res["student"], res["graph"]
    assert student["parameters"] == pytest.approx(sum(p.numel() for p in model.parameters()), rel=0.01)
    assert set(graph["parameters_by_node"]) == {"detector", "retriever", "reasoner"}
    assert all(v > 0 for v in graph["parameters_by_node"].values())  # YOLO, MiniLM and the LLM all counted
    assert graph["parameters"] == sum(graph["parameters_by_node"].values())
    for side in (student, graph):
        assert side["peak_memory_bytes"] >= side["weights_bytes"] > 0
        assert side["latency_b1_s"] > 0 and side["latency_b4_s"] > 0


def test_ratios_are_graph_over_student(measured):
    res, _, _, _ = measured
    s, g, r = res["student"], res["graph"], res["ratios"]
    assert r["speedup_batch1"] == pytest.approx(g["latency_b1_s"] / s["latency_b1_s"])
    assert r["speedup_batch4"] == pytest.approx(g["latency_b4_s"] / s["latency_b4_s"])
    assert r["param_ratio"] == pytest.approx(g["parameters"] / s["parameters"])
    assert r["memory_ratio"] == pytest.approx(g["peak_memory_bytes"] / s["peak_memory_bytes"])
    assert r["param_ratio"] > 1  # the graph (MiniLM alone: 22M) dwarfs the tiny student


def test_both_sides_run_and_report_the_requested_device(measured):
    res, _, spec, _ = measured
    assert res["device"] == res["student"]["device"] == res["graph"]["device"] == "cpu"
    assert res["student"]["memory_kind"] == res["graph"]["memory_kind"] == "rss_peak_delta"
    forced = spec_on_device(spec, "cpu")  # what measure_graph loads: every node on the CPU, even with a GPU
    assert {name: cfg.device for name, cfg in forced.teachers.items()} == {n: "cpu" for n in spec.teachers}
    assert all(cfg.device is None for cfg in spec.teachers.values())  # the caller's spec is left as it was


def test_paired_speedup_alternates_rounds_and_takes_the_median(measured):
    from distillery.students.evaluation.efficiency import paired_speedup

    _, _, spec, (folder, images, questions) = measured
    res = paired_speedup(folder, spec, images, questions, rounds=3, device="cpu", backend="torch")
    assert res["rounds"] == 3 and len(res["student_s"]) == len(res["graph_s"]) == 3
    assert all(s > 0 for s in res["student_s"] + res["graph_s"])
    assert res["speedups"] == [g / s for s, g in zip(res["student_s"], res["graph_s"])]
    assert res["speedup"] == sorted(res["speedups"])[1] and res["backend"] == "torch"
    assert res["graph_parameters"] > res["student_parameters"] > 0


def test_compare_on_known_figures():
    s = {"latency_b1_s": 0.01, "latency_b16_s": 0.002, "parameters": 10, "weights_bytes": 40, "peak_memory_bytes": 100}
    g = {"latency_b1_s": 0.5, "latency_b16_s": 0.1, "parameters": 1000, "weights_bytes": 4000, "peak_memory_bytes": 800}
    assert compare(s, g) == pytest.approx({"speedup_batch1": 50.0, "speedup_batch16": 50.0, "param_ratio": 100.0,
                                           "weights_ratio": 100.0, "memory_ratio": 8.0})


def test_peak_memory_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        block = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched
        del block
    assert mem.peak >= 48 * 2**20


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="2 images for 1 questions"):
        read_inputs([b"a", b"b"], ["q"])
    with pytest.raises(ValueError, match="input 0: image .*missing.png is not a file"):
        read_inputs([tmp_path / "missing.png"], ["q"])
    with pytest.raises(ValueError, match="input 0: the question"):
        read_inputs([b"x"], [" "])
    assert take([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]


def test_breakdown_times_every_graph_node_and_the_student_stages(measured):
    """``benchmarks.breakdown`` on the real (tiny) graph and the torch student: every node of the
    graph and every stage of the student is timed inside its real run; the stages that run one
    after the other fit in the request, and the image decode is part of the student's prepare."""
    from benchmarks.breakdown import breakdown

    _, _, spec, (folder, images, questions) = measured
    res = breakdown(folder, spec, images, questions, repeats=2, backend="torch")
    graph, student = res["graph"], res["student"]
    nodes = [f"node {n}" for n in graph["nodes"]]
    assert set(graph["nodes"]) == {"detector", "retriever", "reasoner"}
    assert all(graph["stages_ms"][n] > 0 for n in nodes)
    assert sum(graph["stages_ms"][n] for n in nodes) <= graph["request_ms"] * 1.05
    s = student["stages_ms"]
    assert student["backend"] == "torch"
    assert {"prepare: decode, resize, tokenize", "model forward (torch)", "of which: image decode"} <= set(s)
    assert all(v > 0 for v in s.values())
    serial = s["prepare: decode, resize, tokenize"] + s["model forward (torch)"]
    assert serial <= student["request_ms"] * 1.05
    assert s["of which: image decode"] < s["prepare: decode, resize, tokenize"]
    assert res["speedups"] == [g / s for g, s in zip(graph["request_ms_passes"], student["request_ms_passes"])]
    assert len(res["speedups"]) == 2 and res["speedup"] == pytest.approx(sum(res["speedups"]) / 2)
    assert res["student_budget_ms"] == pytest.approx(graph["request_ms"] / 20)
