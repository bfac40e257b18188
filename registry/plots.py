"""The plots a distillation's MLflow run shows: loss curves per node, teacher-vs-student
overlays (boxes, labels, masks) and answer agreement by question type. Each ``log_*`` draws
with matplotlib (Agg) and logs the figure into the active run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow


def log_loss_curves(history: list[Mapping[str, float]], nodes: list[str] | None = None,
                    name: str = "plots/loss_curves.png") -> None:
    """One panel per teacher node (metrics whose key names the node), one for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_loss_keys(history, nodes or [])
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3), squeeze=False, layout="constrained")
    for ax, (title, keys) in zip(axes[0], groups.items()):
        for key in keys:
            xs = [int(h.get("epoch", i)) for i, h in enumerate(history) if key in h]
            ax.plot(xs, [h[key] for h in history if key in h], marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    mlflow.log_figure(fig, name)
    plt.close(fig)


def group_loss_keys(history: list[Mapping[str, float]], nodes: list[str]) -> dict[str, list[str]]:
    """Loss metric keys grouped by the node they name ("total" for the others), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for h in history:
        for key in h:
            if "loss" not in key.lower():
                continue
            parts = set(key.replace("/", ".").replace("_", ".").split("."))
            group = next((n for n in nodes if n in parts or n in key), "total")
            if key not in groups.setdefault(group, []):
                groups[group].append(key)
    return groups


def log_samples(samples: list[Mapping[str, Any]], name: str = "plots/samples.png") -> None:
    """Teacher vs student on a few images, side by side: boxes, labels and masks.

    samples: ``{"image": PIL image or (H, W, 3) array, "teacher": det, "student": det,
    "title": str}`` where det holds ``boxes`` (normalized xyxy), ``classes`` or ``labels``, and
    optionally ``masks`` (COCO RLEs at the image's size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not samples:
        return
    fig, axes = plt.subplots(len(samples), 2, figsize=(6, 3 * len(samples)), squeeze=False, layout="constrained")
    for row, sample in zip(axes, samples):
        image = np.asarray(sample["image"].convert("RGB") if hasattr(sample["image"], "convert") else sample["image"])
        for ax, side in zip(row, ("teacher", "student")):
            _draw_detections(ax, image, sample.get(side) or {})
            ax.set_title(f"{side} {sample.get('title', '')}".strip(), fontsize=8)
    mlflow.log_figure(fig, name)
    plt.close(fig)


def _draw_detections(ax, image, det: Mapping[str, Any]) -> None:
    import numpy as np
    from matplotlib.patches import Rectangle

    from distillery import rle

    h, w = image.shape[:2]  # (H, W, 3)
    ax.imshow(image)
    ax.axis("off")
    for mask in _seq(det.get("masks")):
        m = rle.decode(mask)  # (H, W)
        ax.imshow(np.ma.masked_where(m == 0, m), alpha=0.4, cmap="autumn", vmin=0, vmax=1)
    names = [str(n) for n in _seq(det.get("labels"))] or [str(int(c)) for c in _seq(det.get("classes"))]
    for i, (x1, y1, x2, y2) in enumerate(_seq(det.get("boxes"))):
        ax.add_patch(Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False, color="lime", lw=1))
        if i < len(names):
            ax.text(x1 * w, y1 * h, names[i], color="lime", fontsize=6, va="bottom")


def one_per_image(records: Sequence[Any], n: int, node: str) -> list[Any]:
    """The first ``n`` records (with image bytes and an output of ``node``) of distinct images."""
    seen, out = set(), []
    for rec in records:
        if len(out) == n:
            break
        if rec.image_bytes and node in rec.outputs and rec.image_bytes not in seen:
            seen.add(rec.image_bytes)
            out.append(rec)
    return out


def sample_overlays(records: Sequence[Any], predictions: Sequence[Mapping[str, Any]], node: str,
                    ) -> list[dict[str, Any]]:
    """``log_samples`` input from teacher records (image bytes + outputs) and the student's
    outputs on them (``predictions[i]``: node -> output), for one detection/segmentation node."""
    import io

    from PIL import Image

    return [{"image": Image.open(io.BytesIO(rec.image_bytes)), "teacher": rec.outputs.get(node) or {},
             "student": pred.get(node) or {}, "title": Path(rec.image_path).name}
            for rec, pred in zip(records, predictions)]


def log_by_type(by_type: Mapping[str, Mapping[str, float]], name: str = "plots/agreement_by_type.png") -> None:
    """Bar chart of answer agreement per question type: student vs teacher (and each vs the
    truth when known). by_type: ``{type: {"student_vs_teacher": .., "student_vs_truth": .., "n"}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not by_type:
        return
    types = list(by_type)
    series = [s for s in ("student_vs_teacher", "agreement_where_teacher_right", "student_vs_truth", "teacher_vs_truth")
              if any(s in row for row in by_type.values())]
    fig, ax = plt.subplots(figsize=(1.8 + 1.2 * len(types), 3.4), layout="constrained")
    x, width = np.arange(len(types)), 0.8 / len(series)
    for j, s in enumerate(series):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, [by_type[t].get(s, np.nan) for t in types], width,
               label=s.replace("_", " "))
    ax.set_xticks(x, [f"{t}\n(n={by_type[t].get('n', '?')})" for t in types])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("answer exact match")
    ax.set_title("agreement by question type")
    ax.legend(fontsize=7)
    mlflow.log_figure(fig, name)
    plt.close(fig)


def _seq(value: Any) -> list:
    """A list from a list, tuple or array (teacher outputs hold numpy arrays); [] for None."""
    return [] if value is None else list(value)
