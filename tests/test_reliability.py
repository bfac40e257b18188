"""What a feed and a crash do to recording, with nothing lost.

* a generated corpus of 220 bad inputs of every kind a feed produces, mixed with 41 good ones:
  no crash, every bad one quarantined with its expected reason (naming its line), every good one
  recorded, once;
* property-based (Hypothesis): any request line and any question either pass or are refused with
  a typed reason; nothing else escapes;
* a record run killed with SIGKILL at random moments (after some shards committed) ten times and
  rerun: every input in the store exactly once, the store readable at every version, no process
  left, and the teacher calls at most one shard per kill more than a clean run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.corpus import MAX_PIXELS, MAX_QUESTION_CHARS, make_corpus, outcomes
from benchmarks.reliability import counted_kills
from distillery.teachers.base import NODE_TYPES, NodeConfig, TeacherNode, register_node
from distillery.teachers.inputs import REASONS, InputsConfig, _Refused, check_question, parse_request_line, scan_inputs
from distillery.teachers.record import RecordConfig, record
from distillery.teachers.store import TraceStore

ROOT = Path(__file__).resolve().parents[1]
CFG = InputsConfig(max_pixels=MAX_PIXELS, max_question_chars=MAX_QUESTION_CHARS)


class SizeConfig(NodeConfig):
    type: Literal["image_size"] = "image_size"
    OUTPUT_FIELDS = frozenset({"width"})


class SizeNode(TeacherNode):
    """A teacher that reads each image's size (every decoded input reaches it)."""

    config_cls = SizeConfig

    def load(self) -> None:
        pass

    def run(self, batch):
        return [{"width": item.image.width, "height": item.image.height} for item in batch]


@pytest.fixture
def size_node():
    register_node("image_size")(SizeNode)
    yield
    NODE_TYPES.pop("image_size")


def test_a_corpus_of_bad_inputs_is_quarantined_by_reason_and_every_good_one_is_recorded(tmp_path, size_node):
    corpus = make_corpus(tmp_path / "feed", seed=7)
    assert corpus.bad >= 200 and corpus.count("ok") >= 40
    scan = scan_inputs(corpus.root, CFG)
    got = outcomes(scan)
    bad = {line: want for line, want in corpus.expected.items() if want not in ("ok", "duplicate")}
    assert {line: got.get(line) for line in bad} == bad  # each bad line, by its own reason
    assert all(q.reason in REASONS for q in scan.quarantined)
    assert sorted(r.question for r in scan.requests) == sorted(
        json.loads(line)["question"] for n, line in enumerate((corpus.root / "requests.jsonl").read_text(
            errors="replace").splitlines(), start=1) if corpus.expected[n] == "ok")

    spec = SimpleNamespace(teachers={"size": SizeConfig()}, inputs=CFG, record=RecordConfig(shard_size=16))
    summary = record(spec, str(corpus.root), str(tmp_path / "traces.lance"))
    assert (summary.written, summary.quarantined) == (corpus.count("ok"), corpus.bad)
    ok = TraceStore(tmp_path / "traces.lance").read(status="ok")
    assert len({r.input_id for r in ok}) == len(ok) == corpus.count("ok")
    assert all(r.outputs["size"]["width"] > 0 for r in ok)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.builds(
    lambda img, q, extra: json.dumps({"image": img, "question": q, **extra}).encode(),
    st.one_of(st.text(max_size=30), st.integers(), st.none()), st.one_of(st.text(max_size=60), st.integers()),
    st.dictionaries(st.sampled_from(["answer", "type", "documents", "x"]), st.text(max_size=5), max_size=2))))
def test_any_request_line_parses_or_is_refused_as_bad_request_line(raw):
    try:
        cand = parse_request_line(raw, Path("/inputs"), "requests.jsonl line 1")
    except _Refused as e:
        assert e.reason == "bad_request_line" and str(e).startswith("requests.jsonl line 1: ")
        return
    assert isinstance(cand.question, (str, bytes)) and cand.root == Path("/inputs")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=400), st.binary(max_size=100)))
def test_any_question_passes_unchanged_or_is_refused_with_a_typed_reason(question):
    try:
        out = check_question(question, CFG, "q")
    except _Refused as e:
        assert e.reason in {"empty_question", "question_too_long", "question_not_utf8", "question_control_chars"}
        return
    text = question if isinstance(question, str) else question.decode("utf-8")
    assert out == text and out.strip() and len(out) <= CFG.max_question_chars
    assert all(c in "\t\n\r" or not (ord(c) < 32 or 0x7F <= ord(c) < 0xA0) for c in out)


def test_killed_ten_times_at_random_moments_then_rerun_every_input_is_recorded_once(tmp_path):
    """The plain record loop in a child process, whose one teacher counts its calls, killed at
    random moments after a shard committed (``benchmarks.reliability.kill_and_resume``)."""
    n = 100
    out = counted_kills(tmp_path, n, kills=10, seed=3)
    assert out["kills"] >= 8, f"only {out['kills']} kills: the runs finished too fast to be killed"
    assert out["processes_left"] == 0
    assert out["records"] == out["distinct_records"] == n  # every input once
    assert out["versions_readable"] == out["versions"] >= out["kills"] + 1
    assert 0 <= out["extra_calls"] <= out["extra_calls_bound"], out  # at most one shard lost per kill
