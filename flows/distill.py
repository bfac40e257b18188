"""The distill flow: record -> train -> evaluate -> register -> promote, as one Prefect flow.

Every step is a plain function in the rooms (``teachers/``, ``students/``, ``registry/``); this
file only orders them and publishes Prefect artifacts (progress while recording and training, a
per-node fidelity table, a forgetting table, links to the MLflow run and registered version).
Its parameters are the pydantic ``Spec`` (a typed form in the Prefect UI) plus where the data
lives.

One distillation is one MLflow run, opened before training: the train step (in-process, or the
deployment ``spec.training.deployment`` on a GPU worker) logs the training params, per-epoch
metrics, system metrics and loss curves into it; evaluation adds the report, the per-node bar
chart, agreement by question type and teacher-vs-student sample overlays; registration logs the
pyfunc model there and registers it.

A recurring run (``warm_start=True`` and a champion exists) records only new inputs, warm-starts
from the champion, trains on the new traces plus a replay sample of older ones, and evaluates on
the old and the new held-out sets, reporting forgetting (the change on the old set).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from distillery.flows.spec import Spec
from distillery.flows.record import record_flow
from distillery.flows.train import read_result, train_flow

SAMPLES = 3  # teacher-vs-student overlays logged per run


@flow(name="distill", log_prints=True)
def distill_flow(spec: Spec | None = None, inputs: str = "", traces: str = "", eval_inputs: str | None = None,
                 eval_traces: str | None = None, workdir: str | None = None, warm_start: bool = True,
                 spec_path: str | None = None) -> dict:
    """Distill the teacher graph into a registered student.

    Args:
        spec: the distillation spec (or give ``spec_path``).
        inputs: folder of images (+ requests.jsonl) to record and train on.
        traces: trace store URI for those inputs.
        eval_inputs: held-out inputs (recorded into ``eval_traces``); default: the trainer's
            validation split of ``traces``.
        eval_traces: trace store URI for the held-out inputs.
        workdir: where students and the local MLflow store go (default: the user data dir).
        warm_start: continue from the current champion (continual distillation) when there is one.
        spec_path: a spec YAML on the worker, used when ``spec`` is not given (deployments).
    """
    spec, work = prepare(spec, spec_path, inputs, traces, workdir)
    recorded = record_flow(spec=spec, inputs=inputs, traces=traces)
    if eval_inputs:
        eval_traces = eval_traces or str(Path(traces).with_name(Path(traces).stem + "-eval.lance"))
        record_flow(spec=spec, inputs=eval_inputs, traces=eval_traces)
    base = {"record": recorded, "flow_run_id": str(runtime.flow_run.id or "")}
    done = already_registered(spec, traces, recorded["version"])
    if done is not None:
        get_run_logger().info("a student for %s@%s is already registered (v%s): nothing to train", traces,
                              recorded["version"], done["version"])
        publish_links(done)
        return {**base, "registered": done, "reused": True}
    champion = _champion(spec, work) if warm_start else None
    run_id = open_distill_run(spec, work, traces, recorded["version"], champion)
    trained = _train(spec, train_params(spec, traces, work, recorded["version"], champion, run_id))
    evaluated = evaluate_and_register(spec, trained, champion, run_id, work, traces, eval_traces,
                                      eval_dir=eval_inputs if eval_traces else inputs)
    return {**base, **evaluated}


def prepare(spec: Spec | None, spec_path: str | None, inputs: str, traces: str, workdir: str | None,
            ) -> tuple[Spec, Path]:
    """The spec (given, or loaded from ``spec_path``), the workdir, MLflow pointed at its store."""
    if spec is None:
        if not spec_path:
            raise ValueError("distill: give spec (the form) or spec_path (a spec YAML on the worker)")
        from distillery.flows.spec import load_spec

        spec = load_spec(spec_path)
    if not inputs or not traces:
        raise ValueError("distill: inputs and traces are required")
    from distillery import runtime as dr
    from distillery.registry.models import use_store

    work = Path(workdir or dr.data_dir() / "runs" / spec.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    use_store(spec.registry.resolve_tracking_uri(work))
    return spec, work


def open_distill_run(spec: Spec, work: Path, traces: str, version: int | None, champion: dict | None) -> str:
    """The distillation's MLflow run (spec logged), opened before training; its id."""
    from distillery.registry.tracking import open_run

    tags = {"prefect_flow_run_id": str(runtime.flow_run.id or ""), "traces_uri": traces, "traces_version": version,
            "warm_start_version": champion["version"] if champion else None}
    return open_run(spec.registry, spec, run_name=f"distill-{spec.name}", workdir=work, tags=tags)


