"""`yolo` node: an Ultralytics detector or segmenter (any weights file or model YAML).

Per image the node returns the hard labels (normalized boxes, class ids, scores, instance masks as
COCO RLE at the original image size) and the soft label Ultralytics computes but does not expose:
the per-class score vector of every kept box. The predictor's own per-object hook hands us the
anchor indices NMS kept, and we read those anchors' class rows from the raw head output.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from distillery import rle
from distillery.detections import describe_detections, large_labels  # noqa: F401  (the node's summary)
from distillery.teachers.base import ItemError, NodeConfig, NodeInput, TeacherNode, register_node


class YoloConfig(NodeConfig):
    """Ultralytics YOLO teacher. Output per box: normalized xyxy, class id, confidence, the
    per-class score vector (soft label) and, for ``task: segment``, the instance mask (COCO RLE).

    ``.pt`` files are unpickled by Ultralytics: load only weights you trust."""

    type: Literal["yolo"] = "yolo"
    weights: str = Field(description="Weights file (.pt) or model YAML, local path or Ultralytics name.")
    task: Literal["detect", "segment"] = "detect"
    image: Literal["request.image"] = Field("request.image", description="Where the image comes from.")
    imgsz: int = Field(640, ge=32, description="Inference size in pixels.")
    conf: float = Field(0.25, ge=0.0, le=1.0, description="Confidence threshold.")
    iou: float = Field(0.7, ge=0.0, le=1.0, description="NMS IoU threshold.")
    max_det: int = Field(100, ge=1)
    device: str | None = Field(None, description="torch device; None = auto.")
    large_area: float | None = Field(
        None, gt=0.0, le=1.0,
        description="task segment: an object whose mask covers at least this fraction of the image is "
                    "large, and the summary says how many of each class are ('red circle x2 (1 large)').")

    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"boxes", "classes", "scores", "class_probs", "masks", "areas", "labels", "summary", "count", "image_size"}
    )
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("weights",)

    @model_validator(mode="after")
    def _large_needs_masks(self) -> YoloConfig:
        if self.large_area is not None and self.task != "segment":
            raise ValueError("large_area is measured on the masks: it needs task: segment")
        return self


# -- the predictor that keeps the soft labels -------------------------------------------------
@functools.cache
def _predictor_class(task: str) -> type:
    """Ultralytics' predictor for ``task``, plus each kept box's class-score row in ``Results.feats``.

    It rides Ultralytics' per-object hook (made for its ReID tracker): while ``predictor._feats``
    is set, ``DetectionPredictor.postprocess`` runs NMS with ``return_idxs=True``, passes the kept
    anchor indices to ``get_obj_feats`` and stores what it returns as ``Results.feats``; the
    segment predictor then keeps boxes with empty masks too, so rows stay aligned (``run`` drops
    those boxes, as Ultralytics does). Imported lazily: ultralytics is heavy."""
    from ultralytics.models.yolo.detect import DetectionPredictor
    from ultralytics.models.yolo.segment import SegmentationPredictor

    base = SegmentationPredictor if task == "segment" else DetectionPredictor

    class SoftLabelPredictor(base):
        def postprocess(self, preds, img, orig_imgs, **kwargs):
            if getattr(self.model, "end2end", False):
                raise ValueError("NMS-free (end2end) heads do not keep per-class scores; predict with NMS")
            head = preds[0] if isinstance(preds, (list, tuple)) else preds
            self._feats = head[0] if isinstance(head, (list, tuple)) else head  # (B, 4+nc+extra, A)
            try:
                return super().postprocess(preds, img, orig_imgs, **kwargs)
            finally:
                self._feats = None

        def get_obj_feats(self, head, idxs):
            nc = len(self.model.names)
            # head (B, 4+nc+extra, A); idxs[b] (N_b,) kept anchors -> (N_b, nc) per image
            return [head[b, 4:4 + nc, k.long().view(-1)].T.float() for b, k in enumerate(idxs)]

    return SoftLabelPredictor


# -- the node ---------------------------------------------------------------------------------
@register_node("yolo")
class YoloNode(TeacherNode):
    config_cls = YoloConfig
    config: YoloConfig

    def __init__(self, name: str, config: YoloConfig):
        super().__init__(name, config)
        self.model = None  # ultralytics.YOLO once loaded
        self.names: dict[int, str] = {}

    def load(self) -> None:
        """Load the weights (or build from YAML) once and check the model does ``config.task``."""
        if self.model is not None:
            return
        from distillery import runtime

        runtime.configure()
        from ultralytics import YOLO
        from ultralytics.nn.tasks import guess_model_task

        runtime.quiet_ultralytics()
        cfg = self.config
        _check_local_path(self.name, cfg.weights)
        _check_weights_only(self.name, cfg.weights)
        with runtime.torch_threads():
            model = YOLO(cfg.weights, task=cfg.task)
        found = guess_model_task(model.model)
        if found != cfg.task:
            raise ValueError(f"yolo node {self.name!r}: weights {cfg.weights!r} are a {found!r} model, "
                             f"but the node says task: {cfg.task}")
        self.model, self.names = model, dict(model.names)

    def predict_args(self) -> dict[str, Any]:
        """Keyword arguments of every ``predict`` call.

        ``rect=False`` letterboxes every image to the same square, so an image's output does not
        depend on the other images in its batch (a rerun in another shard gives the same record)."""
        cfg = self.config
        args = dict(imgsz=cfg.imgsz, conf=cfg.conf, iou=cfg.iou, max_det=cfg.max_det, rect=False,
                    verbose=False, save=False, predictor=_predictor_class(cfg.task))
        if cfg.device is not None:
            args["device"] = cfg.device
        return args

    def run(self, batch: list[NodeInput]) -> list[dict[str, Any] | ItemError]:
        """One batched ``predict`` over the batch's images; an input without an image fails alone."""
        self.load()
        outs: list[dict[str, Any] | ItemError] = [
            ItemError(f"input {item.input_id}: no image (the yolo node reads request.image)")
            for item in batch
        ]
        todo = [i for i, item in enumerate(batch) if item.image is not None]
        if not todo:
            return outs
        images = [_rgb(batch[i].image) for i in todo]
        from distillery import runtime

        with runtime.torch_threads():  # its select_device would leave torch on cpu_count - 1 threads
            results = self.model.predict(images, **self.predict_args())
        for i, result in zip(todo, results, strict=True):
            outs[i] = self.to_output(result)
        return outs

    def to_output(self, result) -> dict[str, Any]:
        """One Ultralytics ``Results`` (+ its soft labels in ``feats``) -> the node's output dict."""
        import torch

        h, w = result.orig_shape
        boxes = result.boxes
        probs = result.feats  # (N, nc)
        _check_aligned(probs, boxes.conf, boxes.cls)
        keep = torch.ones(len(boxes), dtype=torch.bool)
        masks: list[dict[str, Any]] = []
        areas: list[float] = []
        if self.config.task == "segment" and result.masks is not None:
            data = result.masks.data.cpu()  # (N, h', w') at inference size, letterboxed
            keep = data.flatten(1).amax(1) > 0  # Ultralytics drops boxes whose mask is empty
            masks = [rle.encode(_unletterbox(m, (h, w))) for m in data[keep]]
            areas = [round(rle.area(r) / (h * w), 6) for r in masks]
        classes = boxes.cls.cpu()[keep].numpy().astype(np.int32)  # (N,)
        labels = [self.names[int(c)] for c in classes]
        large = large_labels(labels, areas, self.config.large_area) if len(areas) == len(labels) else None
        return {
            "boxes": boxes.xyxyn.cpu()[keep].numpy().astype(np.float32),  # (N, 4) xyxy in 0..1
            "classes": classes,
            "scores": boxes.conf.cpu()[keep].numpy().astype(np.float32),  # (N,)
            "class_probs": probs.cpu()[keep].numpy().astype(np.float32),  # (N, C) independent sigmoids
            "labels": labels,
            "masks": masks,
            "areas": areas,  # (N,) mask area, fraction of the image (segment)
            "summary": describe_detections(labels, large),
            "count": len(labels),
            "image_size": [int(h), int(w)],
        }


