"""The distill flow's Prefect artifacts: plain row and text builders (tested without Prefect) and
the few lines that publish them.

* ``fidelity`` (table): the evaluation report, one row per node and metric (``fidelity.report_rows``);
* ``forgetting`` (table): a continual run's champion vs new student on the old and new sets;
* ``registered-student`` (markdown, local MLflow store) or ``mlflow-run`` + ``registered-version``
  (links, tracking server): where the registered student and its run are.

Each ``publish_*`` does nothing (returns None) outside a Prefect flow or task run.
"""

from __future__ import annotations

from typing import Any, Mapping

import mlflow

FORGETTING_CHANGE = "forgetting (old set: champion - student)"


def in_prefect_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (artifacts need one)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


# -- rows and texts --------------------------------------------------------------------------------
def forgetting_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per headline metric: champion and student on the old and the new held-out sets
    (None where not measured) and the forgetting (> 0: the student lost ground on the old set)."""
    parts = {part: report.get(part) or {} for part in ("old", "new")}
    metrics = sorted({k for part in parts.values() for k in part.get("student", {})})
    rows = []
    for metric in metrics:
        row: dict[str, Any] = {"metric": metric}
        for part, data in parts.items():
            for who in ("champion", "student"):
                value = data.get(who, {}).get(metric)
                row[f"{part} set: {who}"] = None if value is None else round(value, 4)
        change = (report.get("forgetting") or {}).get(metric)
        row[FORGETTING_CHANGE] = None if change is None else round(change, 4)
        rows.append(row)
    return rows


def registration_markdown(reg: Mapping[str, Any], tracking_uri: str) -> str:
    """Where a registered student is, for a local store: its URI, the promotion decision, the
    run, and the commands that open the UI and pull it."""
    name, version, run_id = reg["model_name"], reg["version"], reg.get("run_id")
    return (f"### Registered student\n\n- model: `models:/{name}/{version}`\n"
            f"- champion: **{reg['promoted']}** ({'; '.join(reg['reasons'])})\n- MLflow run: `{run_id}` "
            f"in `{tracking_uri}` (open with `mlflow ui --backend-store-uri {tracking_uri}`)\n"
            f"- pull: `distillery pull {name}/{version} --to ./student`\n")


def registration_links(reg: Mapping[str, Any], server: str, experiment_id: str | None) -> list[dict[str, str]]:
    """Link artifacts (key, link, link_text, description) to the run (when ``experiment_id`` is
    known) and the registered version on an MLflow tracking server."""
    base, name, version, run_id = server.rstrip("/"), reg["model_name"], reg["version"], reg.get("run_id")
    links = []
    if run_id and experiment_id is not None:
        links.append({"key": "mlflow-run", "link": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
                      "link_text": f"MLflow run {run_id}", "description": "The distillation's MLflow run"})
    links.append({"key": "registered-version", "link": f"{base}/#/models/{name}/versions/{version}",
                  "link_text": f"{name} v{version}", "description": f"champion: {reg['promoted']}"})
    return links


# -- publishing ------------------------------------------------------------------------------------
def publish_fidelity(report: Mapping[str, Any], key: str = "fidelity") -> Any:
    """The evaluation report as a table artifact (``fidelity.report_rows``)."""
    if not in_prefect_run():
        return None
    from prefect.artifacts import create_table_artifact

    from distillery.students.evaluation.fidelity import report_rows

    return create_table_artifact(table=report_rows(dict(report)), key=key,
                                 description=f"Student fidelity per node on {report.get('n_records')} records")


def publish_forgetting(report: Mapping[str, Any]) -> Any:
    """The forgetting report as a table artifact (``forgetting_rows``)."""
    if not in_prefect_run():
        return None
    from prefect.artifacts import create_table_artifact

    return create_table_artifact(table=forgetting_rows(report), key="forgetting", description=(
        "Continual run: fidelity on the old and new held-out sets, champion vs new student "
        "(forgetting > 0: the student lost ground)"))


def publish_links(reg: Mapping[str, Any]) -> None:
    """Links to the MLflow run and the registered version (markdown when the store is local)."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        create_markdown_artifact(key="registered-student", markdown=registration_markdown(reg, uri))
        return
    run_id = reg.get("run_id")
    experiment_id = mlflow.get_run(run_id).info.experiment_id if run_id else None
    for link in registration_links(reg, uri, experiment_id):
        create_link_artifact(**link)