def train_params(spec: Spec, traces: str, work: Path, version: int | None, champion: dict | None,
                 run_id: str) -> dict:
    """Parameters of the train step (absolute paths: it may run on another worker)."""
    import mlflow

    return {"spec": spec, "traces": traces, "out_dir": str(work / "students" / f"v{version}"), "version": version,
            "init_from": champion["dir"] if champion else None,
            "since_version": champion["traces_version"] if champion else None,
            "mlflow_run_id": run_id, "tracking_uri": mlflow.get_tracking_uri()}


def _train(spec: Spec, params: dict) -> dict:
    """In-process by default; on the deployment named by ``spec.training.deployment`` if set,
    whose result is read back from the ``train_result.json`` it wrote into ``out_dir``."""
    deployment = spec.training.deployment
    if not deployment:
        return train_flow(**params)
    from prefect.deployments import run_deployment

    params = {**params, "spec": spec.model_dump(mode="json")}
    run = run_deployment(deployment, parameters=params, timeout=None)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"train deployment {deployment} ended {run.state.name if run.state else 'unknown'}")
    return read_result(params["out_dir"], flow_run_id=str(run.id))


def evaluate_and_register(spec: Spec, trained: dict, champion: dict | None, run_id: str, work: Path,
                          traces: str, eval_traces: str | None, eval_dir: str | None) -> dict:
    """Evaluate (and measure forgetting against the champion), register, promote, publish."""
    target, split = (eval_traces, "all") if eval_traces else (traces, "val")
    report = evaluate_task(spec, trained["out_dir"], target, split, eval_dir, run_id)
    out = {"train": {k: trained[k] for k in ("out_dir", "traces_version", "seconds")},
           "fidelity": report["student_vs_teacher"], "mlflow_run_id": run_id}
    champion_report = None
    if champion:
        trained["lineage"] = {**trained["lineage"], "warm_start_version": champion["version"]}
        out["forgetting"] = forgetting_task(spec, champion, trained, traces)
        publish_forgetting(out["forgetting"], run_id)
        champion_report = evaluate_task(spec, champion["dir"], target, split, eval_dir)
    registered = register_task(spec, trained, report, eval_set=eval_traces or f"{traces}#val", workdir=str(work),
                               run_id=run_id, champion_report=champion_report)
    from distillery.students.evaluation.fidelity import publish_table

    publish_table(report, key="fidelity")
    publish_links(registered)
    get_run_logger().info("registered %s v%s (champion: %s)", registered["model_name"], registered["version"],
                          registered["promoted"])
    return {**out, "registered": registered}


# -- evaluation ------------------------------------------------------------------------------------
@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(spec: Spec, student_dir: str, traces: str, split: str = "all", inputs_dir: str | None = None,
                  run_id: str | None = None) -> dict:
    """Student vs teacher (and vs truth where the inputs carry it) on a trace store's held-out
    records (``split``: all | val); with ``run_id``, logged into that MLflow run."""
    from distillery.students.evaluation.fidelity import evaluate_model
    from distillery.students.training.train import read_traces, split_by_image

    data = read_traces(spec, traces)
    records = data.records if split == "all" else split_by_image(data.records, spec.training.val_fraction)[1]
    records = [r for r in records if r.status == "ok"]
    truth, types = ground_truth(spec, inputs_dir, records)
    report = evaluate_model(student_dir, spec, records, truth, types=types)
    report["eval_set"] = f"{traces}#{split}"
    if run_id:
        log_evaluation_run(spec, report, records, student_dir, run_id)
    return report


