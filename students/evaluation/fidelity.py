"""How good a student is: vs its teachers, vs the ground truth, and what it keeps of the teachers.

    report = evaluate_model("out/student", spec, records, ground_truth)
    report["student_vs_teacher"]  # {node: {metric: v, "n"}}: agreement with the teacher graph
    report["student_vs_truth"]    # the same metrics against the ground truth ...
    report["teacher_vs_truth"]    # ... for the teacher graph's own outputs (the records')
    report["retained"]            # student_vs_truth / teacher_vs_truth, per node and metric
    report["by_type"]             # answer exact match per question type (when types are known)

``run_eval`` does it for a registered model (or a student folder) on a split of the demo world:
``distillery eval MODEL_URI --split test``. ``log_evaluation`` sends a report to MLflow (metrics,
a per-node bar chart, ``evaluation.json``); ``publish_table`` makes it a Prefect table artifact.
The metric functions are those of ``students.evaluate`` (torchmetrics mAP, pycocotools IoU).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

from distillery.students.evaluation.metrics import (answer_agreement, as_predictor, compare_outputs, evaluate_against_truth,
                               predict_records, retained, teacher_text_kl)
from distillery.students.evaluation.report import flat_metrics, headline_metrics

COMPARISONS = ("student_vs_teacher", "student_vs_truth", "teacher_vs_truth")


# ---------------------------------------------------------------------------------------------
# The student and the graph's nodes
# ---------------------------------------------------------------------------------------------

def load_predictor(model: Any, device: str = "cpu"):
    """A StudentPredictor from a predictor/model object, a student folder (trained or pulled), or
    a registry reference (``NAME``, ``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...``)."""
    from distillery.registry.pull import pull, student_dir
    from distillery.students.serving.predictor import StudentPredictor

    if not isinstance(model, (str, Path)):
        return as_predictor(model)
    if Path(model).is_dir():
        return StudentPredictor.load(student_dir(model), device=device)
    with tempfile.TemporaryDirectory(prefix="distillery-eval-") as tmp:
        folder = pull(str(model), Path(tmp) / "pulled")
        return StudentPredictor.load(student_dir(folder), device=device)


def nodes_of_type(spec, kind: str) -> list[str]:
    """The spec's teacher nodes of one type (``yolo`` | ``rag`` | ``llm``), in topological order."""
    return [n for n in spec.topological_order() if spec.teachers[n].type == kind]


def retrieval_k(spec) -> dict[str, int]:
    return {n: int(getattr(spec.teachers[n], "top_k", 5)) for n in nodes_of_type(spec, "rag")}


# ---------------------------------------------------------------------------------------------
# Ground truth of the demo world
# ---------------------------------------------------------------------------------------------

def truth_outputs(spec, image: dict, request: dict) -> dict[str, dict]:
    """Teacher-shaped truth for one demo request: boxes (normalized xyxy), classes and masks for
    each yolo node; the needed documents for each rag node; the answer for the final llm node."""
    objects = image["objects"]
    det = {"boxes": [o["box_norm"] for o in objects], "classes": [o["class_id"] for o in objects],
           "masks": [o["mask"] for o in objects]}
    out: dict[str, dict] = {n: det for n in nodes_of_type(spec, "yolo")}
    out |= {n: {"ids": list(request["needed_docs"])} for n in nodes_of_type(spec, "rag")}
    llm = nodes_of_type(spec, "llm")
    if llm:
        out[llm[-1]] = {"answer": request["answer"]}
    return out


def image_key(path: str | Path) -> str:
    """``images/00012.png`` from a record's image path or an annotation's file."""
    return "/".join(Path(path).parts[-2:])


def demo_ground_truth(spec, world, split: str, records: Sequence) -> tuple[list[dict | None], list[str | None]]:
    """Per record: its truth (``truth_outputs``) and question type, matched on image + question;
    None for a record that is not one of the split's requests."""
    ann = world.annotations(split)
    images = {image_key(im["file"]): im for im in ann["images"]}
    requests = {(image_key(r["image"]), r["question"]): r for r in ann["requests"]}
    truth, types = [], []
    for rec in records:
        req = requests.get((image_key(rec.image_path), rec.question))
        truth.append(None if req is None else truth_outputs(spec, images[image_key(req["image"])], req))
        types.append(None if req is None else req["type"])
    return truth, types


