"""The benchmark runner's report: each figure beside its goal, met or not, and per-node fidelity."""

from __future__ import annotations

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
