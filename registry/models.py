"""Log, register and promote students (MLflow models-from-code, aliases, no stages); pulling
them is ``registry.pull``.

```python
uri = log_student(student_dir, spec, metrics, lineage, run_id=run.info.run_id)
mv = register_student(uri, spec, metrics, lineage)           # idempotent per training run
decision = promote(mv.name, mv.version, metrics, spec.registry.gate,
                   spec.registry.comparison_metric())       # challenger always, champion if earned
register_distilled(spec, student_dir, metrics, lineage, run_id, eval_set)  # the three, as the flow does
find_registered(spec, traces_uri, traces_version)           # registered from exactly these traces?
```
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

from distillery.registry.config import CHALLENGER, CHAMPION, RegistryConfig
from distillery.registry.tracking import setup, use_store
from distillery.students.serving.folder import student_dir
from distillery.students.serving.graphs import runtime_ready

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# What the pyfunc model imports at load time: the distillery namespace with the ground modules
# and the students, teachers and registry packages, copied into the model's code/ folder (nothing else lands on sys.path).
NOT_MODEL_FILES = ("checkpoints", "train_result.json")  # in a student folder, not part of the model
LOGGED_NAME = "student"  # name of the logged model inside its run
LINEAGE_KEYS = ("graph_fingerprint", "traces_version", "traces_uri", "spec_hash",
                "prefect_flow_run_id", "git_commit", "train_run_id")
METRIC_TAG = "metric."  # version tag prefix for the metrics the version was registered with

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question")]),
    outputs=Schema([
        ColSpec("string", "answer"), ColSpec(Array(Array("double")), "boxes"),
        ColSpec(Array("long"), "classes"), ColSpec(Array("string"), "labels"),
        ColSpec(Array("double"), "scores"), ColSpec("string", "masks"),
        ColSpec(Array("string"), "documents"), ColSpec(Array("double"), "document_scores"),
        ColSpec("string", "outputs"),
    ]),
)


# -- logging and registering -----------------------------------------------------------------------
def log_student(model_dir: str | Path, spec: Any, metrics: Mapping[str, float], lineage: Mapping[str, Any],
                run_id: str | None = None, workdir: str | Path | None = None) -> str:
    """Log the student folder as a pyfunc model in the training run; return its model URI.

    run_id: the training run (default: the active run, else a new run). Logging twice into the
    same run returns the first model's URI. ``metrics`` are logged on the run."""
    model_dir = student_dir(model_dir)
    cfg: RegistryConfig = spec.registry
    exp_id = setup(cfg, cfg.experiment or spec.name, workdir)
    run_id = run_id or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if run_id is not None and (found := _logged_model_of_run(run_id)) is not None:
        return found
    with _in_run(run_id, exp_id) as run, tempfile.TemporaryDirectory(prefix="student-") as tmp:
        mlflow.set_tags({k: str(v) for k, v in lineage.items() if k in LINEAGE_KEYS})
        mlflow.log_metrics(_numeric(metrics))
        # The trainer's resumable checkpoints (and the train flow's result) live in the student
        # folder; they are not the model.
        staged = shutil.copytree(model_dir, Path(tmp) / "student", ignore=shutil.ignore_patterns(*NOT_MODEL_FILES))
        info = mlflow.pyfunc.log_model(
            name=LOGGED_NAME, python_model=str(PYFUNC_CODE), artifacts={"student": str(staged)},
            code_paths=[str(stage_code(Path(tmp) / "code"))], signature=SIGNATURE, input_example=example_input(),
            pip_requirements=cfg.requirements(torch=not runtime_ready(staged)),  # torch-free where it can be
            metadata={"distillery_spec": spec.name, "train_run_id": run.info.run_id},
        )
        return info.model_uri


