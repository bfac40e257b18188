"""The train flow: distill a trace-store version into a student (in-process or on a GPU pool).

The distill flow calls ``train_flow`` directly (in-process, the embedded default) or, when
``spec.training.deployment`` names a deployment (e.g. ``train/gpu`` on the ``gpu`` work pool),
through ``run_deployment`` so the step runs on a GPU worker. Paths must then be on storage both
workers see.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from distillery.spec import Spec


@flow(name="train", log_prints=True)
def train_flow(spec: Spec, traces: str, out_dir: str, version: int | None = None,
               init_from: str | None = None, since_version: int | None = None) -> dict:
    """Train the student on ``traces`` (``URI`` or ``URI@VERSION``) and save it in ``out_dir``.

    Args:
        spec: the distillation spec (student and training settings).
        traces: trace store URI, optionally ``@VERSION``.
        out_dir: where the student folder is written (safetensors + config + tokenizer).
        version: trace-store version to read (default: latest; the one read is recorded).
        init_from: a student folder to warm-start from (continual distillation).
        since_version: train on records added after this version, plus a replay sample of older ones.
    """
    from students.continual import replay_sample, split_increment
    from students.train import train
    from teachers.graph import TeacherGraph
    from teachers.store import parse_traces_ref

    logger = get_run_logger()
    replay, only_new = None, None
    if since_version is not None:
        uri, ref_version = parse_traces_ref(traces)
        inc = split_increment(uri, TeacherGraph(spec).fingerprint, version or ref_version, since_version)
        only_new = {r.input_id for r in inc.new}
        replay = replay_sample(inc.old, len(inc.new), spec.training.replay_fraction, spec.training.seed)
        logger.info("continual: %d new records since v%s, %d replayed", len(inc.new), since_version, len(replay))
    progress_id = create_progress_artifact(progress=0.0, key="train-progress", description="Training steps (%)")

    def on_event(event: dict) -> None:
        total = event.get("total_steps") or 0
        if total and "step" in event:
            update_progress_artifact(progress_id, 100.0 * event["step"] / total)

    result = train(spec, traces, version, out_dir, init_from=init_from, replay=replay, only_ids=only_new,
                   progress=False, callback=on_event)
    update_progress_artifact(progress_id, 100.0)
    return {"out_dir": str(result.out_dir), "traces_uri": result.traces_uri,
            "traces_version": result.traces_version, "metrics": result.metrics, "history": result.history,
            "lineage": result.lineage, "seconds": result.seconds}
