"""Instance masks at the original image size from YOLACT prototypes, one box at a time.

The naive way upsamples every mask's logits to the full image (``F.interpolate``, bilinear), then
cuts each to its box: (n, H, W) floats and bools, most of them outside the box. Bilinear
upsampling is separable, ``up(L) = Ry @ L @ Rx.T`` with ``Ry`` (H, h) and ``Rx`` (W, w) the 1-D
interpolation weights, so a box's pixels need only its rows of ``Ry`` and columns of ``Rx``: a
(hb, h) @ (h, w) @ (w, wb) product per box, the same values as ``F.interpolate(...,
align_corners=False)`` up to float rounding. Masks come out Fortran-ordered (COCO RLE's layout),
so encoding copies nothing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np


@lru_cache(maxsize=32)
def bilinear_weights(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float32: row i holds the weights ``F.interpolate(mode="bilinear",
    align_corners=False)`` gives the input samples for output pixel i (two non-zeros)."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    lam = (src - lo).astype(np.float32)
    w = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(w, (rows, lo), 1.0 - lam)
    np.add.at(w, (rows, hi), lam)
    w.setflags(write=False)
    return w


@lru_cache(maxsize=32)
def pixel_centers(size: int) -> np.ndarray:
    """(size,) float32, ascending: the normalized centers of a row's pixels."""
    c = (np.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size)
    c.setflags(write=False)
    return c


def pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """[start, stop) of the pixels whose centers lie in [lo, hi] (normalized), like
    ``students.losses.box_region``: a binary search of the (cached, float32) centers."""
    c = pixel_centers(size)
    start, stop = int(np.searchsorted(c, np.float32(lo), "left")), int(np.searchsorted(c, np.float32(hi), "right"))
    return (start, stop) if stop > start else (0, 0)


def instance_masks(logits: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Per box: the (H, W) uint8 0/1 mask, Fortran-ordered, of ``logits`` (n, h, w) at prototype
    resolution upsampled bilinearly to ``size`` (H, W), positive, inside its normalized xyxy box
    (n, 4). One full-size mask at a time (images may be large)."""
    H, W = size
    ry, rx = bilinear_weights(H, logits.shape[1]), bilinear_weights(W, logits.shape[2])
    for lg, (x1, y1, x2, y2) in zip(logits, boxes):
        mask = np.zeros((W, H), np.uint8).T  # Fortran order, zero outside the box
        r0, r1 = pixel_span(y1, y2, H)
        c0, c1 = pixel_span(x1, x2, W)
        if r1 > r0 and c1 > c0:
            mask[r0:r1, c0:c1] = (ry[r0:r1] @ lg) @ rx[c0:c1].T > 0
        yield mask
