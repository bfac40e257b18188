"""Deployments of the flows for `distillery serve` (embedded: this process runs them).

For a team stack with work pools, ``prefect.yaml`` at the repository root declares the same
deployments for ``prefect deploy --all`` (the train step on the ``gpu`` pool).
"""

from __future__ import annotations

from pathlib import Path

from distillery.flows.spec import Spec
from distillery.teachers.base import node_form_schema

DEFAULT_CRON = "0 3 * * *"  # nightly: new data -> new student


def build_deployments(spec: Spec, inputs: str, traces: str, workdir: str, cron: str = DEFAULT_CRON,
                      eval_inputs: str | None = None) -> list:
    """``distill/manual`` (for the UI), ``distill/recurring`` (cron, warm-started), ``train/local``."""
    from distillery.flows.distill import distill_flow
    from distillery.flows.train import train_flow

    params = {"spec": spec.model_dump(mode="json"), "inputs": inputs, "traces": traces,
              "workdir": workdir, "eval_inputs": eval_inputs}
    deployments = [
        distill_flow.to_deployment(name="manual", parameters=params, tags=["distillery", spec.name],
                                   description="Record, train, evaluate, register and promote (run from the UI)."),
        distill_flow.to_deployment(name="recurring", parameters={**params, "warm_start": True}, cron=cron,
                                   tags=["distillery", spec.name, "recurring"],
                                   description="Scheduled continual distillation: new inputs, warm start, replay."),
        train_flow.to_deployment(name="local", tags=["distillery", spec.name],
                                 parameters={"spec": params["spec"], "traces": traces,
                                             "out_dir": str(Path(workdir) / "students" / "manual")},
                                 description="Train the student on a trace-store version."),
    ]
    # The Run form: each of this spec's teacher nodes as a group of fields, not one JSON editor
    # (Prefect's form draws an object's `properties`, never a mapping's `additionalProperties`).
    # `to_deployment` takes no schema, so the built one is edited (a private attribute of Prefect's
    # RunnerDeployment; tests/browser/test_ui_prefect.py sees the fields in the UI).
    for deployment in deployments:
        definitions = deployment._parameter_openapi_schema.definitions
        definitions["Spec"]["properties"]["teachers"] = node_form_schema(
            definitions["Spec"]["properties"]["teachers"], spec.teachers)
    return deployments