def stage_code(into: Path) -> Path:
    """``into/distillery``: the ground modules (not the CLI) and the students, teachers and
    registry packages, copied from wherever they are installed (a checkout's root folders, or
    site-packages)."""
    import distillery
    import distillery.registry
    import distillery.students
    import distillery.teachers

    root = into / "distillery"
    root.mkdir(parents=True)
    for f in Path(distillery.__file__).parent.glob("*.py"):
        if f.name != "cli.py":
            shutil.copy2(f, root / f.name)
    for pkg in (distillery.students, distillery.teachers, distillery.registry):
        shutil.copytree(Path(pkg.__file__).parent, root / pkg.__name__.rsplit(".", 1)[1], ignore=shutil.ignore_patterns("__pycache__"))
    return root


@contextmanager
def _in_run(run_id: str | None, experiment_id: str) -> Iterator[mlflow.ActiveRun]:
    """The active run if it is ``run_id`` (left open), else ``run_id`` resumed (or a new run)."""
    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        yield active
        return
    if active is not None:
        raise ValueError(f"log_student: run {run_id} requested while run {active.info.run_id} is active")
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as run:
        yield run


def register_student(model_uri: str, spec: Any, metrics: Mapping[str, float], lineage: Mapping[str, Any],
                     eval_set: str | None = None, workdir: str | Path | None = None) -> ModelVersion:
    """Register a logged student as a version of the model named after the spec.

    Tags: the lineage (graph_fingerprint, traces_version, traces_uri, spec_hash,
    prefect_flow_run_id, git_commit, train_run_id; "unknown" when not given), ``metric.<name>``
    for every metric, and ``eval_set`` (identity of the evaluation set) when given. The same
    training run registered twice returns the existing version."""
    cfg: RegistryConfig = spec.registry
    setup(cfg, cfg.experiment or spec.name, workdir)
    name = cfg.model_name or spec.name
    client = mlflow.MlflowClient()
    run_id = _source_run_id(model_uri)
    existing = find_version_for_run(client, name, run_id)
    if existing is not None:
        return existing
    tags = lineage_tags(lineage, spec, run_id)
    tags.update({METRIC_TAG + k: repr(v) for k, v in _numeric(metrics).items()})
    if eval_set:
        tags["eval_set"] = eval_set
    return mlflow.register_model(model_uri, name, tags=tags)


def log_and_register(model_dir: str | Path, spec: Any, metrics: Mapping[str, float],
                     lineage: Mapping[str, Any] | None = None, run_id: str | None = None,
                     eval_set: str | None = None, workdir: str | Path | None = None) -> ModelVersion:
    """``log_student`` + ``register_student``; lineage defaults to the folder's lineage.json
    (values given here win)."""
    path = Path(model_dir) / "lineage.json"
    merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **(lineage or {})}
    uri = log_student(model_dir, spec, metrics, merged, run_id=run_id, workdir=workdir)
    return register_student(uri, spec, metrics, merged, eval_set=eval_set, workdir=workdir)


