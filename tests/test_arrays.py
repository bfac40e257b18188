"""The runtime's numpy post-processing (students/model/arrays.py) against its plain reference."""

from __future__ import annotations

import numpy as np
import pytest

from distillery.students.model.arrays import peak_scores, peaks


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
