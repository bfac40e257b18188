"""The detection summary: the text a detector's output becomes in an LLM's prompt.

The teacher ``yolo`` node writes it, the student's detection head writes the same from its own
boxes (torch or ONNX Runtime), and the demo's ground truth is phrased with it, so prompts match.
Libraries only (no numpy either): the torch-free runtime imports it.
"""

from __future__ import annotations

from collections import Counter


def describe_detections(labels: list[str], large: list[str] | None = None) -> str:
    """Counts per label, sorted by label: ``"blue square x1, red circle x2"``; ``"nothing"`` if none.

    ``large``: the labels of the large objects (a sub-multiset of ``labels``, from the masks'
    areas); a label with some gets their count, ``"red circle x2 (1 large)"``."""
    counts, big = Counter(labels), Counter(large or ())
    return ", ".join(f"{label} x{counts[label]}" + (f" ({big[label]} large)" if big[label] else "")
                     for label in sorted(counts)) or "nothing"


def large_labels(labels: list[str], areas: list[float], large_area: float | None) -> list[str] | None:
    """The labels whose mask area (fraction of the image) reaches ``large_area``; None when unset."""
    if large_area is None:
        return None
    return [label for label, a in zip(labels, areas, strict=True) if a >= large_area]