def register_distilled(spec: Any, student_dir: str | Path, metrics: Mapping[str, float], lineage: Mapping[str, Any],
                       run_id: str, eval_set: str | None = None, workdir: str | Path | None = None,
                       champion_metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Log the student into the distillation's run ``run_id``, register it, move the aliases
    (``promote``; ``champion_metrics``: the champion measured on the same set) and tag the run
    with the version. Returns model_name, version, run_id, model_uri, promoted, reasons, metrics."""
    from distillery.registry.tracking import resume_run

    with resume_run(run_id):
        uri = log_student(student_dir, spec, metrics, lineage, run_id=run_id, workdir=workdir)
    mv = register_student(uri, spec, metrics, lineage, eval_set=eval_set, workdir=workdir)
    decision = promote(mv.name, mv.version, metrics, spec.registry.gate, spec.registry.comparison_metric(),
                       champion_metrics=champion_metrics, eval_set=eval_set)
    mlflow.MlflowClient().set_tag(run_id, "registered_version", f"{mv.name}/{mv.version}")
    return {"model_name": mv.name, "version": mv.version, "run_id": run_id, "model_uri": uri,
            "promoted": decision.promoted, "reasons": decision.reasons, "metrics": dict(metrics)}


def find_registered(spec: Any, traces_uri: str, traces_version: int | None) -> dict[str, Any] | None:
    """The version of the spec's model registered from exactly these traces (uri + version)
    with this spec (its hash), if any: rerunning a distillation over unchanged data registers
    nothing new. Returns model_name, version, run_id, promoted, reasons (``["reused"]``)."""
    name = spec.registry.model_name or spec.name
    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:  # no registered model yet
        return None
    for mv in versions:
        t = mv.tags
        if (t.get("traces_uri") == str(traces_uri) and t.get("traces_version") == str(traces_version)
                and t.get("spec_hash") == spec.spec_hash()):
            champion = alias_version(client, name, CHAMPION)  # (search results may leave aliases out)
            return {"model_name": name, "version": mv.version, "run_id": mv.run_id, "reasons": ["reused"],
                    "promoted": champion is not None and str(champion.version) == str(mv.version)}
    return None


def lineage_tags(lineage: Mapping[str, Any], spec: Any, run_id: str | None) -> dict[str, str]:
    tags = {k: "unknown" for k in LINEAGE_KEYS}
    tags.update({"spec_hash": spec.spec_hash(), "git_commit": git_commit(), "train_run_id": run_id or "unknown"})
    tags.update({k: str(v) for k, v in lineage.items() if v is not None})
    return tags


def find_version_for_run(client: mlflow.MlflowClient, name: str, run_id: str | None) -> ModelVersion | None:
    """The version of ``name`` registered from ``run_id`` (by source run, or the train_run_id tag)."""
    if not run_id:
        return None
    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    for query in (f"name = '{name}' and run_id = '{run_id}'", f"name = '{name}' and tags.train_run_id = '{run_id}'"):
        found = client.search_model_versions(query)
        if found:
            return min(found, key=lambda v: int(v.version))
    return None


def git_commit() -> str:
    """``git rev-parse HEAD`` of the project checkout, or "unknown" (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def example_input():
    """A tiny base64 PNG and a question: the logged model's input example."""
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()],
                         "question": ["How many objects are there?"]})


