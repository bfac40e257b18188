"""The runtime's numpy post-processing (students/model/arrays.py) against its plain reference."""

from __future__ import annotations

import numpy as np
import pytest

from distillery.students.model.arrays import peaks, sigmoid


def peak_scores(cls_logits: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's heatmap peaks: cls_logits (P, C) on an n x n grid (P = n * n) -> per location
    the best peak class's score (P,), that class (P,), and every class score (P, C): every score
    of the map, the plain way (what the runtime did before ``peaks``)."""
    probs = sigmoid(cls_logits)  # (P, C)
    P, C = probs.shape
    grid = probs.T.reshape(C, n, n)
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    rows = np.maximum(np.maximum(padded[:, :, :n], padded[:, :, 1:n + 1]), padded[:, :, 2:])  # 3 x 3 max,
    pooled = np.maximum(np.maximum(rows[:, :n], rows[:, 1:n + 1]), rows[:, 2:])  # separably: columns, then rows
    is_peak = (grid == pooled).reshape(C, P).T  # (P, C)
    masked = probs * is_peak
    classes = masked.argmax(-1)
    return masked[np.arange(P), classes], classes, probs


def reference(logits: np.ndarray, n: int, conf: float):
    scores, classes, _ = peak_scores(logits, n)
    loc = np.flatnonzero(scores > conf)
    return loc, classes[loc], scores[loc]


@pytest.mark.parametrize("seed", range(6))
def test_peaks_equal_the_full_maps_answer(seed):
    """Random heat maps with ties, saturated scores (probability 1.0 in float32 for different
    logits) and scores around the threshold: ``peaks`` finds exactly the locations, classes and
    scores that the full-map reference keeps."""
    rng = np.random.default_rng(seed)
    n, C = 12, 7
    logits = rng.normal(-2.0, 3.0, (n * n, C)).astype(np.float32)
    logits[rng.random(logits.shape) < 0.05] = 30.0  # saturated: ties in probability, not in logit
    logits[rng.random(logits.shape) < 0.05] = 25.0
    logits[:, 3] = logits[:, 2]  # tied classes: the lower one wins
    for conf in (0.0, 0.25, 0.5, 0.9, 1.0):
        got, want = peaks(logits, n, conf), reference(logits, n, conf)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_peaks_of_an_empty_map_are_empty():
    loc, cls, score = peaks(np.full((16, 3), -10.0, np.float32), 4, 0.25)
    assert loc.size == cls.size == score.size == 0
