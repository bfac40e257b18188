"""The benchmark runner's report: each figure beside its goal, met or not, and per-node fidelity."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import render


def test_results_put_each_figure_beside_its_goal():
    results = {"record": {"flow_over_direct": 1.04, "rerun_fraction": 0.2, "soft_label_bytes_per_token": 122.5},
               "student": {"speedup_batch1_paired": 31.0, "speedup_batch1": 12.0,
                           "breakdown": {"speedup": 10.0, "goal": 20.0, "student_budget_ms": 3.0,
                                         "graph": {"request_ms": 60.0, "stages_ms": {"node reasoner": 40.0}},
                                         "student": {"backend": "onnx-int8", "request_ms": 6.0,
                                                     "stages_ms": {"vision graph": 1.5}}}},
               "fidelity": {"answer_retained": 0.99, "student_vs_teacher.reasoner.answer_em": 0.93,
                            "fresh_seed": {"seed": 7, "retained.reasoner.answer_em": 0.97}},
               "demo": {"error": "RuntimeError: boom"}}
    text = render(results, quick=False)
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: line for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 6}
    assert rows[("record", "flow_over_direct")].endswith("| <= 1.10 | yes |")
    assert rows[("record", "rerun_fraction")].endswith("| <= 0.05 | NO |")
    assert rows[("student", "speedup_batch1_paired")].endswith("| >= 20x (median of alternating rounds) | yes |")
    assert rows[("student", "speedup_batch1")].endswith("| (one pass each) |  |")
    assert "RuntimeError: boom" in rows[("demo", "cold_s")]  # a failed benchmark says why, the others stay
    assert "| student_vs_teacher.reasoner.answer_em | 0.93 |" in text
    assert "## Fidelity per node, fresh world seed 7" in text and "| retained.reasoner.answer_em | 0.97 |" in text
    assert "for 20x the student may take 3.00 ms a request" in text  # where each side's request goes
    assert "| teacher graph | node reasoner | 40.00 | 67% |" in text
    assert "| student (onnx-int8) | vision graph | 1.50 | 25% |" in text


def test_a_partial_run_keeps_the_other_benchmarks_figures(tmp_path):
    from benchmarks.__main__ import previous

    earlier = {"record": {"flow_over_direct": 1.04, "ran": "2026-12-01 10:00 UTC, abc123"},
               "serve_http": {"c8_over_c1_rps": 1.9}}
    path = tmp_path / "RESULTS.md"
    path.write_text(render(earlier, quick=False))
    assert previous(path) == earlier  # what `python -m benchmarks --only ...` merges its new figures into
    assert previous(tmp_path / "missing.md") == {}


def test_the_long_benchmarks_get_their_own_sections():
    results = {"scale": {"size": "full", "table": "| scale | side |\n|---|---|\n| realistic | student |",
                         "best_dtype": "float32", "ran": "2026-12-06 10:00 UTC, abc123"},
               "blackbox": {"answer_agreement": {"white_box": 0.927, "black_box_topk": 0.91, "black_box_text": 0.88},
                            "topk": {"answer_agreement": 0.91, "answer_retained": 0.95, "soft_label_share": 1.0},
                            "text": {"answer_agreement": 0.88, "answer_retained": 0.93, "soft_label_share": 0.0}}}
    text = render(results, quick=False)
    assert "## Speed and cost at realistic scale (`python -m benchmarks.scale`, full size" in text
    assert "| realistic | student |" in text and "float32" in text
    assert "| in-process `llm` node (white box, top-k) | 0.927 |" in text
    assert "| `openai` node, top-20 log-probs served | 0.91 | 0.95 | 1.0 |" in text
    assert "| `openai` node, text only | 0.88 | 0.93 | 0.0 |" in text


def test_the_pretrained_and_on_policy_runs_get_their_tables():
    agreement = {"detector": {"map50": 0.9243}, "retriever": {"top1": 1.0}, "reasoner": {"answer_em": 0.78125}}
    results = {
        "pretrained": {"today": {"s_per_step": 0.8, "steps": 300, "params": 1000, "trainable": 1000, "s_fwd_bwd": 0.4,
                                 "agreement": agreement},
                       "llama-text": {"s_per_step": 1.2, "steps": 300, "params": 900, "trainable": 300, "s_fwd_bwd": 0.5,
                                      "agreement": agreement}, "ran": "2026-12-06 12:38 UTC, abc"},
        "onpolicy": {"fresh_seed": 7, "on_policy_config": {"rounds": 4}, "teacher_calls": 10, "teacher_seconds": 1.5,
                     "offline": {"train_seconds": 9, "test": {"answer_agreement": 0.93833333, "agreement_by_type": {"sum": 0.9}},
                                 "seed7": {"answer_agreement": 0.925, "who_is_right": {
                                     "n": 600, "differ": 31, "student_right": 19, "teacher_right": 10, "both_wrong": 2,
                                     "agreement_where_teacher_right": 0.98165}}},
                     "on_policy": {"train_seconds": 9, "test": {"answer_agreement": 0.9316, "agreement_by_type": {"sum": 0.8}},
                                   "seed7": {"answer_agreement": 0.908, "who_is_right": {
                                       "n": 600, "differ": 34, "student_right": 19, "teacher_right": 13,
                                       "both_wrong": 2, "agreement_where_teacher_right": 0.977}}}}}
    text = render(results, quick=False)
    assert "| today | 1,000 | 1,000 | 800 | 1.00 | 400 | 1.00 | map50 0.924 | top1 1.000 | answer_em 0.781 |" in text
    assert "| llama-text | 900 | 300 | 1200 | 1.50 | 500 | 1.25 |" in text
    assert "| test split | answer_agreement | 0.9383 | 0.9316 |" in text
    assert "| test split | agreement: sum | 0.9 | 0.8 |" in text
    assert "| fresh world (seed 7) | answer_agreement | 0.925 | 0.908 |" in text
    assert ("| fresh world (seed 7) | answers that differ: truth sides with student / teacher / neither "
            "| 31: 19 / 10 / 2 | 34: 19 / 13 / 2 |") in text
    assert "| fresh world (seed 7) | agreement where the teacher is right | 0.9817 | 0.977 |" in text
    assert "800 train images (`python -m benchmarks.onpolicy`" in text
    more = {**results["onpolicy"], "train_images": 1600}
    text = render({"onpolicy_data": more}, quick=False)
    assert "1600 train images (`python -m benchmarks.onpolicy_data`" in text
    assert "| test split | answer_agreement | 0.9383 | 0.9316 |" in text


def test_the_vision_encoder_benchmark_runs_and_renders():
    """Its smallest setting (64 px): the three encoders exported, quantized, timed and profiled."""
    from benchmarks import vision_encoder

    res = vision_encoder.main(["--preset", "tiny"])
    assert res["today"]["ms_per_request"] > 0 and res["depthwise"]["ms_per_request"] > 0
    assert res["depthwise"]["params"] < res["today"]["params"]  # the depthwise blocks are the smaller ones
    assert "QLinearConv" in res["today"]["op_share"]  # the convolutions did run in int8
    assert res["patchify"]["ms_per_request"] > 0 and res["patchify_over_today"] > 0
    assert any("stem" in node for node in res["patchify"]["top_nodes_ms"])  # its one stem convolution, profiled
    text = render({"vision_encoder": res}, quick=False)
    assert "## The int8 vision encoder at 64 px" in text and "| depthwise |" in text and "| patchify |" in text


def test_scene_counts_count_each_image_once_and_compare_each_side_with_the_labels():
    from benchmarks.counting import scene_counts

    images = ["a.png", "a.png", "b.png", "c.png"]  # two questions on a.png: one scene
    teacher = [["circle", "circle", "square"], ["circle", "circle", "square"], ["square"], ["circle"]]
    student = [["circle", "square"], ["circle", "square"], ["square"], ["square"]]
    truth = [["circle", "square"], ["circle", "square"], ["square"], ["circle"]]
    out = scene_counts(images, teacher, student, truth)
    assert out["scenes"] == 3 and out["teacher_true"] == 2 and out["student_true"] == 2
    assert out["by_teacher_n"] == {1: {"scenes": 2, "student_differs": 1, "student_true": 1},
                                   3: {"scenes": 1, "student_differs": 1, "student_true": 1}}
    with pytest.raises(ValueError, match="scene_counts: 1 images, 2 teacher"):
        scene_counts(["a"], [[], []], [[]], [[]])


def test_dask_ratios_are_medians_of_each_rounds_own_ratio():
    from benchmarks.dask_record import paired_ratios

    # one slow local run (round 0) moves local's median, not the rounds' ratios
    times = {"local": [36.0, 9.5, 8.7, 8.6, 9.5], "dask1": [9.4, 10.3, 10.4, 11.3, 10.5],
             "dask2": [7.5, 6.1, 6.2, 7.3, 6.0]}
    out = paired_ratios(times)
    assert out["dask1_over_local_time"] == round(10.5 / 9.5, 3)  # rounds: 0.26, 1.08, 1.20, 1.31, 1.11
    assert out["of_medians"]["dask1_over_local_time"] == round(10.4 / 9.5, 3)
    assert out["dask2_over_dask1_speed"] == round(10.4 / 6.2, 3)  # rounds: 1.25, 1.69, 1.68, 1.55, 1.75
    with pytest.raises(ValueError):
        paired_ratios({"local": [1.0], "dask1": [1.0, 2.0], "dask2": [1.0]})
