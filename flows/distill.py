"""The distill flow: record -> train -> evaluate -> register -> promote, as one Prefect flow.

Every step is a plain function in the rooms (``teachers/``, ``students/``, ``registry/``); this
file only orders them and publishes Prefect artifacts (progress, a per-node fidelity table, links
to the MLflow run and registered version). Its parameters are the pydantic ``Spec`` (a typed form
in the Prefect UI) plus where the data lives.

A recurring run (``warm_start=True`` and a champion exists) records only new inputs, warm-starts
from the champion, trains on the new traces plus a replay sample of older ones, and evaluates on
the old and the new held-out sets, reporting forgetting (the change on the old set).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from distillery.spec import Spec
from flows.record import record_flow
from flows.train import train_flow


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(spec: Spec, student_dir: str, traces: str, split: str = "all") -> dict:
    """Student vs teacher on a trace store's held-out records; ``split``: all | val."""
    from students.evaluate import evaluate_student
    from students.model import MultimodalStudent
    from students.train import read_traces, split_by_image

    data = read_traces(spec, traces)
    records = data.records if split == "all" else split_by_image(data.records, spec.training.val_fraction)[1]
    model = MultimodalStudent.from_pretrained(student_dir)
    return evaluate_student(model, records)


@task(name="register", cache_policy=NO_CACHE)
def register_task(spec: Spec, trained: dict, report: dict, eval_set: str, workdir: str,
                  champion_report: dict | None = None) -> dict:
    """Log the run to MLflow, register the student, move the aliases."""
    from registry.models import log_student, promote, register_student
    from registry.tracking import log_history, start_run
    from students.report import flat_metrics, headline_metrics

    headline = headline_metrics(report)
    lineage = {**trained["lineage"], "traces_uri": trained["traces_uri"],
               "traces_version": trained["traces_version"], "prefect_flow_run_id": str(runtime.flow_run.id or "")}
    with start_run(spec.registry, spec, run_name=f"distill-{spec.name}", workdir=workdir,
                   tags={"prefect_flow_run_id": lineage["prefect_flow_run_id"]}) as run:
        log_history(trained["history"], nodes=list(spec.teachers))  # metrics per epoch + loss-curve plot
        import mlflow

        mlflow.log_metrics(flat_metrics(report))
        mlflow.log_dict(report, "evaluation.json")
        uri = log_student(trained["out_dir"], spec, headline, lineage, run_id=run.info.run_id, workdir=workdir)
        run_id = run.info.run_id
    mv = register_student(uri, spec, headline, lineage, eval_set=eval_set, workdir=workdir)
    decision = promote(mv.name, mv.version, headline, spec.registry.gate, spec.registry.comparison_metric(),
                       champion_metrics=headline_metrics(champion_report) if champion_report else None,
                       eval_set=eval_set)
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
    from registry.models import pull, resolve_version

    name = spec.registry.model_name or spec.name
    try:
        mv = resolve_version(f"models:/{name}@champion")
    except LookupError:
        return None
    folder = pull(f"{name}/{mv.version}", workdir / "champion")
    version = mv.tags.get("traces_version")
    return {"version": mv.version, "dir": str(folder / "student"),
            "traces_version": int(version) if version and version.isdigit() else None}


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
    if spec is None:
        if not spec_path:
            raise ValueError("distill: give spec (the form) or spec_path (a spec YAML on the worker)")
        from distillery.spec import load_spec

        spec = load_spec(spec_path)
    if not inputs or not traces:
        raise ValueError("distill: inputs and traces are required")
    from distillery import runtime as dr
    from registry.models import use_store
    from students.report import fidelity_rows

    logger = get_run_logger()
    work = Path(workdir or dr.data_dir() / "runs" / spec.name)
    work.mkdir(parents=True, exist_ok=True)
    use_store(spec.registry.resolve_tracking_uri(work))
    recorded = record_flow(spec=spec, inputs=inputs, traces=traces)
    if eval_inputs:
        eval_traces = eval_traces or str(Path(traces).with_name(Path(traces).stem + "-eval.lance"))
        record_flow(spec=spec, inputs=eval_inputs, traces=eval_traces)
    done = already_registered(spec, traces, recorded["version"])
    if done is not None:
        logger.info("a student for %s@%s is already registered (v%s): nothing to train", traces,
                    recorded["version"], done["version"])
        return {"record": recorded, "registered": done, "reused": True}
    champion = _champion(spec, work) if warm_start else None
    out_dir = work / "students" / f"v{recorded['version']}"
    params = {"spec": spec, "traces": traces, "out_dir": str(out_dir), "version": recorded["version"],
              "init_from": champion["dir"] if champion else None,
              "since_version": champion["traces_version"] if champion else None}
    trained = _train(spec, params)
    report = evaluate_task(spec, trained["out_dir"], eval_traces or traces, "all" if eval_traces else "val")
    result = {"record": recorded, "train": {k: trained[k] for k in ("out_dir", "traces_version", "seconds")},
              "fidelity": report}
    champion_report = None
    if champion:
        result["forgetting"] = forgetting_report(spec, champion, trained, traces)
        champion_report = evaluate_task(spec, champion["dir"], eval_traces or traces, "all" if eval_traces else "val")
    registered = register_task(spec, trained, report, eval_set=eval_traces or f"{traces}#val", workdir=str(work),
                               champion_report=champion_report)
    result["registered"] = registered
    create_table_artifact(table=fidelity_rows(report), key="fidelity",
                          description=f"Student vs teacher per node ({registered['model_name']} v{registered['version']})")
    create_markdown_artifact(key="registered-student", markdown=_links(registered))
    logger.info("registered %s v%s (champion: %s)", registered["model_name"], registered["version"],
                registered["promoted"])
    return result


