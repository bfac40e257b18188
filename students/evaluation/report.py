"""Headline figures from a per-node evaluation report (what gates and dashboards read).

``evaluate_student`` returns ``{node: {metric: value}}``; the registry's promotion gate and the
Prefect/MLflow tables want a flat dict with one well-known name per capability, whatever the
nodes are called in the spec.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

# per-node metric -> headline name (averaged over the nodes that have it)
HEADLINES = {"answer_em": "answer_agreement", "map50": "detection_map50", "map50_95": "detection_map50_95",
             "mask_iou": "mask_iou", "top1": "retrieval_top1", "token_kl": "token_kl"}


def headline_metrics(report: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"answer_agreement": .., "detection_map50": .., ...}`` averaged over nodes."""
    sums: dict[str, list[float]] = {}
    for metrics in report.values():
        for key, value in metrics.items():
            name = HEADLINES.get(key)
            if name and isinstance(value, (int, float)) and math.isfinite(value):
                sums.setdefault(name, []).append(float(value))
    return {name: sum(v) / len(v) for name, v in sums.items()}


def metric_key(key: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . / `` and space): ``recall@4`` ->
    ``recall_at_4``, anything else outside that set -> ``_``."""
    key = str(key).replace("@", "_at_")
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def mlflow_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (no bools, NaN or text) under names MLflow accepts."""
    return {metric_key(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_metrics(report: Mapping[str, Mapping[str, float]], prefix: str = "fidelity") -> dict[str, float]:
    """``{"fidelity.reasoner.answer_em": .., "fidelity.retriever.recall_at_4": ..}`` for MLflow
    (finite numbers only, names made valid by ``metric_key``)."""
    return mlflow_metrics({f"{prefix}.{node}.{k}": v for node, m in report.items() for k, v in m.items()})