def ground_truth(spec: Spec, inputs_dir: str | None, records: list) -> tuple[list | None, list]:
    """Truth and question types from ``annotations.json`` in the inputs folder (the demo world's
    format); without one: no truth, and the question's first two words as its type."""
    path = Path(inputs_dir) / "annotations.json" if inputs_dir else None
    if path is not None and path.is_file():
        from distillery.students.evaluation.fidelity import demo_ground_truth

        annotations = json.loads(path.read_text())
        try:
            return demo_ground_truth(spec, SimpleNamespace(annotations=lambda split: annotations), "", records)
        except (KeyError, TypeError, ValueError) as e:
            get_run_logger().warning("%s: not in the demo annotation format (%s); no ground truth", path, e)
    return None, [" ".join(r.question.lower().rstrip("?").split()[:2]) or None for r in records]


def log_evaluation_run(spec: Spec, report: dict, records: list, student_dir: str, run_id: str) -> None:
    """Into the run: ``eval.*`` and ``fidelity.<node>.<metric>`` metrics, eval/evaluation.json,
    the per-node bar chart, agreement by question type, teacher-vs-student sample overlays."""
    import mlflow

    from distillery.registry.tracking import log_by_type, log_samples, one_per_image, resume_run, sample_overlays
    from distillery.students.evaluation.metrics import predict_records
    from distillery.students.evaluation.fidelity import load_predictor, log_evaluation, nodes_of_type
    from distillery.students.evaluation.report import flat_metrics

    log_evaluation(report, run_id=run_id)
    with resume_run(run_id):
        mlflow.log_metrics(flat_metrics(report["student_vs_teacher"]))
        log_by_type(report.get("by_type") or {})
        detectors = nodes_of_type(spec, "yolo")
        shown = one_per_image(records, SAMPLES, detectors[0]) if detectors else []
        if shown:
            preds = predict_records(load_predictor(student_dir), shown)
            log_samples(sample_overlays(shown, preds, detectors[0]))


def forgetting_report(spec: Spec, champion: dict, trained: dict, traces: str) -> dict:
    """Fidelity of the champion and the new student on the old and the new held-out records."""
    from distillery.students.training.continual import split_increment
    from distillery.students.evaluation.metrics import evaluate_student
    from distillery.students.model.student import MultimodalStudent
    from distillery.students.evaluation.report import headline_metrics
    from distillery.students.training.train import split_by_image
    from distillery.teachers.graph import TeacherGraph

    inc = split_increment(traces, TeacherGraph(spec.teachers).fingerprint, trained["traces_version"], champion["traces_version"])
    val = lambda recs: split_by_image(recs, spec.training.val_fraction)[1]  # noqa: E731
    old_val, new_val = val(inc.old), val(inc.new)
    new_model = MultimodalStudent.from_pretrained(trained["out_dir"])
    old_model = MultimodalStudent.from_pretrained(champion["dir"])
    out = {}
    for name, recs in (("old", old_val), ("new", new_val)):
        if recs:
            out[name] = {"student": headline_metrics(evaluate_student(new_model, recs)),
                         "champion": headline_metrics(evaluate_student(old_model, recs)), "n": len(recs)}
    if "old" in out:  # > 0: the new student lost ground on the old set (token_kl: lower is better)
        old_champion = out["old"]["champion"]
        out["forgetting"] = {k: (v - old_champion[k]) if k in LOWER_IS_BETTER else (old_champion[k] - v)
                             for k, v in out["old"]["student"].items() if k in old_champion}
    return out


LOWER_IS_BETTER = {"token_kl"}


forgetting_task = task(name="forgetting", cache_policy=NO_CACHE)(forgetting_report)


# -- registry --------------------------------------------------------------------------------------
@task(name="register", cache_policy=NO_CACHE)
def register_task(spec: Spec, trained: dict, report: dict, eval_set: str, workdir: str, run_id: str,
                  champion_report: dict | None = None) -> dict:
    """Log the student into the distillation's run, register it, move the aliases."""
    import mlflow

    from distillery.registry.models import log_student, promote, register_student
    from distillery.registry.tracking import resume_run

    headline = report["headline"]
    lineage = {**trained["lineage"], "traces_uri": trained["traces_uri"],
               "traces_version": trained["traces_version"], "prefect_flow_run_id": str(runtime.flow_run.id or "")}
    with resume_run(run_id):
        uri = log_student(trained["out_dir"], spec, headline, lineage, run_id=run_id, workdir=workdir)
    mv = register_student(uri, spec, headline, lineage, eval_set=eval_set, workdir=workdir)
    decision = promote(mv.name, mv.version, headline, spec.registry.gate, spec.registry.comparison_metric(),
                       champion_metrics=champion_report["headline"] if champion_report else None,
                       eval_set=eval_set)
    mlflow.MlflowClient().set_tag(run_id, "registered_version", f"{mv.name}/{mv.version}")
    return {"model_name": mv.name, "version": mv.version, "run_id": run_id, "model_uri": uri,
            "promoted": decision.promoted, "reasons": decision.reasons, "metrics": headline}


