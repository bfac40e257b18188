"""The torch-free runtime (students/serving/runtime.py): a student folder's ONNX graphs on ONNX
Runtime give the torch student's answers, labels and documents (boxes within 0.02 of the image
side, the int8 graphs' error on this student), in a process where importing torch, transformers,
Prefect or MLflow fails; its ORT-format graphs (what a phone runs) load and answer alike; it is
what ``predict_dir`` (``distillery predict``) and the MLflow model run where the folder has graphs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from distillery.students.serving import graphs, onnx
from distillery.students.serving.predictor import StudentPredictor
from distillery.students.serving.runtime import StudentRuntime
from test_student_onnx import requests_of, trained_student

BOX_ATOL = 0.02  # normalized coordinates: int8 graphs vs the float torch student
BLOCKED = ("torch", "torchvision", "transformers", "prefect", "mlflow", "pydantic", "safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny student trained a little (it detects objects and stops its answers), saved and
    exported with int8 graphs calibrated on its training inputs (and their ORT format)."""
    return trained_student(tmp_path_factory, int8=True)


def all_requests(records):
    """Every scene with its own question and with the others' (16 requests)."""
    questions = [r.question for r in records]
    return [req for q in questions for req in requests_of(records, [q] * len(records))]


def assert_agree(got: dict, want: dict) -> None:
    """What a user relies on: the answer, the labels, the top document, each box within BOX_ATOL
    of a box of its label (the documents after the first can swap where int8 rounding meets
    near-ties, 0.00096 apart; so can the order of two detections with near-equal scores)."""
    assert got["answer"] == want["answer"] and got["reasoner"] == want["reasoner"]
    assert got["retriever"]["ids"][:1] == want["retriever"]["ids"][:1]
    g, w = got["detector"], want["detector"]
    assert sorted(g["labels"]) == sorted(w["labels"]) and g["summary"] == w["summary"]
    for box, label in zip(g["boxes"], g["labels"]):
        nearest = min(float(np.abs(np.subtract(box, o)).max()) for o, lb in zip(w["boxes"], w["labels"]) if lb == label)
        assert nearest <= BOX_ATOL, (label, box, w["boxes"])


def test_runtime_answers_as_the_torch_student(folder):
    out, records = folder
    runtime = StudentRuntime.load(out)
    assert runtime.graphs == "int8" and runtime._runner is None  # auto: the int8 graphs; nothing opened yet
    reqs = all_requests(records)
    got = runtime.predict(reqs)
    want = StudentPredictor.load(out, backend="torch").predict(reqs)
    for g, w in zip(got, want):
        assert_agree(g, w)
    assert sum(len(w["detector"]["labels"]) for w in want) > 0, "the test student should detect something"
    # the torch predictor on the same int8 graphs decodes with the same code: identical JSON
    assert StudentRuntime.load(out, graphs="int8").predict(reqs) == StudentPredictor.load(
        out, backend="onnx-int8").predict(reqs)
    # batch of 4 with other question lengths = one at a time
    mixed = requests_of(records, ["how many", "a much longer question than any of the others here", None, "?"])
    assert runtime.predict(mixed) == [runtime.answer(r["image"], r["question"]) for r in mixed]


def test_the_float_graphs_match_the_torch_student_closely(folder):
    out, records = folder
    reqs = all_requests(records)
    got = StudentRuntime.load(out, graphs="float").predict(reqs)
    want = StudentPredictor.load(out, backend="torch").predict(reqs)
    for g, w in zip(got, want):
        assert_agree(g, w)
        assert g["detector"]["masks"] == w["detector"]["masks"]
        np.testing.assert_allclose(g["detector"]["boxes"] or np.zeros((0, 4)), w["detector"]["boxes"] or np.zeros((0, 4)),
                                   atol=1e-5, rtol=0)


BLOCKER = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this process")
        return None
