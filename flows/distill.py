"""The distill flow: record -> train -> evaluate -> register -> promote, as one Prefect flow.

Every step is a plain function in the rooms (``teachers/``, ``students/``, ``registry/``); this
file only orders them, and each task is a few lines around a plain function (tested without
Prefect). Artifacts (progress while recording and training, a per-node fidelity table, a
forgetting table, links to the MLflow run and registered version) are built in ``flows.artifacts``.
Its parameters are the pydantic ``Spec`` (a typed form in the Prefect UI) plus where the data
lives.

One distillation is one MLflow run, opened before training: the train step (in-process, or the
deployment ``spec.training.deployment`` on a GPU worker) logs the training params, per-epoch
metrics, system metrics and loss curves into it; evaluation adds the report, the per-node bar
chart, agreement by question type and teacher-vs-student sample overlays; registration logs the
pyfunc model there and registers it.

Evaluation compares the student with the truth wherever the evaluated inputs folder carries
labels (``students.evaluation.truth``: a COCO ``annotations.json``, ``answer`` / ``type`` /
``documents`` on ``requests.jsonl`` lines); those labels are checked before anything is recorded.

A recurring run (``warm_start=True`` and a champion exists) records only new inputs, warm-starts
from the champion, trains on the new traces plus a replay sample of older ones, and evaluates on
the old and the new held-out sets, reporting forgetting (the change on the old set).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from distillery.flows.artifacts import publish_fidelity, publish_forgetting, publish_links
from distillery.flows.record import record_flow
from distillery.flows.spec import Spec
from distillery.flows.train import read_result, train_flow, with_on_policy
from distillery.registry.models import find_registered, register_distilled, use_store
from distillery.registry.pull import pull_champion
from distillery.registry.tracking import (log_evaluation_run, log_forgetting, log_record_summary, open_run,
                                          resume_run)

SAMPLES = 3  # teacher-vs-student overlays logged per run


@flow(name="distill", log_prints=True)
def distill_flow(spec: Spec | None = None, inputs: str = "", traces: str = "", eval_inputs: str | None = None,
                 eval_traces: str | None = None, workdir: str | None = None, warm_start: bool = True,
                 spec_path: str | None = None, on_policy: bool | None = None) -> dict:
    """Distill the teacher graph into a registered student.

    Args:
        spec: the distillation spec (or give ``spec_path``).
        inputs: folder of images (+ requests.jsonl) to record and train on.
        traces: trace store URI for those inputs.
        eval_inputs: held-out inputs (recorded into ``eval_traces``), with their labels for the
            figures vs truth; default: the trainer's validation split of ``traces``.
        eval_traces: trace store URI for the held-out inputs.
        workdir: where students and the local MLflow store go (default: the user data dir).
        warm_start: continue from the current champion (continual distillation) when there is one.
        spec_path: a spec YAML on the worker, used when ``spec`` is not given (deployments).
        on_policy: add the on-policy rounds (``training.on_policy``) after the offline epochs
            (None: as the spec says).
    """
    spec, work = prepare(spec, spec_path, inputs, traces, workdir, eval_inputs)
    spec = with_on_policy(spec, on_policy)
    recorded = record_flow(spec=spec, inputs=inputs, traces=traces)
    if eval_inputs:
        eval_traces = eval_traces or str(Path(traces).with_name(Path(traces).stem + "-eval.lance"))
        record_flow(spec=spec, inputs=eval_inputs, traces=eval_traces)
    base = {"record": recorded, "flow_run_id": str(runtime.flow_run.id or "")}
    done = find_registered(spec, traces, recorded["version"])
    if done is not None:
        get_run_logger().info("a student for %s@%s is already registered (v%s): nothing to train", traces,
                              recorded["version"], done["version"])
        publish_links(done)
        return {**base, "registered": done, "reused": True}
    champion = pull_champion(spec, work) if warm_start else None
    run_id = open_distill_run(spec, work, traces, recorded, champion)
    trained = _train(spec, train_params(spec, traces, work, recorded["version"], champion, run_id))
    evaluated = evaluate_and_register(spec, trained, champion, run_id, work, traces, eval_traces,
                                      eval_dir=eval_inputs if eval_traces else inputs)
    return {**base, **evaluated}


def prepare(spec: Spec | None, spec_path: str | None, inputs: str, traces: str, workdir: str | None,
            eval_inputs: str | None = None) -> tuple[Spec, Path]:
    """The spec (given, or loaded from ``spec_path``), the workdir, MLflow pointed at its store;
    the labels of the inputs the student is evaluated on are checked here, before any model loads."""
    if spec is None:
        if not spec_path:
            raise ValueError("distill: give spec (the form) or spec_path (a spec YAML on the worker)")
        from distillery.flows.spec import load_spec

        spec = load_spec(spec_path)
    if not inputs or not traces:
        raise ValueError("distill: inputs and traces are required")
    labelled = Path(eval_inputs or inputs)
    if labelled.exists():  # a missing folder is the record step's error to report
        from distillery.students.evaluation.truth import read_labels

        read_labels(labelled)
    from distillery import runtime as dr

    work = Path(workdir or dr.data_dir() / "runs" / spec.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    use_store(spec.registry.resolve_tracking_uri(work))
    return spec, work


def open_distill_run(spec: Spec, work: Path, traces: str, recorded: dict, champion: dict | None) -> str:
    """The distillation's MLflow run (spec and the record step's summary and cost logged),
    opened before training; its id."""
    version = recorded["version"]
    tags = {"prefect_flow_run_id": str(runtime.flow_run.id or ""), "traces_uri": traces, "traces_version": version,
            "warm_start_version": champion["version"] if champion else None}
    run_id = open_run(spec.registry, spec, run_name=f"distill-{spec.name}", workdir=work, tags=tags)
    with resume_run(run_id):
        log_record_summary(recorded)
    return run_id


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
           "fidelity": report["student_vs_teacher"], "retained": report.get("retained"), "mlflow_run_id": run_id}
    champion_report = None
    if champion:
        trained["lineage"] = {**trained["lineage"], "warm_start_version": champion["version"]}
        out["forgetting"] = forgetting_task(spec, champion, trained, traces)
        with resume_run(run_id):
            log_forgetting(out["forgetting"])
        publish_forgetting(out["forgetting"])
        champion_report = evaluate_task(spec, champion["dir"], target, split, eval_dir)
    registered = register_task(spec, trained, report, eval_set=eval_traces or f"{traces}#val", workdir=str(work),
                               run_id=run_id, champion_report=champion_report)
    publish_fidelity(report, key="fidelity")
    publish_links(registered)
    get_run_logger().info("registered %s v%s (champion: %s)", registered["model_name"], registered["version"],
                          registered["promoted"])
    return {**out, "registered": registered}


# -- evaluation ------------------------------------------------------------------------------------
def evaluate_held_out(spec: Spec, student_dir: str, traces: str, split: str = "all",
                      inputs_dir: str | None = None) -> tuple[dict, list]:
    """Student vs teacher on a trace store's held-out records (``split``: all | val), and vs the
    truth where ``inputs_dir`` carries labels; question types from the labels, else the
    questions' opening words. Returns (report, the records evaluated on)."""
    from distillery.students.evaluation.fidelity import (class_names, evaluate_model, question_openings,
                                                          read_schema)
    from distillery.students.evaluation.truth import ground_truth
    from distillery.students.training.train import read_traces, split_by_image

    data = read_traces(spec, traces)
    records = data.records if split == "all" else split_by_image(data.records, spec.training.val_fraction)[1]
    records = [r for r in records if r.status == "ok"]
    truth = ground_truth(inputs_dir, spec, records, class_names(read_schema(student_dir))) if inputs_dir else None
    labelled = truth is not None and any(truth.outputs)
    types = truth.types if truth is not None and any(truth.types) else question_openings(records)
    report = evaluate_model(student_dir, spec, records, truth.outputs if labelled else None, types=types)
    report["eval_set"] = f"{traces}#{split}"
    if truth is not None:
        report["labels"] = truth.summary()
    return report, records


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(spec: Spec, student_dir: str, traces: str, split: str = "all", inputs_dir: str | None = None,
                  run_id: str | None = None) -> dict:
    """``evaluate_held_out``; with ``run_id``, logged into that MLflow run."""
    report, records = evaluate_held_out(spec, student_dir, traces, split, inputs_dir)
    if run_id:
        detectors = [n for n in spec.topological_order() if spec.teachers[n].type == "yolo"]
        log_evaluation_run(report, records, student_dir, run_id, detectors[0] if detectors else None, SAMPLES)
    return report


