"""The detection head (teacher node type ``yolo``): boxes, class distributions and instance masks
from the stride-8 features, and what the text decoder reads of them (per-class count slots, with
the number of large objects per class when the teacher node has ``large_area``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery import rle
from distillery.students.model import losses
from distillery.students.model.config import StudentConfig
from distillery.students.model.heads.base import (Features, Head, Output, Target, TargetContext, conv_bn_act,
                                                  lengths_mask, mean_embed, pad, padded, present_mask, register_head)
from distillery.students.model.arrays import detection_thresholds, detections
from distillery.students.model.scores import detection_map, mean_mask_iou


# ---------------------------------------------------------------------------------------------
# yolo -> detection (+ instance masks)
# ---------------------------------------------------------------------------------------------

@register_head("yolo")
class DetectionHead(Head):
    """Anchor-free head on the stride-8 features: per location class scores (CenterNet heatmaps
    peaking at the teacher's per-class scores) and box distances l, t, r, b (trained at FCOS
    positives); with task segment, YOLACT prototypes (stride 4) and per-location coefficients."""

    reads_text = False
    OUTPUT_KEY = "boxes"

    @classmethod
    def schema_entry(cls, name: str, config: Any, outputs: list[Output]) -> dict[str, Any]:
        """num_classes and class_names (from the recorded labels and class-score rows), the
        teacher's thresholds, and its large_area (masks that count as large)."""
        names: dict[int, str] = {}
        num = 0
        for o in outputs:
            probs = np.asarray(o.get("class_probs", []))
            if probs.ndim == 2:
                num = max(num, probs.shape[1])
            for c, label in zip(np.asarray(o.get("classes", []), dtype=np.int64).tolist(), o.get("labels", [])):
                names[c] = str(label)
        num = max(num, max(names, default=-1) + 1, 1)
        return {"task": config.task, "num_classes": num, "class_names": [names.get(i, str(i)) for i in range(num)],
                "conf": config.conf, "iou": config.iou, "max_det": config.max_det,
                "large_area": getattr(config, "large_area", None)}

    @classmethod
    def feature_maps(cls, node: dict[str, Any]) -> set[str]:
        return {"p4"} if node.get("task") == "segment" else set()  # the mask prototypes' stride

    @classmethod
    def target_builder(cls, name: str, node: dict[str, Any], ctx: TargetContext
                       ) -> Callable[[Output | None], Target | None]:
        """An empty target where the node has no output: the batch still needs C and the mask size."""
        proto = ctx.cfg.image_size // 4
        return lambda out: yolo_target(out or {}, node, proto, flip=False)

    @classmethod
    def flip_target(cls, target: Target) -> Target:
        b = target["boxes"]  # (N, 4) xyxy normalized
        return {**target, "boxes": torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1).clamp(0, 1),
                "masks": target["masks"].flip(-1)}

    @classmethod
    def collate(cls, entries: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        ts = [e["target"] for e in entries]  # every input has one (empty where not present)
        boxes = pad([t["boxes"] for t in ts], 0.0)
        return {"mask": present_mask(entries), "boxes": boxes,
                "valid": lengths_mask([t["boxes"] for t in ts], boxes.shape[1]),
                "probs": pad([t["probs"] for t in ts], 0.0), "masks": pad([t["masks"] for t in ts], 0),
                "areas": pad([t["areas"] for t in ts], 0.0), "has_masks": torch.stack([t["has_masks"] for t in ts])}

    @classmethod
    def metrics(cls, preds: Sequence[Output], refs: Sequence[Output], *, k: int = 5,
                truth: bool = False) -> dict[str, float]:
        """Box mAP50 and mAP50-95 (COCO, torchmetrics), and mask IoU where either side has masks."""
        out = detection_map(preds, refs)
        if any(r.get("masks") for r in refs) or any(p.get("masks") for p in preds):
            out["mask_iou"] = mean_mask_iou(preds, refs)
        return out

    def __init__(self, name: str, node: dict[str, Any], cfg: StudentConfig):
        super().__init__(name, node, cfg)
        c4, c8, w = cfg.vision_widths[1], cfg.vision_widths[2], cfg.det_width
        self.num_classes, self.segment = int(node["num_classes"]), node.get("task") == "segment"
        act = cfg.vision_act
        self.tower = nn.Sequential(conv_bn_act(c8, w, act=act), conv_bn_act(w, w, act=act))
        self.cls = nn.Conv2d(w, self.num_classes, 1)
        self.box = nn.Conv2d(w, 4, 1)
        nn.init.constant_(self.cls.bias, -4.6)  # prior 0.01 (RetinaNet)
        if self.segment:
            self.coef = nn.Conv2d(w, cfg.num_prototypes, 1)
            self.proto = nn.Sequential(conv_bn_act(c4, c4, act=act), nn.Conv2d(c4, cfg.num_prototypes, 1))
        # teacher node's large_area: the slots (or summary) also carry how many objects per class
        # have a mask that covers at least this fraction of the image
        self.large_area = node.get("large_area") if self.segment else None
        if cfg.detection_summary == "slots":
            self.count_vec = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
            if self.large_area is not None:  # a second slot per class: its large objects
                self.large_vec = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
                self.large_tag = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
        if self.large_area is not None:
            q = cfg.image_size // 4  # the prototypes' grid
            c = (torch.arange(q, dtype=torch.float32) + 0.5) / q
            py, px = torch.meshgrid(c, c, indexing="ij")
            self.register_buffer("proto_points", torch.stack([px, py], -1).view(-1, 2), persistent=False)  # (K, 2)
        n = cfg.image_size // 8
        centers = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        gy, gx = torch.meshgrid(centers, centers, indexing="ij")
        self.register_buffer("points", torch.stack([gx, gy], -1).view(-1, 2), persistent=False)  # (P, 2)
        self.stride = 1.0 / n  # one stride, normalized

    def forward(self, feats: Features) -> dict[str, Tensor]:
        x = self.tower(feats.maps["p8"])  # (B, w, S/8, S/8)
        flat = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  (B, c, H, W) -> (B, P, c)
        dist = F.softplus(flat(self.box(x)).float()) * self.stride  # (B, P, 4) normalized l, t, r, b
        boxes = torch.cat([self.points - dist[..., :2], self.points + dist[..., 2:]], -1)  # (B, P, 4) xyxy
        out = {"cls": flat(self.cls(x)), "boxes": boxes}  # (B, P, C) logits, (B, P, 4)
        if self.segment:
            out["coef"] = flat(self.coef(x))  # (B, P, M)
            out["protos"] = self.proto(feats.maps["p4"])  # (B, M, S/4, S/4)
        return out

    def empty_outputs(self, B: int, device: torch.device) -> dict[str, Tensor]:
        return {"cls": torch.full((B, len(self.points), self.num_classes), -30.0, device=device)}

    # -- what the text decoder reads: detections per class ------------------------------------
    def thresholds(self) -> tuple[float, float, int]:
        """(confidence, NMS IoU, max detections): the student config's where set, else the node's."""
        return detection_thresholds(self.cfg.model_dump(include={"det_conf", "det_iou", "max_det"}), self.node)

    def peak_scores(self, cls_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Heatmap peaks (3 x 3 local maxima, CenterNet): per location the best peak class and
        its score, and every class score. cls_logits (B, P, C) -> (B, P), (B, P), (B, P, C)."""
        probs = cls_logits.float().sigmoid()  # (B, P, C)
        B, P, C = probs.shape
        n = self.cfg.image_size // 8  # the stride-8 grid (P = n * n), static for tracing
        grid = probs.transpose(1, 2).reshape(B, C, n, n)
        peaks = (grid == F.max_pool2d(grid, 3, 1, 1)).reshape(B, C, P).transpose(1, 2)  # (B, P, C)
        scores, classes = (probs * peaks).max(-1)
        return scores, classes, probs

    def counts(self, out: dict[str, Tensor], target: dict[str, Tensor] | None,
               peaks: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None) -> Tensor:
        """Detections per class (B, C): the teacher's where the batch has them (training), else
        the head's own (peaks above the confidence threshold). ``peaks``: ``peak_scores`` of
        ``out["cls"]``, computed once for this and ``large_counts``."""
        peaks = peaks or (lambda: self.peak_scores(out["cls"]))

        def own() -> Tensor:
            scores, classes, _ = peaks()
            return self._per_class(classes, (scores > self.thresholds()[0]).float())

        with torch.no_grad():
            return self._teacher_or_own(target, own)

    def _per_class(self, classes: Tensor, kept: Tensor) -> Tensor:
        """(B, N) class ids and 0/1 weights -> (B, C) sums per class."""
        return kept.new_zeros(kept.shape[0], self.num_classes).scatter_add_(1, classes, kept)

    def _teacher_or_own(self, target: dict[str, Tensor] | None, own: Callable[[], Tensor],
                        where: Tensor | None = None) -> Tensor:
        """Per class, the teacher's boxes (those with ``where`` (B, N)) for the inputs that have
        them, ``own()``'s for the others (not computed when every input has them)."""
        if target is None:
            return own()
        valid = target["valid"] & target["mask"][:, None]  # (B, N)
        if where is not None:
            valid = valid & where
        teacher = self._per_class(target["probs"].argmax(-1), valid.float())  # a box's class: its best score's
        return teacher if bool(target["mask"].all()) else torch.where(target["mask"][:, None], teacher, own())

    def mask_areas(self, out: dict[str, Tensor], idx: Tensor | None = None) -> Tensor:
        """Per location (or per location in ``idx`` (B, N)), the share of the image its instance
        mask covers (logit > 0 inside its own box, on the prototypes' stride-4 grid): (B, P) or
        (B, N). Static shapes, so it traces into ONNX."""
        coef, boxes = out["coef"].float(), out["boxes"]  # (B, P, M), (B, P, 4)
        if idx is not None:
            coef = coef.gather(1, idx[..., None].expand(-1, -1, coef.shape[-1]))  # (B, N, M)
            boxes = boxes.gather(1, idx[..., None].expand(-1, -1, 4))  # (B, N, 4)
        logits = torch.einsum("bpm,bmk->bpk", coef, out["protos"].float().flatten(2))  # (B, P, K)
        px, py = self.proto_points[:, 0], self.proto_points[:, 1]  # (K,)
        b = boxes[..., None]  # (B, P, 4, 1)
        inside = (px >= b[:, :, 0]) & (px <= b[:, :, 2]) & (py >= b[:, :, 1]) & (py <= b[:, :, 3])  # (B, P, K)
        return ((logits > 0) & inside).float().mean(-1)

    def large_counts(self, out: dict[str, Tensor], target: dict[str, Tensor] | None,
                     peaks: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None) -> Tensor:
        """Large objects per class (B, C) (mask area >= ``large_area``): the teacher's masks' in
        training, the head's own at inference: among its ``max_det`` strongest peaks (as the
        teacher keeps at most max_det boxes), those above the threshold with a mask that large
        (masks for those peaks only: a fraction of the work of every location's)."""
        peaks = peaks or (lambda: self.peak_scores(out["cls"]))

        def own() -> Tensor:
            scores, classes, _ = peaks()
            conf, _, max_det = self.thresholds()
            scores, idx = scores.topk(min(max_det, scores.shape[1]), dim=1)  # (B, N) strongest peaks
            kept = scores > conf
            if "coef" in out:  # (a text-only echo step's empty outputs have no masks: nothing seen)
                kept = kept & (self.mask_areas(out, idx) >= self.large_area)
            else:
                kept = torch.zeros_like(kept)
            return self._per_class(classes.gather(1, idx), kept.float())

        with torch.no_grad():
            return self._teacher_or_own(target, own, None if target is None else target["areas"] >= self.large_area)

    def prefix_len(self) -> int:
        mode = self.cfg.detection_summary
        slots = self.num_classes * (1 if self.large_area is None else 2)
        return slots if mode == "slots" else self.cfg.max_summary_tokens if mode == "text" else 0

    # The counts the decoder reads, as the ONNX text graph takes them (computed beside it on numpy
    # by ``arrays.detection_counts``: dense peaks over 80 class maps at 640 px were half the text
    # graph's time at batch 16).
    COUNT_KEYS = ("counts", "large")

    def prefix_inputs(self, out: dict[str, Tensor], target: dict | None) -> dict[str, Tensor]:
        """What the decoder reads of the detections before they become tokens: ``counts`` (B, C)
        per class, and ``large`` (B, C) where the node has ``large_area``; the teacher's in
        training, the head's own at inference. Given in ``out`` (the ONNX text graph's inputs),
        they are taken as they are."""
        if all(k in out for k in self.prefix_input_keys()):
            return {k: out[k] for k in self.prefix_input_keys()}
        memo: list = []  # the peaks once for both counts (one max-pool over the class maps, not two)

        def peaks() -> tuple[Tensor, Tensor, Tensor]:
            if not memo:
                memo.append(self.peak_scores(out["cls"]))
            return memo[0]

        res = {"counts": self.counts(out, target, peaks).round()}  # (B, C)
        if self.large_area is not None:
            res["large"] = self.large_counts(out, target, peaks).round()  # (B, C)
        return res

    def prefix_input_keys(self) -> tuple[str, ...]:
        """The keys of ``prefix_inputs`` (none when the decoder reads no detections)."""
        if self.cfg.detection_summary == "none":
            return ()
        return self.COUNT_KEYS if self.large_area is not None else self.COUNT_KEYS[:1]

    def prefix_numpy(self) -> dict[str, Any]:
        """How the runtime computes ``prefix_inputs`` at inference (``arrays.detection_counts``'s
        arguments; the ONNX export's ``meta["prefix"]``)."""
        conf, _, max_det = self.thresholds()
        return {"kind": "detection_counts", "grid": self.cfg.image_size // 8, "conf": conf, "max_det": max_det,
                "num_classes": self.num_classes, "large_area": self.large_area}

    def prefix_embeds(self, out: dict[str, Tensor], target: dict | None, tokenizer,
                      embed: nn.Embedding) -> tuple[Tensor, Tensor] | None:
        """What the text decoder reads of the detections (``detection_summary``): per-class slots,
        or the summary text, from ``prefix_inputs``."""
        mode = self.cfg.detection_summary
        if mode == "none":
            return None
        given = self.prefix_inputs(out, target)
        counts, large = given["counts"], given.get("large")
        if mode == "slots":
            slots = self.slots(counts, tokenizer, embed, large)  # (B, C or 2C, d)
            return slots, torch.ones(slots.shape[:2], dtype=torch.bool, device=counts.device)
        ids, valid = self.summary_ids(counts, tokenizer, large)
        return embed(ids.to(counts.device)), valid.to(counts.device)

    def slots(self, counts: Tensor, tokenizer, embed: nn.Embedding, large: Tensor | None = None) -> Tensor:
        """(B, C) counts -> (B, C, d): class c's slot = its name's embedding + the embedding of the
        number n + n * ``count_vec``. Fixed positions and every class present (zeros too), so a
        question's classes are found by what they are, and sums of counts are linear. With
        ``large`` (B, C), C more slots follow: name + ``large_tag`` + number of large objects
        embedded the same way (with ``large_vec``): (B, 2C, d)."""
        names, numbers = self.token_tables(tokenizer, counts.device)  # (C, Ln), (max_count + 1, Lk) ids, -1 pad
        name_e, number_e = mean_embed(embed, names)[None], mean_embed(embed, numbers)  # (1, C, d), (K, d)

        def slot(n: Tensor, vec: Tensor) -> Tensor:
            n = n.clamp(0, self.cfg.max_count)
            return name_e + number_e[n.long()] + n[..., None] * vec  # (B, C, d)

        if large is None:
            return slot(counts, self.count_vec)
        return torch.cat([slot(counts, self.count_vec), slot(large, self.large_vec) + self.large_tag], 1)

    def token_tables(self, tokenizer, device: torch.device) -> tuple[Tensor, Tensor]:
        """Token ids of every class name and of the numbers 0..max_count (padded with -1),
        built once per tokenizer: a name or a number may be several tokens."""
        if getattr(self, "_tables", None) is None or self._tables[0].device != device:
            names = self.node.get("class_names") or [str(c) for c in range(self.num_classes)]
            names = list(names) + [str(c) for c in range(len(names), self.num_classes)]
            ids = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] or [0] for t in texts]  # noqa: E731
            self._tables = tuple(padded(ids(texts), device) for texts in
                                 (names[: self.num_classes], [str(k) for k in range(self.cfg.max_count + 1)]))
        return self._tables

    def summary_ids(self, counts: Tensor, tokenizer, large: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The detection summary ("blue square x1, red circle x2 (1 large)", ``describe_detections``)
        as token ids (B, L) and validity: what the teacher LLM read in its prompt."""
        from distillery.detections import describe_detections

        names = self.node.get("class_names", [])
        name = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
        big = large.long().tolist() if large is not None else [None] * len(counts)
        rows = []
        for row, brow in zip(counts.long().tolist(), big):  # (C,) per input
            labels = [name(c) for c, n in enumerate(row) for _ in range(n)]
            large_labels = None if brow is None else [name(c) for c, n in enumerate(brow) for _ in range(n)]
            rows.append(tokenizer(describe_detections(labels, large_labels), add_special_tokens=False)["input_ids"]
                        [: self.cfg.max_summary_tokens])
        ids = padded(rows, "cpu")
        return ids.clamp(min=0), ids >= 0

    def loss(self, out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        mask, valid = target["mask"], target["valid"] & target["mask"][:, None]  # (B,), (B, N)
        boxes, cfg = target["boxes"], self.cfg
        matched = losses.fcos_assign(self.points, boxes, valid, self.stride, cfg.det_center_radius)  # (B, P)
        heat = losses.center_heatmaps(self.points, boxes, valid, target["probs"], self.stride)  # (B, P, C)
        total = losses.detection_loss(out["cls"], out["boxes"], self.points, matched, heat, boxes, mask,
                                      valid.sum(), cfg.box_weight)
        if self.segment:
            pos = (matched >= 0) & (target["has_masks"] & mask)[:, None]
            m = losses.mask_loss(out["coef"], out["protos"], matched, pos, target["masks"].float() / 255, boxes)
            total = total + cfg.mask_weight * m
        return total

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        """Heatmap peaks above the confidence threshold, class-aware NMS, masks at the original
        image size as COCO RLE: ``students.model.arrays.detections``, which the torch-free runtime
        runs too."""
        one = {k: out[k][i].float().cpu().numpy() for k in ("cls", "boxes", "coef", "protos") if k in out}
        return detections(one, self.node, self.cfg.image_size // 8, self.thresholds(), image_size)


# -- targets ---------------------------------------------------------------------------------------

def yolo_target(out: dict, node: dict, proto: int, flip: bool) -> dict[str, torch.Tensor]:
    """boxes (N, 4), probs (N, C) (the teacher's per-class scores), masks (N, proto, proto) uint8,
    areas (N,) (each mask's share of the image).
    An empty ``out`` gives N = 0 (the shapes the batch needs for an input without a target)."""
    boxes = torch.as_tensor(np.asarray(out.get("boxes", []), dtype=np.float32)).reshape(-1, 4)  # (N, 4)
    n, C = len(boxes), node["num_classes"]
    probs = np.asarray(out.get("class_probs", []), dtype=np.float32)
    if probs.size == 0 and n:  # no soft label stored: one-hot scaled by the score
        probs = np.zeros((n, C), np.float32)
        probs[np.arange(n), np.asarray(out["classes"], dtype=np.int64)] = np.asarray(out.get("scores", [1.0] * n))
    probs_t = torch.zeros(n, C)
    if n:
        p = probs.reshape(n, -1)[:, :C]
        probs_t[:, : p.shape[1]] = torch.as_tensor(p)
    rles = out.get("masks") or []
    has_masks = node.get("task") == "segment" and len(rles) == n
    masks = torch.zeros(n, proto, proto, dtype=torch.uint8)
    if has_masks and n:
        full = torch.as_tensor(np.stack([rle.decode(r) for r in rles]), dtype=torch.float32)  # (N, H, W)
        masks = (F.interpolate(full[:, None], size=(proto, proto), mode="area")[:, 0] * 255).round().to(torch.uint8)
    areas = torch.zeros(n)  # mask area, fraction of the image (stored, or from the masks)
    if has_masks and n:
        stored = out.get("areas")
        areas = (torch.as_tensor(np.asarray(stored, dtype=np.float32)) if stored is not None and len(stored) == n
                 else full.flatten(1).mean(1))
    if flip:
        boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
        masks = masks.flip(-1)
    return {"boxes": boxes.clamp(0, 1), "probs": probs_t.clamp(0, 1), "masks": masks, "areas": areas,
            "has_masks": torch.tensor(has_masks)}