sys.meta_path.insert(0, Blocker())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{name}} imported despite the blocker")
from distillery.students.serving.runtime import StudentRuntime
runtime = StudentRuntime.load(sys.argv[1], graphs=sys.argv[2])
requests = [{{"image": path, "question": q}} for path, q in json.loads(sys.argv[3])]
out = runtime.predict(requests)
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
print(json.dumps(out))
"""


def run_blocked(folder: Path, graph_set: str, pairs: list[tuple[str, str]]) -> list[dict]:
    code = BLOCKER.format(blocked=BLOCKED)
    proc = subprocess.run([sys.executable, "-c", code, str(folder), graph_set, json.dumps(pairs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_runtime_runs_where_torch_prefect_and_mlflow_cannot_be_imported(folder, tmp_path):
    out, records = folder
    pairs = []
    for i, r in enumerate(records):
        path = tmp_path / f"scene{i}.png"
        path.write_bytes(r.image_bytes)
        pairs.append((str(path), r.question))
    got = run_blocked(out, "auto", pairs)
    want = StudentPredictor.load(out, backend="torch").predict([{"image": p, "question": q} for p, q in pairs])
    for g, w in zip(got, want):
        assert_agree(g, w)
    assert got == json.loads(json.dumps(StudentRuntime.load(out).predict([{"image": p, "question": q}
                                                                            for p, q in pairs])))


def test_the_ort_graphs_a_phone_runs_load_and_answer_alike(folder, tmp_path):
    """The export writes the int8 graphs in ORT format with the operators a minimal build needs;
    a bundle of just those, the tokenizer and the two JSON files (no weights, no .onnx) answers
    as the int8 graphs do, in a process without torch."""
    out, records = folder
    meta = graphs.read_meta(out)
    assert set(meta["ort"]) >= {"vision", "text", "step", "operators"}
    ort_dir = out / "onnx" / "ort"
    assert sorted(p.name for p in ort_dir.iterdir()) == ["required_operators.config", "step.ort",
                                                         "text-int8.ort", "vision-int8.ort"]
    reqs = all_requests(records)
    want = StudentRuntime.load(out, graphs="int8").predict(reqs)
    got = StudentRuntime.load(out, graphs="ort").predict(reqs)
    assert [g["answer"] for g in got] == [w["answer"] for w in want]
    assert [g["detector"]["labels"] for g in got] == [w["detector"]["labels"] for w in want]
    assert [g["retriever"]["ids"] for g in got] == [w["retriever"]["ids"] for w in want]
    bundle = tmp_path / "phone"
    (bundle / "onnx").mkdir(parents=True)
    shutil.copytree(ort_dir, bundle / "onnx" / "ort")
    for f in ("config.json", "tokenizer.json"):
        shutil.copy2(out / f, bundle / f)
    shutil.copy2(out / "onnx" / "meta.json", bundle / "onnx" / "meta.json")
    phone = StudentRuntime.load(bundle)
    assert phone.graphs == "ort" and graphs.runtime_ready(bundle)
    assert phone.predict(reqs[:4]) == got[:4]
    image = tmp_path / "scene.png"
    image.write_bytes(records[0].image_bytes)
    assert run_blocked(bundle, "ort", [(str(image), records[0].question)]) == json.loads(json.dumps(got[:1]))


def test_predict_dir_runs_the_runtime_where_the_folder_has_graphs(folder, tmp_path, monkeypatch):
    from distillery.registry.pull import predict_dir
    from distillery.students.serving import predictor

    out, records = folder
    image = tmp_path / "scene.png"
    image.write_bytes(records[1].image_bytes)
    want = StudentRuntime.load(out).answer(str(image), records[1].question)

    def no_torch(*a, **k):
        raise AssertionError("auto must not load the torch predictor on a folder with graphs")

    with monkeypatch.context() as m:
        m.setattr(predictor.StudentPredictor, "load", no_torch)
        assert predict_dir(out, image, records[1].question) == want
        assert predict_dir(out, image, records[1].question, backend="ort")["answer"] == want["answer"]
    bare = shutil.copytree(out, tmp_path / "no-graphs", ignore=shutil.ignore_patterns("onnx"))
    assert not graphs.runtime_ready(bare)
    assert predict_dir(bare, image, records[1].question) == StudentPredictor.load(
        bare, backend="torch").predict([{"image": str(image), "question": records[1].question}])[0]
    with pytest.raises(ValueError, match="no current ONNX graphs"):
        predict_dir(bare, image, records[1].question, backend="runtime")


def test_clear_errors_for_bad_requests_stale_graphs_and_unknown_node_types(folder, tmp_path):
    out, records = folder
    runtime = StudentRuntime.load(out)
    with pytest.raises(ValueError, match="request 1: cannot decode the image"):
        runtime.predict([requests_of(records)[0], {"image": b"not an image", "question": "q"}])
    with pytest.raises(ValueError, match="request 0: 'image' is neither an existing file nor valid base64"):
        runtime.answer("/no/such/file.png", "q")
    with pytest.raises(ValueError, match="graphs 'tensorrt': expected one of auto, int8, float, ort"):
        StudentRuntime.load(out, graphs="tensorrt")
    stale = shutil.copytree(out, tmp_path / "stale")
    config = json.loads((stale / "config.json").read_text())
    config["student"]["max_answer_tokens"] += 1  # the student changed after the export
    (stale / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no current ONNX graphs"):
        StudentRuntime.load(stale)
    other = shutil.copytree(out, tmp_path / "other")
    meta = json.loads((other / "onnx" / "meta.json").read_text())
    config = json.loads((other / "config.json").read_text())
    config["schema"]["nodes"]["brightness"] = {"type": "brightness"}
    (other / "config.json").write_text(json.dumps(config))
    (other / "onnx" / "meta.json").write_text(json.dumps({**meta, "digest": onnx.digest(other)}))
    with pytest.raises(ValueError, match="node type.*brightness.*torch backend"):
        StudentRuntime.load(other)
    assert not graphs.runtime_ready(other)


def test_the_mlflow_model_runs_the_runtime_and_refuses_bad_input_as_invalid_parameter(folder):
    from mlflow.exceptions import MlflowException
    import pandas as pd

    from distillery.registry.config import RegistryConfig
    from distillery.registry.pyfunc_model import StudentModel

    out, records = folder
    model = StudentModel()
    model.load_context(SimpleNamespace(artifacts={"student": str(out)}, model_config={}))
    assert isinstance(model.predictor, StudentRuntime)
    import base64

    good = base64.b64encode(records[0].image_bytes).decode()
    row = model.predict(None, pd.DataFrame({"image": [good], "question": [records[0].question]}))
    assert row["answer"][0] == StudentRuntime.load(out).answer(records[0].image_bytes, records[0].question)["answer"]
    bad = {"row 0: .image. is neither an existing file nor valid base64": pd.DataFrame({"image": ["%%%"], "question": ["q"]}),
           "cannot decode the image": pd.DataFrame({"image": [base64.b64encode(b"text").decode()], "question": ["q"]}),
           "missing column": pd.DataFrame({"image": [good]})}
    for reason, frame in bad.items():
        with pytest.raises(MlflowException, match=reason) as e:
            model.predict(None, frame)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE" and e.value.get_http_status_code() == 400
    runtime_reqs, torch_reqs = RegistryConfig().requirements(), RegistryConfig().requirements(torch=True)
    names = lambda reqs: {r.split("==")[0] for r in reqs}  # noqa: E731
    assert names(runtime_reqs) == {"mlflow", "onnxruntime", "numpy", "pillow", "tokenizers", "pycocotools", "pandas"}
    assert {"torch", "transformers"} <= names(torch_reqs)


CLI_BLOCKED = ("torch", "torchvision", "transformers", "prefect", "mlflow")  # (typer itself imports pydantic)
CLI = """
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this process")
        return None
