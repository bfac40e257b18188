"""Shared by the registry and serving tests: a real tiny student, a spec, an image, a store.

``registry_env`` is a session fixture (import it into a test module to use it): one SQLite
store, one student and one registered champion ``CHAMPION_NAME`` serve both test modules."""

from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from distillery.flows.spec import Spec

import mlflow
import pytest

QUESTION = "How many objects are there?"
CHAMPION_NAME = "pull-model"
LINEAGE = {"graph_fingerprint": "gf-abc", "traces_version": 7, "traces_uri": "/data/traces.lance",
           "prefect_flow_run_id": "fr-1"}


def image_bytes() -> bytes:
    """A small PNG with two shapes on it."""
    img = Image.new("RGB", (96, 96), (30, 30, 30))
    draw = ImageDraw.Draw(img)
    draw.ellipse((8, 8, 40, 40), fill=(220, 40, 40))
    draw.rectangle((52, 50, 90, 88), fill=(40, 200, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_spec(tracking_uri: str, name: str = "tiny-student", gate: dict | None = None) -> Spec:
    """A spec naming the registry store; its teachers are never loaded by these tests."""
    return Spec.model_validate({
        "name": name,
        "teachers": {
            "detector": {"type": "yolo", "weights": "yolo11n-seg.yaml", "task": "segment"},
            "retriever": {"type": "rag", "documents": "kb.jsonl", "query": "{request.question}"},
            "reasoner": {"type": "llm", "model": "llm/", "prompt": "{retriever.context} {request.question}"},
        },
        "registry": {"tracking_uri": tracking_uri, "gate": gate if gate is not None else {"answer_agreement": 0.5}},
    })


def build_student(out: Path) -> Path:
    """A real tiny student (random weights, fixed seed) saved as its artifact folder:
    model.safetensors, config.json, tokenizer files, metrics.json, lineage.json.

    The graph and schema come from the student tests' hand-made records (student_support);
    the detector's confidence threshold is 0 so even untrained it returns boxes and masks."""
    import torch

    from distillery.flows.spec import load_spec
    from student_support import make_records, tiny_config, write_graph
    from distillery.students.data import build_schema
    from distillery.students.model.student import MultimodalStudent

    graph = out.parent / f"{out.name}-graph"
    graph.mkdir(parents=True, exist_ok=True)
    schema = build_schema(load_spec(write_graph(graph)), make_records())
    schema.nodes["detector"].update(conf=0.0, max_det=3)
    torch.manual_seed(0)
    MultimodalStudent(tiny_config(), schema).save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"answer_agreement": 0.9}))
    (out / "lineage.json").write_text(json.dumps({"graph_fingerprint": "gf-1", "traces_version": 3}))
    return out


@contextmanager
def mlflow_uri_restored():
    """Undo what ``mlflow.set_tracking_uri`` does to the process (its global and the
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI variables), so later test modules see the
    environment conftest set up."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def train_and_register(env: dict, name: str, metrics: dict, gate: dict | None = None,
                       eval_set: str | None = None, lineage: dict | None = None):
    """One 'training run': a run with the spec, then log + register the student.

    Returns (spec, run id, logged model URI, ModelVersion)."""
    from distillery.registry import models
    from distillery.registry import tracking

    spec = make_spec(env["uri"], name=name, gate=gate)
    lineage = lineage or {"graph_fingerprint": "gf-1", "traces_version": 3}
    with tracking.start_run(spec.registry, spec, run_name="train") as run:
        uri = models.log_student(env["student"], spec, metrics, lineage)
    mv = models.register_student(uri, spec, metrics, lineage, eval_set=eval_set)
    return spec, run.info.run_id, uri, mv


@pytest.fixture(scope="session")
def registry_env(tmp_path_factory):
    """A store with a registered champion, the student, an image on disk, and the student's own
    answer to (image, QUESTION). Keys: tmp, uri, student, image, direct, champion (ModelVersion),
    champion_run, champion_uri, champion_spec. Tests point MLflow at ``uri`` themselves."""
    from distillery.registry import models
    from distillery.students.serving.predictor import StudentPredictor

    tmp = tmp_path_factory.mktemp("registry")
    student = build_student(tmp / "student")
    image = tmp / "shapes.png"
    image.write_bytes(image_bytes())
    direct = StudentPredictor.load(student, device="cpu").predict([{"image": str(image), "question": QUESTION}])[0]
    assert direct["detector"]["boxes"] and direct["detector"]["masks"] and direct["retriever"]["ids"]
    env = {"tmp": tmp, "uri": f"sqlite:///{tmp / 'mlflow.db'}", "student": student, "image": image, "direct": direct}
    metrics = {"answer_agreement": 0.9}
    with mlflow_uri_restored():
        spec, run_id, uri, mv = train_and_register(env, CHAMPION_NAME, metrics, lineage=LINEAGE)
        assert models.promote(CHAMPION_NAME, mv.version, metrics, spec.registry.gate, None).promoted
    env.update(champion=mv, champion_run=run_id, champion_uri=uri, champion_spec=spec)
    return env
