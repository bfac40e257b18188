"""The train flow: distill a trace-store version into a student (in-process or on a GPU pool).

The distill flow calls ``train_flow`` directly (in-process, the embedded default) or, when
``spec.training.deployment`` names a deployment (e.g. ``train/gpu`` on the ``gpu`` work pool),
through ``run_deployment`` so the step runs on a GPU worker. Paths must then be on storage both
workers see (``/data`` in the team stack): the flow's result is written as JSON into ``out_dir``
(``RESULT_FILE``, atomically) and the distill flow reads it from there with ``read_result``, so
nothing depends on Prefect result persistence. With ``mlflow_run_id`` the step logs into the
distillation's MLflow run: training params, per-epoch metrics, system metrics, loss curves.
(Training saves the spec beside the student, ``students.training.train.SPEC_FILE``: it travels
with the registered model, so ``distillery eval`` knows the teacher graph of a student folder or a
pulled one.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from distillery.flows.spec import Spec

RESULT_FILE = "train_result.json"  # the flow's return value, beside the student


@flow(name="train", log_prints=True)
def train_flow(spec: Spec, traces: str, out_dir: str, version: int | None = None,
               init_from: str | None = None, since_version: int | None = None,
               mlflow_run_id: str | None = None, tracking_uri: str | None = None, progress: bool = True,
               nproc_per_node: int | None = None, on_policy: bool | None = None) -> dict:
    """Train the student on ``traces`` (``URI`` or ``URI@VERSION``) and save it in ``out_dir``.

    Args:
        spec: the distillation spec (student and training settings).
        traces: trace store URI, optionally ``@VERSION``.
        out_dir: where the student folder is written (safetensors + config + tokenizer), and
            ``train_result.json`` (this flow's result).
        version: trace-store version to read (default: latest; the one read is recorded).
        init_from: a student folder to warm-start from (continual distillation).
        since_version: train on records added after this version, plus a replay sample of older ones.
        mlflow_run_id: the distillation's MLflow run to log training into (None: no MLflow).
        tracking_uri: the MLflow store of that run (None: $MLFLOW_TRACKING_URI / already set).
        progress: draw the progress bar (on a terminal) and print each epoch's table of losses.
        nproc_per_node: training processes on this machine (one per GPU; default: the spec's
            ``training.nproc_per_node``); above 1 the step runs as a torchrun process group.
        on_policy: run the on-policy rounds (``training.on_policy``) after the offline epochs
            (None: as the spec says).
    """
    spec = with_on_policy(spec, on_policy)
    if nproc_per_node is not None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"nproc_per_node": nproc_per_node})})
    params = {"traces": traces, "out_dir": out_dir, "version": version, "init_from": init_from,
              "since_version": since_version, "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri,
              "progress": progress, "flow_run_id": str(runtime.flow_run.id or "")}
    progress_id = create_progress_artifact(progress=0.0, key="train-progress", description="Training steps (%)")
    if spec.training.launched:
        from distillery.flows.launch import launch

        get_run_logger().info("training on %s process(es) per node, %s node(s), through torchrun",
                              spec.training.nproc_per_node, spec.training.nnodes)
        launch(spec, params)
        summary = read_result(out_dir)
    else:
        shown = [0]  # last whole percent sent to the API (one call per percent, not per step)

        def on_event(event: dict) -> None:  # move the progress bar
            total = event.get("total_steps") or 0
            if total and "step" in event and int(100 * event["step"] / total) > shown[0]:
                shown[0] = int(100 * event["step"] / total)
                update_progress_artifact(progress_id, float(shown[0]))

        summary = run_training(spec, **params, on_event=on_event)
    update_progress_artifact(progress_id, 100.0)
    return summary


def with_on_policy(spec: Spec, enabled: bool | None) -> Spec:
    """The spec with ``training.on_policy.enabled`` set (None: unchanged)."""
    if enabled is None or enabled == spec.training.on_policy.enabled:
        return spec
    on_policy = spec.training.on_policy.model_copy(update={"enabled": enabled})
    return spec.model_copy(update={"training": spec.training.model_copy(update={"on_policy": on_policy})})


def run_training(spec: Spec, traces: str, out_dir: str, version: int | None = None, init_from: str | None = None,
                 since_version: int | None = None, mlflow_run_id: str | None = None,
                 tracking_uri: str | None = None, progress: bool = True, resume: bool = False,
                 flow_run_id: str = "", on_event=None) -> dict:
    """The train step as a plain function, the same in one process and in every torchrun process:
    the continual selection, ``students.training.train.train`` and, on rank 0, MLflow logging and
    ``train_result.json``. Returns the step's summary."""
    from contextlib import nullcontext

    from distillery.registry.tracking import training_run
    from distillery.students.training.train import train

    rank0 = int(os.environ.get("RANK", "0")) == 0
    replay, only_new = continual_selection(spec, traces, version, since_version)
    logging = training_run(spec, mlflow_run_id, tracking_uri) if rank0 else nullcontext(lambda event: None)
    with logging as log_epoch:
        def callback(event: dict) -> None:  # every trainer event (rank 0): progress, MLflow
            if on_event is not None:
                on_event(event)
            log_epoch(event)

        result = train(spec, traces, version, out_dir, init_from=init_from, replay=replay, only_ids=only_new,
                       progress=progress, callback=callback, resume=resume)
    summary = {"out_dir": str(result.out_dir), "traces_uri": result.traces_uri,
               "traces_version": result.traces_version, "metrics": result.metrics, "history": result.history,
               "lineage": result.lineage, "seconds": result.seconds,
               "flow_run_id": flow_run_id, "mlflow_run_id": mlflow_run_id}
    if rank0:
        write_result(result.out_dir, summary)
    return summary


def continual_selection(spec: Spec, traces: str, version: int | None, since_version: int | None):
    """(replay sample, ids of the new records) for a continual run; (None, None) otherwise."""
    if since_version is None:
        return None, None
    from distillery.students.training.continual import replay_sample, split_increment
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.store import parse_traces_ref

    uri, ref_version = parse_traces_ref(traces)
    inc = split_increment(uri, TeacherGraph(spec.teachers).fingerprint, version or ref_version, since_version)
    replay = replay_sample(inc.old, len(inc.new), spec.training.replay_fraction, spec.training.seed)
    _logger().info("continual: %d new records since v%s, %d replayed", len(inc.new), since_version, len(replay))
    return replay, {r.input_id for r in inc.new}


def _logger():
    """The flow run's logger, or a plain one in a torchrun process (no Prefect run there)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("distillery.train")


def write_result(out_dir: str | Path, result: dict) -> Path:
    """The flow's result as ``out_dir/train_result.json`` (tmp + rename: never half-written)."""
    from distillery.students.training.train import write_json

    path = Path(out_dir) / RESULT_FILE
    write_json(path, result)
    return path


def read_result(out_dir: str | Path, flow_run_id: str | None = None) -> dict:
    """The result a train flow run wrote into ``out_dir``; with ``flow_run_id``, refuse a file
    left there by another run (e.g. an earlier, failed attempt)."""
    path = Path(out_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the train step wrote no result (is {out_dir} on storage both "
                                "workers see?)")
    result = json.loads(path.read_text())
    if flow_run_id is not None and result.get("flow_run_id") != str(flow_run_id):
        raise RuntimeError(f"{path} was written by flow run {result.get('flow_run_id')}, not {flow_run_id}")
    return result


def worker_main(argv: list[str]) -> int:
    """One torchrun process (``python -m distillery.flows.train PARAMS.json``, started by
    ``flows.launch.launch``): dies with its torchrun agent, then ``run_training``."""
    from distillery import runtime as dr
    from distillery.flows.launch import worker_params
    from distillery.prefect_server import die_with

    die_with(os.getppid())()  # the agent's workers run in sessions of their own: don't outlive it
    dr.configure()
    spec, params = worker_params(argv[0])
    run_training(spec, **params)
    return 0


if __name__ == "__main__":  # a torchrun process
    import sys

    sys.exit(worker_main(sys.argv[1:]))
