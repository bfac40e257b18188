"""COCO run-length encoding of instance masks: the one codec every layer uses (pycocotools).

Stored form (JSON-ready, what records, predictions and ground truth hold):
``{"size": [H, W], "counts": "<compressed RLE string>"}``; pycocotools takes ``counts`` as bytes,
which ``to_coco`` gives. COCO polygons (ground-truth files) become the same form by ``from_polygons``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]


def encode(mask: np.ndarray) -> RLE:
    """(H, W) binary mask -> ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def to_coco(rle: RLE) -> RLE:
    """A stored RLE (``counts`` as str or bytes) as pycocotools takes it (bytes)."""
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def to_coco_list(rles: Iterable[RLE]) -> list[RLE]:
    return [to_coco(r) for r in rles]


def decode(rle: RLE) -> np.ndarray:
    """An RLE (``counts`` as str or bytes) -> (H, W) uint8 mask of 0/1."""
    return mask_utils.decode(to_coco(rle))


def area(rle: RLE) -> int:
    """Pixels of a mask, counted on the runs, not the pixels."""
    return int(mask_utils.area(to_coco(rle)))


def from_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> RLE:
    """COCO polygons (``[[x1, y1, x2, y2, ...], ...]`` in pixels) -> one stored RLE."""
    parts = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    merged = mask_utils.merge(parts)
    return {"size": [int(s) for s in merged["size"]], "counts": merged["counts"].decode("ascii")}
