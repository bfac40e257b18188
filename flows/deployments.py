"""Deployments of the flows for `distillery serve` (embedded: this process runs them).

For a team stack with work pools, ``prefect.yaml`` at the repository root declares the same
deployments for ``prefect deploy --all`` (the train step on the ``gpu`` pool).
"""

from __future__ import annotations

from pathlib import Path

from distillery.flows.spec import Spec

DEFAULT_CRON = "0 3 * * *"  # nightly: new data -> new student


def build_deployments(spec: Spec, inputs: str, traces: str, workdir: str, cron: str = DEFAULT_CRON,
                      eval_inputs: str | None = None) -> list:
    """``distill/manual`` (for the UI), ``distill/recurring`` (cron, warm-started), ``train/local``."""
    from distillery.flows.distill import distill_flow
    from distillery.flows.train import train_flow

    params = {"spec": spec.model_dump(mode="json"), "inputs": inputs, "traces": traces,
              "workdir": workdir, "eval_inputs": eval_inputs}
    return [
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
