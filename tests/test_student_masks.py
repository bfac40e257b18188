"""Box-local mask decoding (students/masks.py) against the naive full-image reference:
F.interpolate (bilinear) of every mask, then each cut to its box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillery.students.model.losses import box_region
from distillery.students.model.masks import bilinear_weights, instance_masks, pixel_span


def reference(logits: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    return ((up > 0) & box_region(boxes, *size)).numpy(), up.numpy()


@pytest.mark.parametrize("proto, size", [((32, 32), (256, 256)), ((32, 32), (300, 217)), ((20, 24), (40, 30)),
                                         ((16, 16), (16, 16))])
def test_same_masks_as_upsampling_the_whole_image(proto, size):
    g = torch.Generator().manual_seed(0)
    n = 7
    logits = torch.randn(n, *proto, generator=g) * 3
    xy = torch.rand(n, 2, generator=g) * 0.7
    wh = torch.rand(n, 2, generator=g) * 0.5 + 0.01
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], 1)
    boxes[0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # the whole image
    boxes[1] = torch.tensor([0.5, 0.5, 0.5004, 0.5004])  # thinner than a pixel: empty
    want, up = reference(logits, boxes, size)
    got = list(instance_masks(logits.numpy(), boxes.numpy(), size))
    assert len(got) == n
    for j, m in enumerate(got):
        assert m.shape == size and m.dtype == np.uint8 and m.flags.f_contiguous
        differ = m.astype(bool) != want[j]
        # float rounding may flip a pixel whose logit is zero to ~6 digits, nothing else
        assert not differ.any() or np.abs(up[j][differ]).max() < 1e-4, f"mask {j}"
    assert got[1].sum() == 0 and got[0].sum() == (up[0] > 0).sum()


def test_bilinear_weights_rows_sum_to_one_and_match_interpolate():
    w = bilinear_weights(37, 8)
    assert w.shape == (37, 8) and np.allclose(w.sum(1), 1.0)
    x = torch.randn(1, 1, 8, 1)
    up = F.interpolate(x, size=(37, 1), mode="bilinear", align_corners=False)[0, 0, :, 0].numpy()
    assert np.allclose(w @ x[0, 0, :, 0].numpy(), up, atol=1e-6)


def test_pixel_span_is_the_box_region():
    rng = np.random.default_rng(0)
    edges = [(0.0, 1.0), (0.1, 0.35), (0.499, 0.5), (0.9, 0.9), (0.5, 0.4), (0.01, 0.01),
             (10.5 / 50, 20.5 / 50)]  # exactly on pixel centers, an empty box, one between two centers
    for lo, hi in edges + [tuple(sorted(rng.uniform(-0.1, 1.1, 2))) for _ in range(200)]:
        region = box_region(torch.tensor([[lo, lo, hi, hi]]), 50, 50)[0].numpy().any(1)  # rows in the box
        a, b = pixel_span(lo, hi, 50)
        assert region[a:b].all() and region.sum() == b - a