sys.meta_path.insert(0, Blocker())
sys.argv = ["distillery", *sys.argv[1:]]
runpy.run_module("distillery.cli", run_name="__main__")
"""


def test_distillery_predict_answers_without_torch_prefect_or_mlflow(folder, tmp_path):
    out, records = folder
    image = tmp_path / "scene.png"
    image.write_bytes(records[2].image_bytes)
    proc = subprocess.run([sys.executable, "-c", CLI.format(blocked=set(CLI_BLOCKED)), "predict", str(out), "--image",
                           str(image), "--question", records[2].question], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got == json.loads(json.dumps(StudentRuntime.load(out).answer(str(image), records[2].question)))


def test_text_feed_counts_on_numpy_and_refuses_an_unknown_kind():
    """The text graph's inputs: the stride-16 features, the question, and the detector's counts
    computed from the vision graph's outputs; graphs asking for inputs this runtime cannot
    compute are refused, naming the node."""
    from distillery.students.serving.runtime import text_feed

    cls = np.full((2, 16, 3), -10.0, np.float32)
    cls[0, 5, 1] = 4.0  # one peak of class 1 in image 0
    meta = {"vision_outputs": [["detector", "cls"]],
            "prefix": {"detector": {"kind": "detection_counts", "grid": 4, "conf": 0.25, "max_det": 10,
                                    "num_classes": 3, "large_area": None}}}
    p16, ids, mask = np.zeros((2, 8, 2, 2), np.float32), np.ones((2, 3), np.int64), np.ones((2, 3), bool)
    feed, raw = text_feed(meta, [cls, p16], ids, mask)
    assert feed["p16"] is p16 and raw["detector"]["cls"] is cls
    assert feed["detector.counts"].tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    meta["prefix"]["detector"]["kind"] = "mystery"
    with pytest.raises(ValueError, match="'detector'.*'mystery'"):
        text_feed(meta, [cls, p16], ids, mask)
