"""`yolo` node: an Ultralytics detector or segmenter (any weights file or model YAML)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from teachers.base import ItemError, NodeConfig, NodeInput, TeacherNode, register_node


class YoloConfig(NodeConfig):
    """Ultralytics YOLO teacher. Output per box: normalized xyxy, class id, confidence, the
    per-class score vector (soft label) and, for ``task: segment``, the instance mask (COCO RLE)."""

    type: Literal["yolo"] = "yolo"
    weights: str = Field(description="Weights file (.pt) or model YAML, local path or Ultralytics name.")
    task: Literal["detect", "segment"] = "detect"
    image: Literal["request.image"] = Field("request.image", description="Where the image comes from.")
    imgsz: int = Field(640, ge=32, description="Inference size in pixels.")
    conf: float = Field(0.25, ge=0.0, le=1.0, description="Confidence threshold.")
    iou: float = Field(0.7, ge=0.0, le=1.0, description="NMS IoU threshold.")
    max_det: int = Field(100, ge=1)
    device: str | None = Field(None, description="torch device; None = auto.")

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"boxes", "classes", "scores", "class_probs", "masks", "labels", "summary", "count"}
    )
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("weights",)


@register_node("yolo")
class YoloNode(TeacherNode):
    config_cls = YoloConfig
    config: YoloConfig

    def load(self) -> None:  # implemented in the teacher-side work
        raise NotImplementedError

    def run(self, batch: list[NodeInput]) -> list[dict[str, Any] | ItemError]:
        raise NotImplementedError