# ---------------------------------------------------------------------------------------------
# Evaluating
# ---------------------------------------------------------------------------------------------

def by_question_type(types: Sequence[str | None], student: Sequence[str], teacher: Sequence[str],
                     truth: Sequence[str | None] | None = None) -> dict[str, dict[str, float]]:
    """Answer exact match per question type: student vs teacher (and each vs truth if given)."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        if t is not None:
            groups.setdefault(t, []).append(i)
    out = {}
    for t, idx in sorted(groups.items()):
        row = {"student_vs_teacher": answer_agreement([student[i] for i in idx], [teacher[i] for i in idx])}
        known = [i for i in idx if truth is not None and truth[i] is not None]
        if known:
            row["student_vs_truth"] = answer_agreement([student[i] for i in known], [truth[i] for i in known])
            row["teacher_vs_truth"] = answer_agreement([teacher[i] for i in known], [truth[i] for i in known])
        out[t] = row | {"n": len(idx)}
    return out


def _answers(outputs: Sequence[dict], node: str) -> list[str]:
    return [str((o.get(node) or {}).get("answer", "")) for o in outputs]


def evaluate_model(model_ref_or_dir: Any, spec, records: Sequence, ground_truth: Sequence[dict | None] | None = None,
                   *, types: Sequence[str | None] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Student vs teacher per node (+ token KL on the teacher's text); with ``ground_truth``
    (aligned with ``records``; None where unknown) the same metrics vs truth for the student and
    the teacher side by side, and ``retained``; with ``types`` the answers per question type."""
    if ground_truth is not None and len(ground_truth) != len(records):
        raise ValueError(f"evaluate_model: {len(ground_truth)} ground truths for {len(records)} records "
                         "(align them with the records, None where unknown)")
    keep = [i for i, r in enumerate(records) if r.status == "ok"]  # quarantined: no teacher output
    if not keep:
        raise ValueError("evaluate_model: no usable (status ok) records to evaluate on")
    records = [records[i] for i in keep]
    ground_truth = None if ground_truth is None else [ground_truth[i] for i in keep]
    types = None if types is None else [types[i] for i in keep]
    predictor = load_predictor(model_ref_or_dir)
    nodes = [n for n in spec.topological_order() if n in predictor.model.schema.nodes]
    preds = predict_records(predictor, records, batch_size)
    report = evaluate_predictions(spec, records, preds, ground_truth, types=types, nodes=nodes)
    for node, kl in teacher_text_kl(predictor.model, records, batch_size).items():
        report["student_vs_teacher"].setdefault(node, {})["token_kl"] = kl
    report["headline"] = headline_metrics(report["student_vs_teacher"])
    return report


def evaluate_predictions(spec, records: Sequence, preds: Sequence[dict], ground_truth: Sequence[dict | None] | None = None,
                         *, types: Sequence[str | None] | None = None, nodes: Sequence[str] | None = None
                         ) -> dict[str, Any]:
    """``evaluate_model`` on given student outputs (``preds[i]``: node -> output for records[i])."""
    if len(preds) != len(records):
        raise ValueError(f"evaluate_predictions: {len(preds)} predictions for {len(records)} records")
    if ground_truth is not None and len(ground_truth) != len(records):
        raise ValueError(f"evaluate_predictions: {len(ground_truth)} ground truths for {len(records)} records")
    nodes = list(nodes) if nodes is not None else spec.topological_order()
    teacher = [r.outputs for r in records]
    ks = retrieval_k(spec)
    report: dict[str, Any] = {"n_records": len(records), "nodes": nodes,
                              "student_vs_teacher": compare_outputs(preds, teacher, nodes, k=ks)}
    if ground_truth is not None:
        known = [i for i, t in enumerate(ground_truth) if t is not None]
        truth = [ground_truth[i] for i in known]
        report["student_vs_truth"] = evaluate_against_truth([preds[i] for i in known], truth, k=ks)
        report["teacher_vs_truth"] = evaluate_against_truth([teacher[i] for i in known], truth, k=ks)
        report["retained"] = retained(report["student_vs_truth"], report["teacher_vs_truth"])
    llm = [n for n in nodes if spec.teachers[n].type == "llm"]
    if types is not None and llm:
        truth_answers = None if ground_truth is None else [
            None if t is None or llm[-1] not in t else t[llm[-1]]["answer"] for t in ground_truth]
        report["by_type"] = by_question_type(types, _answers(preds, llm[-1]), _answers(teacher, llm[-1]),
                                             truth_answers)
    report["headline"] = headline_metrics(report["student_vs_teacher"])
    return report


