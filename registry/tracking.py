"""MLflow run logging for one training run: spec, params, per-epoch metrics, plots, reports.

```python
with start_run(spec.registry, spec, run_name="train", tags={"prefect_flow_run_id": fr}) as run:
    log_training_params(spec.training.model_dump())
    for epoch, metrics in enumerate(history):
        log_epoch(metrics, epoch)            # step = epoch
    log_loss_curves(history, nodes=list(spec.teachers))
    log_report(report)                       # evaluation.json
```

The experiment is created with an explicit artifact location (next to a SQLite store, or the
tracking server's default), so nothing lands in ./mlruns.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from registry.config import RegistryConfig, artifact_location

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def setup(cfg: RegistryConfig, experiment: str, workdir: str | Path | None = None) -> str:
    """Point MLflow at the configured store; return the experiment id (created if missing)."""
    uri = cfg.resolve_tracking_uri(workdir)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
    mlflow.set_tracking_uri(uri)  # the registry follows it unless $MLFLOW_REGISTRY_URI says otherwise
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=artifact_location(uri))
    except MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(experiment).experiment_id


@contextmanager
def start_run(cfg: RegistryConfig, spec: Any, run_name: str | None = None,
              tags: Mapping[str, str] | None = None, workdir: str | Path | None = None,
              ) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in the spec's experiment with the spec logged (params + spec.yaml).

    spec: a ``distillery.spec.Spec``; tags: e.g. prefect_flow_run_id, traces_version."""
    exp_id = setup(cfg, cfg.experiment or spec.name, workdir)
    system = cfg.log_system_metrics and importlib.util.find_spec("psutil") is not None
    run_tags = {"spec_name": spec.name, "spec_hash": spec.spec_hash(), **(tags or {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=_str_values(run_tags),
                          log_system_metrics=system, nested=mlflow.active_run() is not None) as run:
        log_spec(spec)
        yield run


def log_spec(spec: Any) -> None:
    """The spec as flattened params (``spec.teachers.detector.imgsz``) and as spec.yaml."""
    data = spec.model_dump(mode="json")
    mlflow.log_params(flatten(data, prefix="spec"))
    mlflow.log_text(yaml.safe_dump(data, sort_keys=False), "spec.yaml")


def log_training_params(params: Mapping[str, Any], prefix: str = "train") -> None:
    """Training parameters (nested dicts flattened, long values truncated)."""
    mlflow.log_params(flatten(dict(params), prefix=prefix))


def log_epoch(metrics: Mapping[str, float], epoch: int) -> None:
    """One epoch's metrics at step=epoch; non-finite and non-numeric values are skipped."""
    clean = {_metric_key(k): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=epoch)


def log_history(history: list[Mapping[str, float]], nodes: list[str] | None = None) -> None:
    """Every epoch's metrics (step = position, or the record's ``epoch``) and the loss curves."""
    for i, metrics in enumerate(history):
        log_epoch({k: v for k, v in metrics.items() if k != "epoch"}, int(metrics.get("epoch", i)))
    if history:
        log_loss_curves(history, nodes)


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
    from pycocotools import mask as mask_utils

    h, w = image.shape[:2]  # (H, W, 3)
    ax.imshow(image)
    ax.axis("off")
    for rle in det.get("masks") or []:
        counts = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
        m = mask_utils.decode({"size": list(rle["size"]), "counts": counts})  # (H, W)
        ax.imshow(np.ma.masked_where(m == 0, m), alpha=0.4, cmap="autumn", vmin=0, vmax=1)
    names = det.get("labels") or [str(c) for c in det.get("classes") or []]
    for i, (x1, y1, x2, y2) in enumerate(det.get("boxes") or []):
        ax.add_patch(Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False, color="lime", lw=1))
        if i < len(names):
            ax.text(x1 * w, y1 * h, names[i], color="lime", fontsize=6, va="bottom")


def log_report(report: Mapping[str, Any], name: str = "evaluation.json") -> None:
    """The evaluation report as a JSON artifact, and its top-level numbers as metrics."""
    mlflow.log_dict(dict(report), name)
    flat = flatten(dict(report), prefix="eval")
    log_epoch({k: v for k, v in flat.items() if isinstance(v, (int, float))}, 0)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists as JSON; strings cut to MLflow's param limit."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value)[:MAX_PARAM_CHARS]
        elif isinstance(value, str):
            out[name] = value[:MAX_PARAM_CHARS]
        else:
            out[name] = value
    return out


def _metric_key(key: str) -> str:
    """MLflow metric names allow letters, digits, '_', '-', '.', ' ', '/'; replace anything else."""
    from students.report import metric_key

    return metric_key(key)


def _str_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in tags.items()}