def _logged_model_of_run(run_id: str) -> str | None:
    exp_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models(experiment_ids=[exp_id], output_format="list",
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{LOGGED_NAME}'")
    return f"models:/{found[0].model_id}" if found else None


def _source_run_id(model_uri: str) -> str | None:
    if model_uri.startswith("runs:/"):
        return model_uri.split("/")[1]
    if model_uri.startswith("models:/m-"):
        return mlflow.get_logged_model(model_uri.removeprefix("models:/")).source_run_id
    return None


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    from distillery.students.evaluation.report import mlflow_metrics

    return mlflow_metrics(metrics)


# -- promotion -------------------------------------------------------------------------------------
@dataclass
class PromotionDecision:
    """Whether ``champion`` moved to the candidate, and why (failed checks, or passed ones)."""

    promoted: bool
    reasons: list[str] = field(default_factory=list)
    version: str | None = None
    previous_champion: str | None = None


def decide_promotion(candidate: Mapping[str, float], champion: Mapping[str, float] | None,
                     gate: Mapping[str, float], comparison_metric: str | None) -> PromotionDecision:
    """Pure rule: every gate metric reaches its minimum, and the candidate is not worse than
    the champion on ``comparison_metric`` (higher is better; no champion = nothing to beat)."""
    failed, passed = [], []
    for metric, minimum in gate.items():
        value = candidate.get(metric)
        if value is None or not math.isfinite(value):
            failed.append(f"gate: metric {metric!r} missing from the candidate's metrics")
        elif value < minimum:
            failed.append(f"gate: {metric} {value:.4g} < {minimum:.4g}")
        else:
            passed.append(f"gate: {metric} {value:.4g} >= {minimum:.4g}")
    if comparison_metric and champion is not None:
        value, best = candidate.get(comparison_metric), champion.get(comparison_metric)
        if value is None or not math.isfinite(value):
            failed.append(f"comparison: metric {comparison_metric!r} missing from the candidate's metrics")
        elif best is None or not math.isfinite(best):
            passed.append(f"comparison: champion has no {comparison_metric}; nothing to beat")
        elif value < best:
            failed.append(f"comparison: {comparison_metric} {value:.4g} < champion's {best:.4g}")
        else:
            passed.append(f"comparison: {comparison_metric} {value:.4g} >= champion's {best:.4g}")
    elif champion is None:
        passed.append("no champion yet")
    return PromotionDecision(promoted=not failed, reasons=failed or passed)


def promote(model_name: str, version: str | int, metrics: Mapping[str, float] | None = None,
            gate: Mapping[str, float] | None = None, comparison_metric: str | None = None,
            champion_metrics: Mapping[str, float] | None = None,
            eval_set: str | None = None, tracking_uri: str | None = None) -> PromotionDecision:
    """Move ``challenger`` to the newest version; move ``champion`` to ``version`` if it earns it.

    metrics: the candidate's (default: its ``metric.*`` version tags). champion_metrics: the
    current champion evaluated on the same set (default: its ``metric.*`` tags, else its run's
    metrics, refused when its ``eval_set`` tag differs from ``eval_set``). The decision and its
    reasons are written as version tags ``promotion`` / ``promotion_reasons``. tracking_uri:
    see ``use_store``."""
    with promotion_lock(use_store(tracking_uri)):  # read the aliases, decide, move them: one at a time
        return _promote(model_name, version, metrics, gate, comparison_metric, champion_metrics, eval_set)


@contextmanager
def promotion_lock(tracking_uri: str) -> Iterator[None]:
    """Promotions of one store one at a time, so concurrent distillations leave the aliases where
    one-at-a-time would (challenger on the newest version, champion on the best). On the local
    SQLite store: an exclusive lock on a file beside the database (released by the kernel if the
    process dies). Other stores (the team stack's PostgreSQL): no lock here; version numbers stay
    distinct (the registry assigns them in a transaction), and concurrent promotions of one model
    are last-writer-wins, so run its distillations one at a time (a Prefect concurrency limit)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(tracking_uri.removeprefix("sqlite:///") + ".promote.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _promote(model_name: str, version: str | int, metrics: Mapping[str, float] | None,
             gate: Mapping[str, float] | None, comparison_metric: str | None,
             champion_metrics: Mapping[str, float] | None, eval_set: str | None) -> PromotionDecision:
    client = mlflow.MlflowClient()
    version = str(version)
    newest = max(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))
    client.set_registered_model_alias(model_name, CHALLENGER, newest.version)
    candidate = client.get_model_version(model_name, version)
    current = alias_version(client, model_name, CHAMPION)
    if current is not None and current.version == version:
        return PromotionDecision(True, ["already champion"], version, version)
    cand_metrics = dict(metrics) if metrics is not None else version_metrics(client, candidate)
    champ_metrics, mismatch = None, None
    if current is not None:
        champ_metrics = dict(champion_metrics) if champion_metrics is not None else version_metrics(client, current)
        theirs = current.tags.get("eval_set")
        if champion_metrics is None and eval_set and theirs and theirs != eval_set:
            mismatch = (f"comparison: champion v{current.version} was evaluated on another set "
                        f"({theirs} != {eval_set}); pass champion_metrics measured on this set")
    decision = decide_promotion(cand_metrics, champ_metrics, gate or {}, comparison_metric)
    if mismatch:
        decision = PromotionDecision(False, [mismatch] + ([] if decision.promoted else decision.reasons))
    decision.version, decision.previous_champion = version, current.version if current else None
    if decision.promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    client.set_model_version_tag(model_name, version, "promotion", "champion" if decision.promoted else "rejected")
    client.set_model_version_tag(model_name, version, "promotion_reasons", json.dumps(decision.reasons))
    return decision


def version_metrics(client: mlflow.MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """Metrics a version was registered with (``metric.*`` tags), else its run's metrics."""
    tagged = {k[len(METRIC_TAG):]: float(v) for k, v in mv.tags.items() if k.startswith(METRIC_TAG)}
    if tagged or not mv.run_id:
        return tagged
    return dict(client.get_run(mv.run_id).data.metrics)


def alias_version(client: mlflow.MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version that holds ``alias`` (e.g. ``champion``), or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
