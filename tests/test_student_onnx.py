"""The student on ONNX Runtime (students/onnx.py) answers exactly as the torch student: same
answers (greedy over the exported step graph and its cache), same detections, masks and
documents, at any batch size and question length; stale graphs are never used."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from distillery.flows.spec import load_spec
from student_support import make_records, tiny_config, write_graph
from distillery.students.serving import onnx
from distillery.students.data import TraceDataset, build_schema, collate, load_tokenizer
from distillery.students.model.student import MultimodalStudent
from distillery.students.serving.predictor import StudentPredictor


def trained_student(tmp_path_factory, int8: bool = False):
    """A tiny student trained a little (so that it detects objects and stops its answers), saved
    and exported (with ``int8``: also its int8 graphs, calibrated on its training inputs, and
    their ORT format); (folder, records)."""
    torch.manual_seed(0)
    spec = load_spec(write_graph(tmp_path_factory.mktemp("graph")))
    records = make_records()
    schema = build_schema(spec, records)
    batch = collate(list(TraceDataset(records, schema, tiny_config(), load_tokenizer(schema))))
    model = MultimodalStudent(tiny_config(), schema)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(60):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model.save_pretrained(tmp_path_factory.mktemp("student") / "student")
    assert onnx.export_onnx(out, calibration=requests_of(records) if int8 else None) == out / "onnx"
    return out, records


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return trained_student(tmp_path_factory)


def requests_of(records, questions=None):
    return [{"image": r.image_bytes, "question": q or r.question}
            for r, q in zip(records, questions or [None] * len(records))]


def test_onnx_predictions_equal_the_torch_ones(folder):
    out, records = folder
    torch_pred, onnx_pred = StudentPredictor.load(out, backend="torch"), StudentPredictor.load(out)
    assert (torch_pred.backend, onnx_pred.backend) == ("torch", "onnx")  # auto: the current export
    # batches of 1 and of 4, questions of other lengths than the export's example (a dynamic axis)
    asks = [requests_of(records[:1]), requests_of(records),
            requests_of(records, ["how many", "a much longer question than any of the others here", None, "?"])]
    detected = 0
    for reqs in asks:
        want, got = torch_pred.predict(reqs), onnx_pred.predict(reqs)
        for w, g in zip(want, got):
            assert g["answer"] == w["answer"] and g["reasoner"] == w["reasoner"]
            assert g["retriever"]["ids"] == w["retriever"]["ids"]
            assert g["detector"]["labels"] == w["detector"]["labels"]
            assert g["detector"]["masks"] == w["detector"]["masks"]
            torch.testing.assert_close(torch.tensor(g["detector"]["boxes"]), torch.tensor(w["detector"]["boxes"]),
                                       atol=1e-5, rtol=0)
            detected += len(w["detector"]["labels"])
    assert detected > 0, "the test student should detect something (else masks are not compared)"


def test_onnx_greedy_runs_the_step_graph_up_to_the_length_limit(folder, monkeypatch):
    """With no eos (its id moved out of the vocabulary) both backends decode max_answer_tokens
    tokens, the same ones: the step graph and its growing cache decode as torch does."""
    out, records = folder
    onnx_pred = StudentPredictor.load(out, backend="onnx")
    batch, _ = onnx_pred.prepare(requests_of(records))
    never = [onnx_pred.model.schema.text["vocab_size"] + 7]
    monkeypatch.setattr(onnx_pred.runner, "eos_ids", never)
    monkeypatch.setitem(onnx_pred.model.schema.text, "eos_ids", never)
    got = onnx_pred.runner.predict_raw(batch)["reasoner"]["answer_ids"]
    with torch.inference_mode():
        want = onnx_pred.model.predict_raw(batch)["reasoner"]["answer_ids"]
    limit = onnx_pred.model.cfg.max_answer_tokens
    assert got == want and all(len(row) == limit for row in got)
    short = onnx_pred.runner.predict_raw(batch, max_new_tokens=1)["reasoner"]["answer_ids"]
    assert short == [row[:1] for row in want]


def test_stale_graphs_are_never_used(folder, tmp_path):
    out, records = folder
    import shutil

    copy = shutil.copytree(out, tmp_path / "student")
    weights = load_file(copy / "model.safetensors")
    name = next(k for k in weights if k.endswith("lm_head.weight") or "tok_embed" in k)
    weights[name] = weights[name] + 0.5  # the student changed after the export
    save_file(weights, copy / "model.safetensors")
    assert not (onnx.read_meta(copy) is not None)
    assert StudentPredictor.load(copy).backend == "torch"  # auto: stale graphs -> torch
    fresh = StudentPredictor.load(copy, backend="onnx")  # onnx: re-exported first
    assert fresh.backend == "onnx" and (onnx.read_meta(copy) is not None)
    meta = json.loads((copy / "onnx" / "meta.json").read_text())
    assert meta["digest"] == onnx.digest(copy)
    reqs = requests_of(records)
    got, want = fresh.predict(reqs), StudentPredictor.load(copy, backend="torch").predict(reqs)
    assert [g["answer"] for g in got] == [w["answer"] for w in want]
    assert not list(copy.glob(".onnx-*")), "no temporary export folder left behind"


def test_an_export_in_an_older_layout_is_stale(folder, tmp_path):
    """Graphs of another layout (format 1: one encoder graph) are never run: auto falls back to
    torch, backend onnx re-exports."""
    import shutil

    out, records = folder
    copy = shutil.copytree(out, tmp_path / "student")
    meta_file = copy / "onnx" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["format"] == onnx.FORMAT and (onnx.read_meta(copy) is not None)
    meta_file.write_text(json.dumps({**meta, "format": 1}))
    assert not (onnx.read_meta(copy) is not None) and StudentPredictor.load(copy).backend == "torch"
    assert StudentPredictor.load(copy, backend="onnx").backend == "onnx" and (onnx.read_meta(copy) is not None)


def test_post_processing_overlaps_the_text_graph_and_errors_reach_the_caller(folder):
    """``run(batch, on_conv)`` hands the conv heads' outputs to on_conv (on the calling thread)
    and returns its result with every head's outputs; an error in on_conv is raised after the
    text graph has finished, and the runner keeps working."""
    out, records = folder
    pred = StudentPredictor.load(out, backend="onnx")
    batch, _ = pred.prepare(requests_of(records))
    raw, seen = pred.runner.run(batch, on_conv=lambda conv: sorted(conv))
    assert seen == ["detector"] and raw["reasoner"]["answer_ids"] == pred.runner.predict_raw(batch)["reasoner"]["answer_ids"]

    def boom(conv):
        raise RuntimeError("post-processing failed")

    with pytest.raises(RuntimeError, match="post-processing failed"):
        pred.runner.run(batch, on_conv=boom)
    assert pred.predict(requests_of(records[:1]))[0]["answer"] == StudentPredictor.load(out, backend="torch").predict(
        requests_of(records[:1]))[0]["answer"]


def test_unknown_backend_and_text_summaries_are_refused(folder, tmp_path):
    out, _ = folder
    with pytest.raises(ValueError, match="backend 'tensorrt': expected one of auto, torch, onnx"):
        StudentPredictor.load(out, backend="tensorrt")
    config = json.loads((out / "config.json").read_text())
    config["student"]["detection_summary"] = "text"
    import shutil

    copy = shutil.copytree(out, tmp_path / "text-student")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="detection_summary 'text'.*needs 'slots' or 'none'"):
        onnx.export_onnx(copy)


def test_int8_graphs_are_calibrated_chosen_by_auto_and_agrees(folder, tmp_path):
    """Training exports int8 graphs calibrated on training inputs; auto picks it; on the
    overfitted test student it gives the torch student's answers and labels."""
    import shutil

    out, records = folder
    copy = shutil.copytree(out, tmp_path / "student")
    calibration = requests_of(records) + [{"image": b"not an image", "question": "q"}]  # a bad one is skipped
    with pytest.warns(UserWarning, match="calibration input 4 skipped"):
        onnx.export_onnx(copy, calibration)
    meta = json.loads((copy / "onnx" / "meta.json").read_text())
    assert meta["int8"]["calibration_inputs"] == 4
    assert all((copy / "onnx" / f"{g}-int8.onnx").is_file() and not (copy / "onnx" / f"{g}-pre.onnx").exists()
               for g in ("vision", "text"))
    int8 = StudentPredictor.load(copy)
    assert int8.backend == "onnx-int8" and StudentPredictor.load(copy, backend="onnx").backend == "onnx"
    reqs = requests_of(records)
    got, want = int8.predict(reqs), StudentPredictor.load(copy, backend="torch").predict(reqs)
    assert [g["answer"] for g in got] == [w["answer"] for w in want]
    assert [sorted(g["detector"]["labels"]) for g in got] == [sorted(w["detector"]["labels"]) for w in want]
    with pytest.raises(ValueError, match="no int8 graphs"):
        StudentPredictor.load(out, backend="onnx-int8")  # exported without calibration inputs


