"""The record flow end to end on the tiny demo world: real Ultralytics, MiniLM+FAISS, transformers,
Lance and Prefect (ephemeral local server)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distillery.flows.spec import load_spec
from distillery.teachers.graph import TeacherGraph
from distillery.teachers.store import TraceStore


def _inputs(tiny_demo, tmp_path: Path, n: int = 10, bad: bool = False) -> Path:
    """A copy of the first n requests of the tiny world's test split, plus bad inputs on demand."""
    src = Path(tiny_demo["world"].split_dir("test"))
    dst = tmp_path / "inputs"
    (dst / "images").mkdir(parents=True)
    lines = (src / "requests.jsonl").read_text().splitlines()[:n]
    for line in lines:
        img = json.loads(line)["image"]
        shutil.copy(src / img, dst / img)
    if bad:
        (dst / "images" / "broken.png").write_bytes(b"not a png at all")
        lines.append(json.dumps({"image": "images/broken.png", "question": "How many hazards are there?"}))
        lines.append(json.dumps({"image": "images/missing.png", "question": "How many hazards are there?"}))
        lines.append(json.dumps({"image": json.loads(lines[0])["image"], "question": "   "}))
    (dst / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture
def counting(monkeypatch):
    """Count teacher-node calls made through TeacherGraph.run_node (flow or plain)."""
    calls: list[str] = []
    original = TeacherGraph.run_node

    def run_node(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(TeacherGraph, "run_node", run_node)
    return calls


def _progress(flow_run_id) -> float:
    """The record-progress artifact's value for one flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=["record-progress"])))
    return art.data


def test_record_flow_writes_every_node_and_rerun_calls_no_teacher(tiny_demo, tmp_path, prefect_harness, counting):
    from distillery.flows.record import record_flow

    spec = load_spec(tiny_demo["spec_path"])
    inputs = _inputs(tiny_demo, tmp_path, n=10, bad=True)
    traces = str(tmp_path / "traces.lance")

    first = record_flow(spec=spec, inputs=str(inputs), traces=traces)
    assert first["written"] + first["quarantined"] == 13 and first["written"] >= 9
    assert first["by_reason"].get("not_an_image") == 1
    assert first["by_reason"].get("missing_file") == 1
    assert first["by_reason"].get("empty_question") == 1
    assert counting, "the first run must call the teachers"

    store = TraceStore(traces)
    ok = store.read(status="ok")
    assert len(ok) == first["written"]
    for rec in ok:
        assert set(rec.outputs) == {"detector", "retriever", "reasoner"}
        assert rec.outputs["detector"]["boxes"].shape[1:] == (4,)
        assert len(rec.outputs["retriever"]["ids"]) == 4
        llm = rec.outputs["reasoner"]
        assert llm["topk_ids"].shape == (len(llm["token_ids"]), 20)
        assert str(llm["topk_logprobs"].dtype) == "float16"
        assert set(rec.timings) == {"detector", "retriever", "reasoner"}

    counting.clear()
    version = store.version
    state = record_flow(spec=spec, inputs=str(inputs), traces=traces, return_state=True)
    second = state.result()
    assert counting == [], "a rerun over the same inputs and graph must make zero teacher calls"
    assert second["written"] == 0 and second["quarantined"] == 0 and second["skipped"] == 13
    assert store.version == version
    assert _progress(state.state_details.flow_run_id) == 100.0  # the UI shows a rerun with nothing to do as done

    # Changing one node's config changes the fingerprint: everything is recorded again.
    changed = spec.model_copy(deep=True)
    changed.teachers["retriever"].top_k = 3
    assert TeacherGraph(changed.teachers).fingerprint != TeacherGraph(spec.teachers).fingerprint
    third = record_flow(spec=changed, inputs=str(inputs), traces=traces)
    assert third["written"] == first["written"]


def test_node_failure_quarantines_only_that_input(tiny_demo, tmp_path, monkeypatch):
    from distillery.teachers.record import record

    spec = load_spec(tiny_demo["spec_path"])
    inputs = _inputs(tiny_demo, tmp_path, n=6)
    from distillery.teachers.inputs import scan_inputs

    graph = TeacherGraph(spec.teachers)
    victim = {"id": scan_inputs(inputs, spec.inputs).requests[1].input_id}
    real_run = graph.nodes["retriever"].run

    def flaky(batch):
        if any(item.input_id == victim["id"] for item in batch):
            raise RuntimeError("index shard unavailable")
        return real_run(batch)

    monkeypatch.setattr(graph.nodes["retriever"], "run", flaky)
    summary = record(spec, str(inputs), str(tmp_path / "t.lance"), graph=graph)
    assert summary.quarantined == 1 and summary.written == 5
    bad = TraceStore(tmp_path / "t.lance").read(status="quarantined")
    assert bad[0].input_id == victim["id"]
    assert bad[0].reason == "node_error:retriever"
    assert "index shard unavailable" in bad[0].detail
    assert "reasoner" not in bad[0].outputs  # downstream of the failed node: skipped


def test_sigkill_mid_run_then_rerun_records_each_input_once(tiny_demo, tmp_path):
    """A record run killed with SIGKILL mid-way, rerun from the CLI: every input exactly once."""
    spec_path = tmp_path / "spec.yaml"
    text = Path(tiny_demo["spec_path"]).read_text()
    assert "shard_size: 128" in text
    text = text.replace("shard_size: 128", "shard_size: 4")
    spec_path.write_text(text)
    inputs = _inputs(tiny_demo, tmp_path, n=16)
    traces = tmp_path / "traces.lance"
    cmd = [sys.executable, "-m", "distillery.cli", "record", str(spec_path), "--inputs", str(inputs),
           "--traces", str(traces), "--json"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if traces.exists() and (TraceStore(traces).count() or 0) >= 4:
            break
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)  # its Prefect API server among them
    assert any("prefect.server.api.server" in " ".join(c.cmdline()) for c in children)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = TraceStore(traces).count() if traces.exists() else 0
    assert partial < 16, "the run finished before it could be killed; use more inputs"
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], f"processes of the killed run still alive: {[c.cmdline() for c in alive]}"

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary) == {"written", "skipped", "quarantined", "to_retry", "by_reason", "traces", "version",
                            "seconds", "node_seconds", "usage"}
    assert summary["skipped"] == partial and summary["written"] + summary["quarantined"] == 16 - partial
    ids = [r.input_id for r in TraceStore(traces).read(with_images=False)]
    assert len(ids) == 16 and len(set(ids)) == 16


def test_every_kind_of_bad_input_is_quarantined_by_the_flow_while_good_ones_are_recorded(
        tiny_demo, tmp_path, prefect_harness):
    """Each reason of teachers.inputs.REASONS through the real flow: kept in the store with its
    reason, counted in the summary; an EXIF-rotated photo is recorded upright."""
    from distillery.flows.record import record_flow
    from distillery.teachers.inputs import REASONS
    from test_inputs import _exif_rotated_jpeg, _png, _png_claiming

    spec = load_spec(tiny_demo["spec_path"])
    inputs = _inputs(tiny_demo, tmp_path, n=3)
    img = inputs / "images"
    good = json.loads((inputs / "requests.jsonl").read_text().splitlines()[0])["image"]
    (img / "zero.png").write_bytes(b"")
    (img / "text.png").write_text("not a png\n")
    (img / "half.png").write_bytes(_png(64, 64)[: len(_png(64, 64)) // 2])
    (img / "bomb.png").write_bytes(_png_claiming(60_000, 60_000))
    (img / "rotated.jpg").write_bytes(_exif_rotated_jpeg(48, 24))
    bad = [{"image": "images/missing.png", "question": "q?"}, {"image": "images/zero.png", "question": "q?"},
           {"image": "images/text.png", "question": "q?"}, {"image": "images/half.png", "question": "q?"},
           {"image": "images/bomb.png", "question": "q?"}, {"image": good, "question": "  "},
           {"image": good, "question": "x" * (spec.inputs.max_question_chars + 1)},
           {"image": "images/rotated.jpg", "question": "How many hazards are there?"},
           {"image": "../outside.png", "question": "q?"}, {"image": good, "question": "ring\x07?"}]
    (inputs.parent / "outside.png").write_bytes(_png(16, 16))  # a valid image, outside the inputs folder
    with open(inputs / "requests.jsonl", "ab") as f:
        f.write(b"".join(json.dumps(b).encode() + b"\n" for b in bad))
        f.write(b'{"image": "' + good.encode() + b'", "question": "caf\xe9?"}\n')  # latin-1
        f.write(b'{"image": "x.png", "question": \n')  # a broken line
    traces = str(tmp_path / "traces.lance")

    summary = record_flow(spec=spec, inputs=str(inputs), traces=traces)
    assert summary["by_reason"] == {reason: 1 for reason in REASONS}
    assert summary["written"] == 4  # the three good ones and the rotated photo
    stored = TraceStore(traces).read(status=None)
    assert sorted(r.reason for r in stored if r.status != "ok") == sorted(REASONS)
    assert all(r.detail for r in stored if r.status != "ok")  # every one says what is wrong
    rotated = next(r for r in stored if r.status == "ok" and r.image_path.endswith("rotated.jpg"))
    from distillery.images import open_image

    assert open_image(rotated.image_bytes, "rotated").size == (24, 48)  # read upright (EXIF applied)


def test_one_task_per_node_and_shard_and_a_transient_failure_is_retried_not_quarantined(
        tiny_demo, tmp_path, prefect_harness, counting, monkeypatch):
    """10 inputs in shards of 4: 3 shards, so 3 run-node tasks per node (never one per input);
    a ConnectionError on the retriever's first shard fails that task, Prefect retries it, and
    every input is recorded."""
    from distillery.flows.record import record_flow
    from distillery.teachers.nodes.rag import RagNode

    spec = load_spec(tiny_demo["spec_path"])
    spec.record.shard_size, spec.record.retry_delay_s = 4, 0.0
    inputs = _inputs(tiny_demo, tmp_path, n=10)
    real_run, failures = RagNode.run, []

    def flaky(self, batch):
        if not failures:
            failures.append(len(batch))
            raise ConnectionError("embedding server went away")
        return real_run(self, batch)

    monkeypatch.setattr(RagNode, "run", flaky)
    summary = record_flow(spec=spec, inputs=str(inputs), traces=str(tmp_path / "traces.lance"))
    assert failures and summary["written"] == 10 and summary["quarantined"] == 0
    assert sorted(counting) == sorted(["detector"] * 3 + ["reasoner"] * 3 + ["retriever"] * 4)  # 3 shards + 1 retry