# ---------------------------------------------------------------------------------------------
# Showing: rows, a rich table, MLflow, Prefect
# ---------------------------------------------------------------------------------------------

def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (node, metric): student vs teacher, student vs truth, teacher vs truth, retained."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for comp in (*COMPARISONS, "retained"):
        for node, metrics in report.get(comp, {}).items():
            for metric, v in metrics.items():
                if metric != "n":
                    rows.setdefault((node, metric), {"node": node, "metric": metric})[comp] = round(float(v), 4)
    return list(rows.values())


def print_table(report: dict[str, Any], title: str = "student evaluation") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} ({report.get('n_records', '?')} records)")
    cols = ("node", "metric", *COMPARISONS, "retained")
    for c in cols:
        table.add_column(c.replace("_", " "), justify="left" if c in ("node", "metric") else "right")
    for row in report_rows(report):
        table.add_row(*[str(row.get(c, "")) for c in cols])
    console = Console()
    console.print(table)
    if report.get("by_type"):
        t = Table(title="answer exact match by question type")
        for c in ("type", *COMPARISONS, "n"):
            t.add_column(c.replace("_", " "), justify="left" if c == "type" else "right")
        for qtype, row in report["by_type"].items():
            t.add_row(qtype, *[f"{row[c]:.3f}" if c in row else "" for c in COMPARISONS], str(row["n"]))
        console.print(t)


def bar_chart(report: dict[str, Any]):
    """A matplotlib figure: per node, its first metric for teacher (vs truth), student (vs
    truth) and student vs teacher, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    nodes = list(report["student_vs_teacher"])
    series = {"teacher vs truth": report.get("teacher_vs_truth", {}), "student vs truth": report.get("student_vs_truth", {}),
              "student vs teacher": report["student_vs_teacher"]}
    first = {n: next((m for m in report["student_vs_teacher"][n] if m not in ("n", "token_kl")), None) for n in nodes}
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(nodes), 3.6))
    x = np.arange(len(nodes))
    for j, (label, data) in enumerate(series.items()):
        vals = [float(data.get(n, {}).get(first[n], np.nan)) if first[n] else np.nan for n in nodes]
        ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=label)
    ax.set_xticks(x, [f"{n}\n{first[n] or ''}" for n in nodes])
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("fidelity per node")
    fig.tight_layout()
    return fig


def log_evaluation(report: dict[str, Any], run_id: str | None = None, prefix: str = "eval") -> str:
    """Metrics (``eval.student_vs_teacher.<node>.<metric>`` ...), a bar chart and
    ``evaluation.json`` into MLflow: the given run, the active one, or a new run. Returns its id."""
    import mlflow

    from distillery.registry.models import use_store

    active = mlflow.active_run()
    if run_id is None and active is not None:
        run_id = active.info.run_id
    if run_id is None:
        use_store()
    with mlflow.start_run(run_id=run_id, nested=active is not None and run_id != active.info.run_id) as run:
        metrics = {}
        for comp in (*COMPARISONS, "retained"):
            metrics |= flat_metrics(report.get(comp, {}), prefix=f"{prefix}.{comp}")
        metrics |= flat_metrics({t: {k: v for k, v in row.items() if k != "n"}
                                 for t, row in report.get("by_type", {}).items()}, prefix=f"{prefix}.by_type")
        mlflow.log_metrics(metrics)  # names already valid (recall@k -> recall_at_k)
        fig = bar_chart(report)
        mlflow.log_figure(fig, f"{prefix}/fidelity_per_node.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        mlflow.log_dict(report, f"{prefix}/evaluation.json")
        return run.info.run_id


def publish_table(report: dict[str, Any], key: str = "student-evaluation") -> Any:
    """A Prefect table artifact of ``report_rows`` when called inside a flow or task run; else None."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    from prefect.artifacts import create_table_artifact

    return create_table_artifact(table=report_rows(report), key=key,
                                 description=f"Student fidelity per node on {report.get('n_records')} records")