def already_registered(spec: Spec, traces: str, version: int | None) -> dict | None:
    """The version registered from exactly these traces (uri + version) and this spec, if any:
    rerunning the flow over unchanged data registers nothing new."""
    import mlflow

    name = spec.registry.model_name or spec.name
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    except Exception:  # no registered model yet
        return None
    for mv in versions:
        t = mv.tags
        if (t.get("traces_uri") == str(traces) and t.get("traces_version") == str(version)
                and t.get("spec_hash") == spec.spec_hash()):
            return {"model_name": name, "version": mv.version, "run_id": mv.run_id,
                    "promoted": "champion" in (mv.aliases or []), "reasons": ["reused"]}
    return None


def _champion(spec: Spec, workdir: Path) -> dict | None:
    """The current champion pulled into the workdir, with the trace version it was trained on."""
    from distillery.registry.pull import pull, resolve_version

    name = spec.registry.model_name or spec.name
    try:
        mv = resolve_version(f"models:/{name}@champion")
    except LookupError:
        return None
    folder = pull(f"{name}/{mv.version}", workdir / "champion")
    version = mv.tags.get("traces_version")
    return {"version": mv.version, "dir": str(folder / "student"),
            "traces_version": int(version) if version and version.isdigit() else None}


# -- Prefect artifacts -----------------------------------------------------------------------------
def publish_forgetting(report: dict, run_id: str) -> None:
    """Forgetting as MLflow metrics (``forgetting.*``) and a Prefect table (``forgetting``)."""
    from distillery.registry.tracking import log_forgetting, resume_run

    with resume_run(run_id):
        log_forgetting(report)
    rows = []
    for metric in sorted({k for part in ("old", "new") for k in (report.get(part) or {}).get("student", {})}):
        row = {"metric": metric}
        for part in ("old", "new"):
            for who in ("champion", "student"):
                value = (report.get(part) or {}).get(who, {}).get(metric)
                row[f"{part} set: {who}"] = None if value is None else round(value, 4)
        change = (report.get("forgetting") or {}).get(metric)
        row["forgetting (old set: champion - student)"] = None if change is None else round(change, 4)
        rows.append(row)
    create_table_artifact(table=rows, key="forgetting", description="Continual run: fidelity on the old and new "
                          "held-out sets, champion vs new student (forgetting > 0: the student lost ground)")


def publish_links(reg: dict) -> None:
    """Links to the MLflow run and the registered version (markdown when the store is local)."""
    import mlflow

    uri, name, version, run_id = mlflow.get_tracking_uri(), reg["model_name"], reg["version"], reg.get("run_id")
    if uri.startswith(("http://", "https://")):
        if run_id:
            exp_id = mlflow.get_run(run_id).info.experiment_id
            create_link_artifact(link=f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}", key="mlflow-run",
                                 link_text=f"MLflow run {run_id}", description="The distillation's MLflow run")
        create_link_artifact(link=f"{uri.rstrip('/')}/#/models/{name}/versions/{version}", key="registered-version",
                             link_text=f"{name} v{version}", description=f"champion: {reg['promoted']}")
        return
    create_markdown_artifact(key="registered-student", markdown=(
        f"### Registered student\n\n- model: `models:/{name}/{version}`\n"
        f"- champion: **{reg['promoted']}** ({'; '.join(reg['reasons'])})\n- MLflow run: `{run_id}` "
        f"in `{uri}` (open with `mlflow ui --backend-store-uri {uri}`)\n"
        f"- pull: `distillery pull {name}/{version} --to ./student`\n"))