def test_breakdown_times_the_onnx_students_graphs_inside_its_run(folder):
    """``benchmarks.breakdown`` wraps the runner's sessions, not a copy of them: the vision and
    text graphs are each run once a request, the detection post-processing beside the text graph."""
    from benchmarks.breakdown import student_breakdown

    out, records = folder
    res = student_breakdown(out, [(r.image_bytes, r.question) for r in records], repeats=2, backend="onnx")
    s, calls = res["stages_ms"], res["calls"]
    assert res["backend"] == "onnx"
    assert calls["vision graph"] == calls["text graph (beside the detection post)"] == 1
    assert s["vision graph"] > 0 and s["detection post (beside the text graph)"] > 0
    serial = s["prepare: decode, resize, tokenize"] + s["vision graph"] + max(
        s["text graph (beside the detection post)"], s["detection post (beside the text graph)"])
    assert serial <= res["request_ms"] * 1.05


@pytest.mark.parametrize("stem", ["conv", "patchify"])
def test_relu_students_int8_vision_graph_folds_relu_and_reads_the_image_bytes(tmp_path, stem):
    """``vision_act: relu``: the int8 vision graph has no float activation left (each ReLU folded
    into its convolution) and no cast / divide / quantize of the image (the bytes go straight into
    the first convolution at scale 1/255); its outputs stay within int8 rounding of the float
    graph's, and the runtime answers from it. With either ``vision_stem``: 'patchify''s first
    convolution is one 4x4 stride-4 kernel."""
    import io

    import numpy as np
    import onnx as onnx_lib
    import onnxruntime as ort
    from PIL import Image

    from distillery.students.serving.runtime import StudentRuntime

    torch.manual_seed(0)
    spec = load_spec(write_graph(tmp_path / "graph"))
    records = make_records()
    model = MultimodalStudent(tiny_config(vision_act="relu", vision_stem=stem), build_schema(spec, records))
    assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    out = model.save_pretrained(tmp_path / "student")
    onnx.export_onnx(out, calibration=requests_of(records))
    meta = json.loads((out / "onnx" / "meta.json").read_text())
    assert meta["int8"]["vision"]["uint8_input"] is True
    graph = onnx_lib.load(str(out / "onnx" / "vision-int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "Relu" not in ops and "Cast" not in ops and "Div" not in ops and ops.count("QLinearConv") >= 10
    first = [n for n in graph.node if "images" in n.input][0]
    assert first.op_type == "QLinearConv"
    kernel = {a.name: list(a.ints) for a in first.attribute}
    assert (kernel["kernel_shape"], kernel["strides"]) == (([4, 4], [4, 4]) if stem == "patchify" else ([3, 3], [2, 2]))
    images = np.stack([np.asarray(Image.open(io.BytesIO(r.image_bytes)).convert("RGB").resize((64, 64)))
                       .transpose(2, 0, 1) for r in records])
    f32 = ort.InferenceSession(str(out / "onnx" / "vision.onnx")).run(None, {"images": images})
    i8 = ort.InferenceSession(str(out / "onnx" / "vision-int8.onnx")).run(None, {"images": images})
    for a, b in zip(f32, i8):
        assert np.abs(a - b).max() <= 0.1 * np.abs(a).max() + 1e-3
    assert isinstance(StudentRuntime.load(out).predict(requests_of(records[:1]))[0]["answer"], str)
