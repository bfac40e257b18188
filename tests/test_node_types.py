"""A node type lives in one place on each side: a new one is a teacher node class and a student
head class, registered by the same key, and nothing else changes.

Here a toy type, ``brightness`` (the teacher measures an image's mean brightness; the student's
head regresses it from the conv features), is registered from this file alone, then goes the
whole way: a spec names it, the record loop runs it, the schema sizes its head, the dataset
builds and collates its targets, one training epoch steps its loss, the predictor answers with
it, and the evaluation scores it with the head's own metric.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from student_support import tiny_config
from torch import Tensor, nn

from distillery.flows.spec import Spec
from distillery.students.model.heads import HEADS, Features, Head, head_class, register_head
from distillery.students.model.heads.base import present_mask
from distillery.teachers.base import NODE_TYPES, NodeConfig, TeacherNode, node_class, register_node

KEY = "brightness"


class BrightnessConfig(NodeConfig):
    type: Literal["brightness"] = "brightness"
    OUTPUT_FIELDS = frozenset({"level"})


class BrightnessNode(TeacherNode):
    config_cls = BrightnessConfig

    def load(self) -> None:
        pass

    def run(self, batch):
        return [{"level": float(np.asarray(item.image, dtype=np.float32).mean() / 255)} for item in batch]


class BrightnessHead(Head):
    reads_text = False
    OUTPUT_KEY = "level"

    @classmethod
    def target_builder(cls, name, node, ctx):
        return lambda out: None if out is None else {"level": torch.tensor(float(out["level"]))}

    @classmethod
    def collate(cls, entries: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        levels = [e["target"]["level"] if e["present"] else torch.tensor(0.0) for e in entries]
        return {"mask": present_mask(entries), "level": torch.stack(levels)}

    @classmethod
    def metrics(cls, preds, refs, *, k: int = 5, truth: bool = False) -> dict[str, float]:
        return {"abs_error": float(np.mean([abs(p.get("level", 0.0) - r["level"]) for p, r in zip(preds, refs)]))}

    def __init__(self, name, node, cfg):
        super().__init__(name, node, cfg)
        self.out = nn.Linear(cfg.vision_widths[-1], 1)

    def forward(self, feats: Features) -> dict[str, Tensor]:
        return {"level": self.out(feats.maps["p16"].float().mean((2, 3)))[:, 0].sigmoid()}  # (B,)

    def empty_outputs(self, B: int, device: torch.device) -> dict[str, Tensor]:
        return {"level": torch.zeros(B, device=device)}

    def loss(self, out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        m = target["mask"].float()
        return ((out["level"] - target["level"]) ** 2 * m).sum() / m.sum().clamp(min=1)

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        return {"level": float(out["level"][i])}


@pytest.fixture
def toy_type():
    """The toy type registered (by the public decorators) for one test, then removed again."""
    register_node(KEY)(BrightnessNode)
    register_head(KEY)(BrightnessHead)
    yield
    NODE_TYPES.pop(KEY)
    HEADS.pop(KEY)


def spec_for(tmp_path) -> Spec:
    return Spec.model_validate({
        "name": "toy", "inputs": {"default_question": "how bright is it?"},
        "teachers": {"light": {"type": KEY, "batch_size": 4}},
        "student": tiny_config().model_dump(),
        "training": {"epochs": 1, "batch_size": 4, "warmup_steps": 1, "val_fraction": 0.25, "onnx_export": False,
                     "checkpoint_every": 100},
    })


def test_a_registered_type_goes_from_spec_to_trained_student_and_its_metric(toy_type, tmp_path):
    from distillery.students.evaluation.metrics import evaluate_student
    from distillery.students.serving.predictor import StudentPredictor
    from distillery.students.training.train import train
    from distillery.teachers.record import record

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 20 * i, 20 * i)).save(inputs / f"{i:02d}.png")
    spec = spec_for(tmp_path)
    assert node_class(KEY) is BrightnessNode and head_class(KEY) is BrightnessHead

    summary = record(spec, str(inputs), str(tmp_path / "traces.lance"))
    assert (summary.written, summary.quarantined) == (12, 0)

    result = train(spec, str(tmp_path / "traces.lance"), None, tmp_path / "student", progress=False)
    assert result.model.schema.nodes["light"]["type"] == KEY
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss/light"])  # its loss stepped

    predictor = StudentPredictor.load(tmp_path / "student", backend="torch")
    answer = predictor.predict([{"image": str(inputs / "03.png")}])[0]
    assert set(answer) == {"light"} and 0.0 <= answer["light"]["level"] <= 1.0

    from distillery.teachers.store import TraceStore

    records = TraceStore(str(tmp_path / "traces.lance")).read(status="ok")
    report = evaluate_student(predictor, records)
    assert set(report["light"]) == {"abs_error", "n"} and report["light"]["n"] == 12


def test_the_spec_form_offers_every_registered_type_and_an_unknown_one_is_named(toy_type, tmp_path):
    schema = Spec.model_json_schema()["properties"]["teachers"]["additionalProperties"]
    consts = {o["properties"]["type"].get("const") for o in schema["oneOf"] if "properties" in o} | {
        Spec.model_json_schema()["$defs"][o["$ref"].split("/")[-1]]["properties"]["type"]["const"]
        for o in schema["oneOf"] if "$ref" in o}
    assert {"yolo", "rag", "llm", KEY} <= consts
    with pytest.raises(ValueError, match=r"teachers\.light\.type[\s\S]*unknown teacher node type 'brightnes'"):
        Spec.model_validate({"name": "toy", "teachers": {"light": {"type": "brightnes"}}})
