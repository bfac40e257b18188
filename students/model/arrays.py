"""The student's inputs and outputs on numpy arrays: no torch here.

What both ways of running a student share, so each rule is written once: the torch heads'
``postprocess`` (``heads/yolo.py``, ``heads/rag.py``) and the torch-free runtime
(``students/serving/runtime.py``, ONNX Runtime) call these on one image's raw outputs.

* ``image_array``: an RGB image -> (3, S, S) uint8, as the student sees it;
* ``detections``: heatmap peaks (3 x 3 local maxima, CenterNet) above the confidence threshold,
  class-aware NMS as a safety net, masks at the original image size as COCO RLE;
* ``detection_counts``: what the text decoder reads of them (counts per class, large ones);
* ``documents``: the top-k documents and the student's probability for each.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from PIL import Image

from distillery import rle
from distillery.detections import describe_detections, large_labels
from distillery.students.model.masks import instance_masks


def image_array(img: Image.Image, size: int, downscale: str = "reduce") -> np.ndarray:
    """RGB image -> (3, size, size) uint8, resized (aspect ratio not kept, like the boxes);
    ``downscale`` as ``StudentConfig.downscale`` ("reduce": PIL's reducing_gap, else plain bilinear)."""
    img = img.resize((size, size), Image.BILINEAR, reducing_gap=1.0 if downscale == "reduce" else None)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def detection_thresholds(cfg: Mapping[str, Any], node: Mapping[str, Any]) -> tuple[float, float, int]:
    """(confidence, NMS IoU, max detections): the student config's where set, else the teacher node's."""
    conf = cfg.get("det_conf") if cfg.get("det_conf") is not None else node.get("conf", 0.25)
    iou = cfg.get("det_iou") if cfg.get("det_iou") is not None else node.get("iou", 0.7)
    return float(conf), float(iou), int(cfg.get("max_det") or node.get("max_det", 100))


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)  # no copy when it is float32 already
    return 1.0 / (1.0 + np.exp(-x))


NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def peaks(cls_logits: np.ndarray, n: int, conf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The heat map's peaks (3 x 3 local maxima, as ``DetectionHead.peak_scores``) where they
    matter: the locations (ascending) whose best peak class scores above ``conf``, that class
    and its score. A class's score is a peak where no 3 x 3 neighbour
    of the same class scores higher. Only the (location, class) pairs above ``conf`` are looked
    at (sigmoid is monotonic: a logit threshold finds them in one pass), not every score of the
    n x n x C map: at 640 px and 80 classes, 3 ms instead of 18 a request (cProfile, a loaded machine)."""
    logits = np.asarray(cls_logits, np.float32)  # (P, C)
    cut = np.log(conf / (1.0 - conf)) - 1e-3 if 0.0 < conf < 1.0 else (-np.inf if conf <= 0 else np.inf)
    rows = np.flatnonzero(logits.max(1) > cut)  # candidates (the exact test is on the scores below):
    loc, cls = np.nonzero(logits[rows] > cut)  # the locations with a class above it, then those classes
    loc = rows[loc]
    own = sigmoid(logits[loc, cls])
    keep = own > conf
    loc, cls, own = loc[keep], cls[keep], own[keep]
    y, x = np.divmod(loc, n)
    grid = logits.reshape(n, n, -1)
    for dy, dx in NEIGHBOURS:  # compared as float32 probabilities, as the torch head compares them
        ny, nx = y + dy, x + dx
        inside = (ny >= 0) & (ny < n) & (nx >= 0) & (nx < n)
        other = sigmoid(grid[np.clip(ny, 0, n - 1), np.clip(nx, 0, n - 1), cls])
        keep = ~inside | (own >= other)
        loc, cls, own, y, x = loc[keep], cls[keep], own[keep], y[keep], x[keep]
    order = np.lexsort((cls, -own, loc))  # per location: the best score, then the lowest class
    loc, cls, own = loc[order], cls[order], own[order]
    first = np.ones(len(loc), bool)
    first[1:] = loc[1:] != loc[:-1]
    return loc[first], cls[first], own[first]


def mask_areas(coef: np.ndarray, boxes: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """The share of the image each instance mask covers (logit > 0 inside its own box, on the
    prototypes' grid), as ``DetectionHead.mask_areas``: coef (N, M), boxes (N, 4) normalized
    xyxy, protos (M, q, q) -> (N,) float32."""
    n, (m, q) = len(coef), protos.shape[:2]
    if n == 0:
        return np.zeros(0, np.float32)
    centers = (np.arange(q, dtype=np.float32) + 0.5) / q  # the prototype cells' centres
    fg = (np.asarray(coef, np.float32) @ np.asarray(protos, np.float32).reshape(m, -1) > 0).reshape(n, q, q)
    b = np.asarray(boxes, np.float32)[:, :, None]  # (N, 4, 1)
    in_x = (centers >= b[:, 0]) & (centers <= b[:, 2])  # (N, q)
    in_y = (centers >= b[:, 1]) & (centers <= b[:, 3])
    hits = (fg & in_y[:, :, None] & in_x[:, None, :]).sum((1, 2))
    return hits.astype(np.float32) / np.float32(q * q)  # float32, as the torch head's mean


def detection_counts(out: Mapping[str, np.ndarray], grid: int, conf: float, max_det: int, num_classes: int,
                     large_area: float | None = None, found: list | None = None) -> dict[str, np.ndarray]:
    """What the decoder reads of a batch's detections (``DetectionHead.prefix_inputs`` at
    inference): ``counts`` (B, C) float32, the peaks above ``conf`` per class; with ``large_area``
    also ``large`` (B, C): among the ``max_det`` strongest of them, those whose mask covers at
    least that share of the image. ``out``: the head's batched outputs (``cls`` (B, P, C); for
    ``large``, ``boxes`` (B, P, 4), ``coef`` (B, P, M), ``protos`` (B, M, q, q)).

    Only the few peaks above the threshold are looked at (``peaks``), where the ONNX graph would
    max-pool every class map: at 640 px, 80 classes and batch 16 that was half the text graph's
    time (ONNX Runtime's profile of ``benchmarks/scale.py``'s student). ``found``: each image's
    ``peaks`` at ``conf`` where the caller has them already."""
    cls = np.asarray(out["cls"], np.float32)
    counts = np.zeros((len(cls), num_classes), np.float32)
    large = np.zeros_like(counts) if large_area is not None else None
    for b in range(len(cls)):
        loc, c, score = found[b] if found is not None else peaks(cls[b], grid, conf)
        counts[b] = np.bincount(c, minlength=num_classes)[:num_classes]
        if large is None or not len(loc) or "coef" not in out:
            continue  # (a head without masks sees no large object, as the torch head)
        top = np.argsort(-score, kind="stable")[:max_det]  # the strongest peaks, as torch's topk
        area = mask_areas(out["coef"][b][loc[top]], out["boxes"][b][loc[top]], out["protos"][b])
        large[b] = np.bincount(c[top][area >= large_area], minlength=num_classes)[:num_classes]
    return {"counts": counts} if large is None else {"counts": counts, "large": large}


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Class-aware non-maximum suppression (as ``torchvision.ops.batched_nms``): the indices kept,
    by decreasing score; a box is dropped when it overlaps a kept box of its class by IoU > ``iou``."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    shifted = boxes + (classes.astype(np.float32) * (float(boxes.max()) + 1))[:, None]  # classes never overlap
    x1, y1, x2, y2 = shifted.T
    areas = (x2 - x1) * (y2 - y1)
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return np.asarray(keep, np.int64)


def detections(out: Mapping[str, np.ndarray], node: Mapping[str, Any], grid: int, thresholds: tuple[float, float, int],
               image_size: tuple[int, int], found: tuple | None = None) -> dict[str, Any]:
    """One image's detection head outputs (``cls`` (P, C) logits, ``boxes`` (P, 4) normalized
    xyxy, with masks ``coef`` (P, M) and ``protos`` (M, h, w)) -> the teacher node's output:
    boxes, classes, scores, class_probs, labels, masks (COCO RLE at ``image_size`` (H, W)), summary,
    count, image_size (and areas with masks). ``found``: the image's ``peaks`` at the confidence
    threshold where the caller has them already (the runtime, from the counts)."""
    conf, iou, max_det = thresholds
    cls_logits = np.asarray(out["cls"], np.float32)  # (P, C)
    loc, cls, score = found if found is not None else peaks(cls_logits, grid, conf)  # the peaks above conf
    top = np.argsort(-score, kind="stable")[: max(4 * max_det, 100)]
    loc, cls, score = loc[top], cls[top], score[top]
    boxes = np.clip(np.asarray(out["boxes"], np.float32), 0, 1)
    kept = nms(boxes[loc], score, cls, iou)[:max_det]
    keep, classes, scores = loc[kept], cls[kept], score[kept]
    names = node.get("class_names", [])
    labels = [names[c] if c < len(names) else str(c) for c in classes.tolist()]
    h, w = image_size
    res = {"boxes": boxes[keep].tolist(), "classes": classes.tolist(), "scores": scores.tolist(),
           "class_probs": sigmoid(cls_logits[keep]).tolist(), "labels": labels, "masks": [],
           "summary": describe_detections(labels), "count": len(labels), "image_size": [h, w]}
    if node.get("task") == "segment" and "coef" in out:
        protos = np.asarray(out["protos"], np.float32)  # (M, h, w)
        coef = np.asarray(out["coef"], np.float32)[keep]  # (n, M)
        logits = (coef @ protos.reshape(len(protos), -1)).reshape(len(keep), *protos.shape[1:])  # (n, h, w)
        res["masks"] = [rle.encode(m) for m in instance_masks(logits, boxes[keep], (h, w))]
        res["areas"] = [round(rle.area(r) / (h * w), 6) for r in res["masks"]]
        large = node.get("large_area")
        if large is not None:
            res["summary"] = describe_detections(labels, large_labels(labels, res["areas"], large))
    return res


def documents(logits: np.ndarray, node: Mapping[str, Any]) -> dict[str, Any]:
    """One image's retrieval logits (D,) -> the top-k documents (k as the teacher's) and the
    student's probability for each: ``{"ids": [...], "scores": [...]}``."""
    x = np.asarray(logits, np.float32)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    k = min(int(node.get("top_k", 3)), probs.size)
    idx = np.arange(probs.size)
    if k < probs.size:  # a large store: the top k first (O(D)), then only they are sorted
        idx = np.argpartition(-probs, k - 1)[:k]
        # the k-th probability's ties beyond the partition's choice: keep the lowest indices, as a stable sort does
        idx = np.union1d(idx, np.flatnonzero(probs == probs[idx].min()))
    idx = idx[np.argsort(-probs[idx], kind="stable")][:k]
    doc_ids = node["doc_ids"]
    return {"ids": [doc_ids[j] for j in idx.tolist()], "scores": probs[idx].tolist()}