def measure_forgetting(spec: Spec, champion: dict, trained: dict, traces: str) -> dict:
    """``students.evaluation.forgetting.forgetting_report`` of the new student and the champion on
    the validation records the champion was trained with (old) and those it never saw (new)."""
    from distillery.students.evaluation.forgetting import forgetting_report
    from distillery.students.training.continual import split_increment
    from distillery.students.training.train import split_by_image
    from distillery.teachers.graph import TeacherGraph

    inc = split_increment(traces, TeacherGraph(spec.teachers).fingerprint, trained["traces_version"],
                          champion["traces_version"])
    val_fraction = spec.training.val_fraction
    return forgetting_report(trained["out_dir"], champion["dir"], split_by_image(inc.old, val_fraction)[1],
                             split_by_image(inc.new, val_fraction)[1])


forgetting_task = task(name="forgetting", cache_policy=NO_CACHE)(measure_forgetting)


# -- registry --------------------------------------------------------------------------------------
@task(name="register", cache_policy=NO_CACHE)
def register_task(spec: Spec, trained: dict, report: dict, eval_set: str, workdir: str, run_id: str,
                  champion_report: dict | None = None) -> dict:
    """Log the student into the distillation's run, register it, move the aliases."""
    lineage = {**trained["lineage"], "traces_uri": trained["traces_uri"],
               "traces_version": trained["traces_version"], "prefect_flow_run_id": str(runtime.flow_run.id or "")}
    return register_distilled(spec, trained["out_dir"], report["headline"], lineage, run_id, eval_set, workdir,
                              champion_report["headline"] if champion_report else None)
