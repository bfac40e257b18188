"""The realistic-scale benchmark (``python -m benchmarks.scale``) at its smallest setting, so it
cannot rot: the real node types (YOLO from its YAML, MiniLM + FAISS flat and HNSW, a Qwen2 from
its config writing exactly its new tokens), the student the project builds for that graph, every
side timed, each side's peak memory from a fresh process, and a table whose every figure is finite."""

from __future__ import annotations

import json
import math

from benchmarks.scale import COLUMNS, main
from benchmarks.scale_build import TINY, build_llm
from benchmarks.scale_measure import percentile


def test_tiny_run_prints_a_finite_table_with_every_side_and_goal(tmp_path, capsys):
    res = main(["--tiny", "--workdir", str(tmp_path / "scale"), "--no-demo"])

    sides = {r["side"].split(" (")[0] for r in res["rows"]}
    assert {"student", "teacher graph", "retriever only"} <= sides
    assert {r["backend"] for r in res["rows"] if r["side"].startswith("retriever")} == {"flat", "hnsw"}
    for row in res["rows"]:
        assert row["weights"] == "timing only, random weights"
        for key in ("parameters", "b1_median_ms", "b1_p90_ms", "batch_rps", "cpu_s_per_1000_batch", "cpu_s_per_1000_b1"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["side"], key, row[key])
        assert row["b1_p90_ms"] >= row["b1_median_ms"]
    student, graph = res["rows"][0], next(r for r in res["rows"] if r["side"] == f"teacher graph (llm {res['best_dtype']})")
    for row in (student, graph):  # each from a fresh process: at least the interpreter and the libraries
        assert math.isfinite(row["peak_rss_mib"]) and row["peak_rss_mib"] > 50, row
    goals = {r["figure"].split(" (")[0]: r for r in res["ratios"]}
    for figure in ("speed-up at batch 1", "cost per request at batch 2", "peak resident memory"):
        assert math.isfinite(goals[figure]["value"]) and goals[figure]["met"] in (True, False)
    lines = res["table"].splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert all(line.count("|") == len(COLUMNS) + 1 for line in lines[2:2 + len(res["rows"])])
    out = capsys.readouterr().out
    assert res["table"] in out and "timing only, random weights" in out


def test_the_llm_writes_exactly_its_new_tokens_with_the_full_vocabulary(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder = build_llm(tmp_path / "llm", TINY)
    tok = AutoTokenizer.from_pretrained(folder)
    gen = GenerationConfig.from_pretrained(folder)
    assert len(tok) == AutoConfig.from_pretrained(folder).vocab_size == TINY.vocab
    assert gen.min_new_tokens == gen.max_new_tokens == TINY.new_tokens
    assert len(tok(" the cat")["input_ids"]) == 2  # a documents' word is one token
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True


def test_percentile_interpolates_as_numpy():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == 4.6
    assert percentile([7.0], 0.9) == 7.0
