"""MLflow run logging for one training run: spec, params, per-epoch metrics, plots, reports.

```python
with start_run(spec.registry, spec, run_name="train", tags={"prefect_flow_run_id": fr}) as run:
    log_training_params(spec.training.model_dump())
    for epoch, metrics in enumerate(history):
        log_epoch(metrics, epoch)            # step = epoch
    log_loss_curves(history, nodes=list(spec.teachers))
    log_report(report)                       # evaluation.json
```

The distill flow opens the run before training (``open_run``) and passes its id on: the train
step (in-process or on a GPU worker) resumes it with system metrics on (``training_run``), the
evaluation (``log_evaluation_run``: a ``students.evaluation.fidelity`` report, its bar chart,
agreement by question type, sample overlays) and the registration log into it too (``resume_run``).
The record step's cost (``log_record_summary``: seconds per node, tokens and estimated cost of
nodes behind an API) goes into it as it opens. The plots themselves are in ``registry.plots``.

The experiment is created with an explicit artifact location (next to a SQLite store, or the
tracking server's default), so nothing lands in ./mlruns.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from distillery.registry.config import RegistryConfig, artifact_location
from distillery.registry.plots import log_by_type, log_loss_curves, log_samples, one_per_image, sample_overlays

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def use_store(tracking_uri: str | None = None) -> str:
    """Point MLflow at ``tracking_uri``; else keep a URI already set (env or earlier call); else
    the default store (RegistryConfig: $MLFLOW_TRACKING_URI, then the local SQLite store)."""
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if tracking_uri or not is_tracking_uri_set():
        uri = tracking_uri or RegistryConfig().resolve_tracking_uri()
        mlflow.set_tracking_uri(uri)
    return mlflow.get_tracking_uri()


def setup(cfg: RegistryConfig, experiment: str, workdir: str | Path | None = None) -> str:
    """Point MLflow at the configured store; return the experiment id (created if missing)."""
    uri = cfg.resolve_tracking_uri(workdir)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
    mlflow.set_tracking_uri(uri)  # the registry follows it unless $MLFLOW_REGISTRY_URI says otherwise
    return experiment_id(uri, experiment)


def experiment_id(uri: str, experiment: str) -> str:
    """The experiment's id in the store ``uri``, created with its artifacts beside the store (never
    in ``./mlruns`` of whatever folder the process runs in, as MLflow's default experiment puts them)."""
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
              log_system_metrics: bool | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in the spec's experiment with the spec logged (params + spec.yaml).

    spec: a ``distillery.spec.Spec``; tags: e.g. prefect_flow_run_id, traces_version;
    log_system_metrics: None = ``cfg.log_system_metrics``."""
    exp_id = setup(cfg, cfg.experiment or spec.name, workdir)
    system = cfg.log_system_metrics if log_system_metrics is None else log_system_metrics
    run_tags = {"spec_name": spec.name, "spec_hash": spec.spec_hash(), **(tags or {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=_str_values(run_tags),
                          log_system_metrics=system and _has_psutil(),
                          nested=mlflow.active_run() is not None) as run:
        log_spec(spec)
        yield run


def open_run(cfg: RegistryConfig, spec: Any, run_name: str | None = None,
             tags: Mapping[str, str] | None = None, workdir: str | Path | None = None) -> str:
    """Create the run of one distillation (spec logged) and return its id; the steps that
    follow (training, evaluation, registration) continue it with ``resume_run``."""
    with start_run(cfg, spec, run_name, tags, workdir, log_system_metrics=False) as run:
        return run.info.run_id


@contextmanager
def resume_run(run_id: str, log_system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Continue ``run_id`` (possibly created in another process): the active run if it is that
    one, else the run reopened (``system/*`` metrics sampled meanwhile when asked)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    with mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics and _has_psutil(),
                          nested=active is not None) as run:
        yield run


@contextmanager
def training_run(spec: Any, run_id: str | None, tracking_uri: str | None = None,
                 ) -> Iterator[Callable[[dict], None]]:
    """Around the trainer: resume ``run_id`` with system metrics on, log the training params,
    yield a trainer callback that logs every epoch's metrics as it ends (step = epoch), and
    plot the loss curves at the end. ``run_id`` None: no MLflow, the callback does nothing."""
    if run_id is None:
        yield lambda event: None
        return
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    history: list[dict[str, float]] = []

    def on_event(event: dict) -> None:
        if event.get("event") == "epoch":
            row = {k: v for k, v in event.items() if k not in ("event", "epochs")}
            history.append(row)
            log_epoch({k: v for k, v in row.items() if k != "epoch"}, int(row.get("epoch", len(history))))

    with resume_run(run_id, log_system_metrics=spec.registry.log_system_metrics):
        log_training_params(spec.training.model_dump(mode="json"))
        yield on_event
        if history:
            log_loss_curves(history, nodes=list(spec.teachers))


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
    from distillery.students.evaluation.report import mlflow_metrics

    clean = mlflow_metrics(metrics)
    if clean:
        mlflow.log_metrics(clean, step=epoch)


def log_history(history: list[Mapping[str, float]], nodes: list[str] | None = None) -> None:
    """Every epoch's metrics (step = position, or the record's ``epoch``) and the loss curves."""
    for i, metrics in enumerate(history):
        log_epoch({k: v for k, v in metrics.items() if k != "epoch"}, int(metrics.get("epoch", i)))
    if history:
        log_loss_curves(history, nodes)


EVAL_EXPERIMENT = "evaluations"  # where an evaluation logged outside any run goes


def log_evaluation(report: Mapping[str, Any], run_id: str | None = None, prefix: str = "eval") -> str:
    """A fidelity report into MLflow: metrics ``eval.<comparison>.<node>.<metric>`` and
    ``eval.by_type.<type>.<comparison>``, ``eval.who_is_right.<node>.<count>``, the per-node bar chart and ``evaluation.json``; into
    the given run, the active one, or a new run. Returns the run id."""
    import matplotlib.pyplot as plt

    from distillery.students.evaluation.fidelity import COMPARISONS, bar_chart
    from distillery.students.evaluation.report import flat_metrics

    active = mlflow.active_run()
    if run_id is None and active is not None:
        run_id = active.info.run_id
    experiment = None if run_id is not None else experiment_id(use_store(), EVAL_EXPERIMENT)
    with mlflow.start_run(run_id=run_id, experiment_id=experiment,
                          nested=active is not None and run_id != active.info.run_id) as run:
        metrics = {}
        for comp in (*COMPARISONS, "retained"):
            metrics |= flat_metrics(report.get(comp, {}), prefix=f"{prefix}.{comp}")
        metrics |= flat_metrics({t: {k: v for k, v in row.items() if k != "n"}
                                 for t, row in (report.get("by_type") or {}).items()}, prefix=f"{prefix}.by_type")
        metrics |= flat_metrics(report.get("who_is_right") or {}, prefix=f"{prefix}.who_is_right")
        mlflow.log_metrics(metrics)  # names already valid (recall@k -> recall_at_k)
        fig = bar_chart(dict(report))
        mlflow.log_figure(fig, f"{prefix}/fidelity_per_node.png")
        plt.close(fig)
        mlflow.log_dict(dict(report), f"{prefix}/evaluation.json")
        return run.info.run_id


def log_evaluation_run(report: Mapping[str, Any], records: Sequence[Any], student_dir: str | Path, run_id: str,
                       detector: str | None = None, samples: int = 3) -> None:
    """Into the distillation's run: ``log_evaluation``, ``fidelity.<node>.<metric>`` (what a
    reused student's figures are read back from), agreement by question type and, for the
    ``detector`` node, teacher-vs-student overlays on ``samples`` images."""
    from distillery.students.evaluation.fidelity import load_predictor
    from distillery.students.evaluation.metrics import predict_records
    from distillery.students.evaluation.report import flat_metrics

    log_evaluation(report, run_id=run_id)
    with resume_run(run_id):
        mlflow.log_metrics(flat_metrics(report["student_vs_teacher"]))
        log_by_type(report.get("by_type") or {})
        shown = one_per_image(records, samples, detector) if detector else []
        if shown:
            log_samples(sample_overlays(shown, predict_records(load_predictor(student_dir), shown), detector))


def log_record_summary(summary: Mapping[str, Any], name: str = "record_summary.json") -> None:
    """A record run's summary (``RecordSummary.to_json()``) into the active run: metrics
    ``record.written|skipped|quarantined|seconds`` and ``record.<node>.<seconds|requests|
    prompt_tokens|completion_tokens|estimated_cost>`` (the nodes' cost), and the summary as JSON."""
    from distillery.students.evaluation.report import mlflow_metrics
    from distillery.teachers.record import cost_rows

    metrics = {f"record.{k}": summary.get(k) for k in ("written", "skipped", "quarantined", "seconds")}
    for row in cost_rows(summary):
        metrics |= {f"record.{row['node']}.{k}": v for k, v in row.items() if k != "node"}
    mlflow.log_metrics(mlflow_metrics({k: v for k, v in metrics.items() if v is not None}))
    mlflow.log_dict(dict(summary), name)


def forgetting_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``forgetting.<metric>`` (on the OLD held-out set, > 0: the new student lost ground) and
    ``forgetting.<old|new>.<student|champion>.<metric>`` from ``students.evaluation.forgetting``."""
    out = {f"forgetting.{k}": v for k, v in (report.get("forgetting") or {}).items()}
    for split in ("old", "new"):
        part = report.get(split) or {}
        for who in ("student", "champion"):
            out |= {f"forgetting.{split}.{who}.{k}": v for k, v in (part.get(who) or {}).items()}
        if "n" in part:
            out[f"forgetting.{split}.n"] = part["n"]
    from distillery.students.evaluation.report import mlflow_metrics

    return mlflow_metrics(out)


def log_forgetting(report: Mapping[str, Any]) -> None:
    """The forgetting report as metrics (``forgetting_metrics``) and ``forgetting.json``."""
    mlflow.log_metrics(forgetting_metrics(report))
    mlflow.log_dict(dict(report), "forgetting.json")


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


def _has_psutil() -> bool:
    return importlib.util.find_spec("psutil") is not None


def _str_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in tags.items()}