# ---------------------------------------------------------------------------------------------
# distillery eval
# ---------------------------------------------------------------------------------------------

def demo_setup(workdir: Path, preset: str, seed: int | None = None):
    """The demo world (``seed``: a fresh one) and its teachers under ``workdir``; (world, spec)."""
    import json

    from distillery.demo.pipeline import write_spec
    from distillery.demo.teachers import ensure_teachers
    from distillery.demo.world import WorldConfig, build_world
    from distillery.flows.spec import load_spec

    report = workdir / "report.json"
    if seed is None and report.exists() and json.loads(report.read_text()).get("preset") not in (None, preset):
        raise ValueError(f"{workdir} holds a demo of another preset; pass --preset "
                         f"{json.loads(report.read_text())['preset']} or another --workdir")
    cfg = WorldConfig.preset(preset) if seed is None else WorldConfig.preset(preset, seed=seed)
    world = build_world(cfg, workdir / ("world" if seed is None else f"world-seed{seed}"))
    base_world = world if seed is None else build_world(WorldConfig.preset(preset), workdir / "world")
    teachers = ensure_teachers(base_world, preset, workdir / "teachers")
    name = "spec.yaml" if seed is None else f"spec-seed{seed}.yaml"
    spec_path = write_spec(workdir / name, f"shapes-{preset}", teachers.yolo_weights, world.kb_path,
                           teachers.llm_dir, preset)
    return world, load_spec(spec_path)


def record_split(spec, world, split: str, traces: Path) -> list:
    """The split's teacher records (recorded now unless the store already holds them)."""
    from distillery.teachers.record import record
    from distillery.teachers.store import TraceStore

    summary = record(spec, str(world.split_dir(split)), str(traces))
    return TraceStore(str(traces)).read(fingerprint=summary.fingerprint, status="ok")


def run_eval(model_uri: str, split: str = "test", workdir: Path | None = None, preset: str = "full",
             seed: int | None = None, log: bool = False) -> dict[str, Any]:
    """Evaluate a registered model (or a student folder) on a split of the demo world; print a
    table and return the report. ``workdir`` (default: the demo's) keeps the world, teachers and
    traces, so a run after ``distillery demo`` reuses them; ``seed``: a fresh world instead."""
    from distillery.demo.pipeline import default_workdir
    from distillery import runtime
    from distillery.registry.models import use_store

    runtime.configure()
    workdir = Path(workdir or default_workdir()).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    world, spec = demo_setup(workdir, preset, seed)
    use_store(spec.registry.resolve_tracking_uri(workdir / "runs"))  # the demo's registry
    tag = split if seed is None else f"seed{seed}-{split}"
    records = record_split(spec, world, split, workdir / f"traces-{tag}.lance")
    truth, types = demo_ground_truth(spec, world, split, records)
    report = evaluate_model(model_uri, spec, records, truth, types=types)
    report |= {"model": str(model_uri), "split": split, "preset": preset, "seed": world.config.seed}
    print_table(report, title=f"{model_uri} on {preset} world (seed {world.config.seed}), split {split}")
    if log:
        report["mlflow_run_id"] = log_evaluation(report)
    return report