def _check_local_path(node: str, weights: str) -> None:
    """A path with a folder in it must exist (bare names like ``yolo11n.pt`` are Ultralytics')."""
    p = Path(weights).expanduser()
    if (p.is_absolute() or p.parent != Path(".")) and not p.exists():
        raise FileNotFoundError(f"yolo node {node!r}: weights file {weights!r} does not exist")


def checkpoint_class_names(weights: str) -> list[str]:
    """The class names (by id) a YOLO ``.pt`` checkpoint holds, read weights-only against
    Ultralytics' allow-list (as ``_check_weights_only``); [] for a model YAML or a bare name."""
    path = Path(weights).expanduser()
    if path.suffix != ".pt" or not path.is_file():
        return []
    from distillery import runtime

    runtime.configure()
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(path), safe_only=True)
    names = getattr(ckpt.get("ema") or ckpt.get("model"), "names", None) or {}
    names = dict(enumerate(names)) if isinstance(names, list) else names
    return [str(names.get(i, i)) for i in range(max(names, default=-1) + 1)]


def _check_weights_only(node: str, weights: str) -> None:
    """A ``.pt`` file is a pickle, and Ultralytics unpickles it in full (``weights_only=False``)
    unless ``ULTRALYTICS_SAFE_LOAD`` was set before it was imported: load it first with
    ``weights_only=True`` against Ultralytics' allow-list of its own classes, so a checkpoint that
    names anything else is refused before any code of it can run (weights come from specs, which
    the Prefect UI edits)."""
    if not str(weights).endswith(".pt") or not Path(weights).expanduser().is_file():
        return  # a model YAML builds a random model; a bare name is Ultralytics' (offline: refused later)
    from ultralytics.nn.tasks import torch_safe_load

    try:
        torch_safe_load(str(Path(weights).expanduser()), safe_only=True)
    except TypeError as e:
        raise ValueError(f"yolo node {node!r}: weights {weights!r} refused by a weights-only load "
                         f"(not a plain Ultralytics checkpoint): {str(e).splitlines()[0]}") from None


def _check_aligned(probs, conf, cls) -> None:
    """Each box's score is its class's entry in its score vector; anything else means the
    Ultralytics internals we rely on have moved."""
    import torch

    if probs is None or len(probs) != len(conf):
        raise RuntimeError("yolo: per-class scores missing or misaligned with the boxes "
                           "(unsupported Ultralytics version?)")
    if len(conf):
        picked = probs.gather(1, cls.long().view(-1, 1)).view(-1)  # (N,)
        if not torch.allclose(picked.cpu(), conf.float().cpu(), atol=1e-4):
            raise RuntimeError("yolo: per-class scores do not match the box scores "
                               "(unsupported Ultralytics version?)")


def _unletterbox(mask, size: tuple[int, int]) -> np.ndarray:
    """(h', w') mask at letterboxed inference size -> (H, W) uint8 at the original image size."""
    from ultralytics.utils import ops

    full = ops.scale_masks(mask[None, None].float(), size)[0, 0]  # (H, W), padding removed
    return (full > 0.5).numpy().astype(np.uint8)


def _rgb(image):
    return image if image.mode == "RGB" else image.convert("RGB")