def _train(spec: Spec, params: dict) -> dict:
    """In-process by default; on the deployment named by ``spec.training.deployment`` if set."""
    deployment = spec.training.deployment
    if not deployment:
        return train_flow(**params)
    from prefect.deployments import run_deployment

    params = {**params, "spec": spec.model_dump(mode="json")}
    run = run_deployment(deployment, parameters=params, timeout=None)
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"train deployment {deployment} ended {run.state.name if run.state else 'unknown'}")
    return run.state.result()


def forgetting_report(spec: Spec, champion: dict, trained: dict, traces: str) -> dict:
    """Fidelity of the champion and the new student on the old and the new held-out records."""
    from students.continual import split_increment
    from students.evaluate import evaluate_student
    from students.model import MultimodalStudent
    from students.report import headline_metrics
    from students.train import split_by_image
    from teachers.graph import TeacherGraph

    inc = split_increment(traces, TeacherGraph(spec).fingerprint, trained["traces_version"], champion["traces_version"])
    val = lambda recs: split_by_image(recs, spec.training.val_fraction)[1]  # noqa: E731
    old_val, new_val = val(inc.old), val(inc.new)
    new_model = MultimodalStudent.from_pretrained(trained["out_dir"])
    old_model = MultimodalStudent.from_pretrained(champion["dir"])
    out = {}
    for name, recs in (("old", old_val), ("new", new_val)):
        if recs:
            out[name] = {"student": headline_metrics(evaluate_student(new_model, recs)),
                         "champion": headline_metrics(evaluate_student(old_model, recs)), "n": len(recs)}
    if "old" in out:
        out["forgetting"] = {k: out["old"]["champion"][k] - v for k, v in out["old"]["student"].items()
                             if k in out["old"]["champion"]}
    return out


def _links(reg: dict) -> str:
    import mlflow

    uri = mlflow.get_tracking_uri()
    return (f"### Registered student\n\n- model: `models:/{reg['model_name']}/{reg['version']}`\n"
            f"- champion: **{reg['promoted']}** ({'; '.join(reg['reasons'])})\n- MLflow run: `{reg['run_id']}` "
            f"in `{uri}` (open with `mlflow ui --backend-store-uri {uri}`)\n"
            f"- pull: `distillery pull {reg['model_name']}/{reg['version']} --to ./student`\n")
