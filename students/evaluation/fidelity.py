"""How good a student is: vs its teachers, vs the ground truth, and what it keeps of the teachers.

    report = evaluate_inputs("out/student", "held-out/", "held-out.lance", spec)
    report["student_vs_teacher"]  # {node: {metric: v, "n"}}: agreement with the teacher graph
    report["student_vs_truth"]    # the same metrics against the inputs' labels (truth.py) ...
    report["teacher_vs_truth"]    # ... for the teacher graph's own outputs (the records')
    report["retained"]            # student_vs_truth / teacher_vs_truth, per node and metric
    report["by_type"]             # answer exact match per question type (when types are known)
    report["labels"]              # how much truth there was, and what was left out of it

``evaluate_inputs`` evaluates a student folder on a held-out inputs folder (its labels read by
``truth.read_labels``) from the trace store of those inputs, recording missing traces when a spec
is given; ``evaluate_model`` / ``evaluate_predictions`` do it on given records and truth. A
"graph" here is a spec or a student's schema (``truth.node_types``). The metric functions are
those of ``metrics`` (torchmetrics mAP, pycocotools IoU). Logging a report to MLflow is
``registry.tracking.log_evaluation``; a Prefect table of it is ``flows.artifacts``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

from distillery.students.evaluation.metrics import (answer_agreement, as_predictor, compare_outputs,
                                                    evaluate_against_truth, predict_records, retained,
                                                    teacher_text_kl)
from distillery.students.evaluation.report import headline_metrics
from distillery.students.model.heads import head_class
from distillery.students.model.scores import who_is_right
from distillery.students.evaluation.truth import Labels, align, node_types, read_labels
from distillery.students.serving.folder import student_dir
from distillery.students.serving.predictor import StudentPredictor

COMPARISONS = ("student_vs_teacher", "student_vs_truth", "teacher_vs_truth")


# ---------------------------------------------------------------------------------------------
# The student and the graph's nodes
# ---------------------------------------------------------------------------------------------

def load_predictor(model: Any, device: str = "cpu"):
    """A StudentPredictor from a predictor or model object, or a student folder (trained or
    pulled; a registry reference is ``registry.pull.load_predictor``)."""
    if not isinstance(model, (str, Path)):
        return as_predictor(model)
    return StudentPredictor.load(student_dir(model), device=device)


def read_schema(folder: str | Path):
    """The student's schema (its graph's nodes, class names, documents) from its config.json,
    without loading the model."""
    from distillery.students.model.schema import StudentSchema

    config = json.loads((student_dir(folder) / "config.json").read_text())
    return StudentSchema.from_dict(config["schema"])


def class_names(schema) -> dict[str, list[str]]:
    """Per yolo node of a student schema: its class names by class id."""
    return {n: list(node.get("class_names") or []) for n, node in schema.nodes.items() if node["type"] == "yolo"}


def nodes_of_type(graph, kind: str) -> list[str]:
    """The graph's nodes of one type (``yolo`` | ``rag`` | ``llm``), in topological order."""
    return [n for n, k in node_types(graph).items() if k == kind]


def retrieval_k(graph) -> dict[str, int]:
    """recall@k of each rag node: its own top_k (spec or schema)."""
    if hasattr(graph, "teachers"):
        return {n: int(getattr(graph.teachers[n], "top_k", 5)) for n in nodes_of_type(graph, "rag")}
    return {n: int(graph.nodes[n].get("top_k", 5)) for n in nodes_of_type(graph, "rag")}


def question_openings(records: Sequence, words: int = 2) -> list[str | None]:
    """A stand-in question type where none is labelled: the question's first words ("how many")."""
    return [" ".join(r.question.lower().rstrip("?").split()[:words]) or None for r in records]


# ---------------------------------------------------------------------------------------------
# Evaluating
# ---------------------------------------------------------------------------------------------

def by_question_type(types: Sequence[str | None], student: Sequence[str], teacher: Sequence[str],
                     truth: Sequence[str | None] | None = None) -> dict[str, dict[str, float]]:
    """Answer exact match per question type: student vs teacher (and each vs truth if given, and
    student vs teacher over the answers the teacher got right: ``agreement_where_teacher_right``)."""
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
            where = who_is_right([student[i] for i in known], [teacher[i] for i in known],
                                 [truth[i] for i in known])["agreement_where_teacher_right"]
            if where == where:  # nan where the teacher got none of this type right: nothing to compare
                row["agreement_where_teacher_right"] = where
        out[t] = row | {"n": len(idx)}
    return out


def _answers(outputs: Sequence[dict], node: str) -> list[str]:
    return [str((o.get(node) or {}).get("answer", "")) for o in outputs]


def evaluate_model(model: Any, graph, records: Sequence, ground_truth: Sequence[dict | None] | None = None,
                   *, types: Sequence[str | None] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Student vs teacher per node (+ token KL on the teacher's text); with ``ground_truth``
    (aligned with ``records``; None where unknown) the same metrics vs truth for the student and
    the teacher side by side, and ``retained``; with ``types`` the answers per question type.
    ``model``: a predictor, a model or a student folder; ``graph``: a spec or a student schema."""
    if ground_truth is not None and len(ground_truth) != len(records):
        raise ValueError(f"evaluate_model: {len(ground_truth)} ground truths for {len(records)} records "
                         "(align them with the records, None where unknown)")
    keep = [i for i, r in enumerate(records) if r.status == "ok"]  # quarantined: no teacher output
    if not keep:
        raise ValueError("evaluate_model: no usable (status ok) records to evaluate on")
    records = [records[i] for i in keep]
    ground_truth = None if ground_truth is None else [ground_truth[i] for i in keep]
    types = None if types is None else [types[i] for i in keep]
    predictor = load_predictor(model)
    nodes = [n for n in node_types(graph) if n in predictor.model.schema.nodes]
    preds = predict_records(predictor, records, batch_size)
    report = evaluate_predictions(graph, records, preds, ground_truth, types=types, nodes=nodes)
    for node, kl in teacher_text_kl(predictor.model, records, batch_size).items():
        report["student_vs_teacher"].setdefault(node, {})["token_kl"] = kl
    report["headline"] = headline_metrics(report["student_vs_teacher"])
    return report


def masks_where_labelled(outputs: Sequence[dict], truth: Sequence[dict]) -> list[dict]:
    """``outputs`` without the masks of the detection nodes whose truth has none (boxes-only
    labels): their masks are not compared with the truth."""
    boxes = {n for t in truth for n, o in t.items() if "boxes" in o}
    unmasked = boxes - {n for t in truth for n, o in t.items() if "masks" in o}
    if not unmasked:
        return list(outputs)
    return [{n: {k: v for k, v in o.items() if k != "masks"} if n in unmasked and isinstance(o, dict) else o
             for n, o in out.items()} for out in outputs]


def evaluate_predictions(graph, records: Sequence, preds: Sequence[dict], ground_truth: Sequence[dict | None] | None = None,
                         *, types: Sequence[str | None] | None = None, nodes: Sequence[str] | None = None
                         ) -> dict[str, Any]:
    """``evaluate_model`` on given student outputs (``preds[i]``: node -> output for records[i])."""
    if len(preds) != len(records):
        raise ValueError(f"evaluate_predictions: {len(preds)} predictions for {len(records)} records")
    if ground_truth is not None and len(ground_truth) != len(records):
        raise ValueError(f"evaluate_predictions: {len(ground_truth)} ground truths for {len(records)} records")
    kinds = node_types(graph)
    nodes = list(nodes) if nodes is not None else list(kinds)
    teacher = [r.outputs for r in records]
    ks = retrieval_k(graph)
    report: dict[str, Any] = {"n_records": len(records), "nodes": nodes,
                              "student_vs_teacher": compare_outputs(preds, teacher, nodes, k=ks)}
    if ground_truth is not None:
        known = [i for i, t in enumerate(ground_truth) if t is not None]
        truth = [{n: o for n, o in ground_truth[i].items() if n in nodes} for i in known]
        for side, outputs in (("student_vs_truth", preds), ("teacher_vs_truth", teacher)):
            report[side] = evaluate_against_truth(masks_where_labelled([outputs[i] for i in known], truth),
                                                  truth, k=ks)
        report["retained"] = retained(report["student_vs_truth"], report["teacher_vs_truth"])
    llm = [n for n in nodes if head_class(kinds[n]).generative]  # the answering nodes (llm, openai)
    if llm:
        answers = {"student": _answers(preds, llm[-1]), "teacher": _answers(teacher, llm[-1])}
        truth_answers = None if ground_truth is None else [
            None if t is None or llm[-1] not in t else t[llm[-1]]["answer"] for t in ground_truth]
        known = [i for i, a in enumerate(truth_answers or []) if a is not None]
        if known:
            report["who_is_right"] = {llm[-1]: who_is_right(*([side[i] for i in known] for side in (
                answers["student"], answers["teacher"], truth_answers)))}
        if types is not None:
            report["by_type"] = by_question_type(types, answers["student"], answers["teacher"], truth_answers)
    report["headline"] = headline_metrics(report["student_vs_teacher"])
    return report


# ---------------------------------------------------------------------------------------------
# On a held-out inputs folder
# ---------------------------------------------------------------------------------------------

def graph_fingerprint(folder: str | Path, spec=None) -> str:
    """The teacher graph whose traces the student is evaluated on: the spec's, else the one the
    student was distilled from (its lineage.json)."""
    from distillery.teachers.graph import TeacherGraph

    lineage_file = student_dir(folder) / "lineage.json"
    lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
    if spec is not None:
        fingerprint = TeacherGraph(spec.teachers).fingerprint
        if lineage.get("graph_fingerprint") not in (None, fingerprint):
            warnings.warn(f"{folder} was distilled from teacher graph {lineage['graph_fingerprint']}; evaluating it "
                          f"on the traces of the spec's graph {fingerprint}", stacklevel=2)
        return fingerprint
    if not lineage.get("graph_fingerprint"):
        raise ValueError(f"{folder}: no lineage.json naming the teacher graph it was distilled from; "
                         "give the spec of that graph")
    return str(lineage["graph_fingerprint"])


def held_out_records(inputs: str | Path, traces: str, labels: Labels, fingerprint: str, spec=None) -> list:
    """The records of the inputs folder's requests in ``traces`` (teacher graph ``fingerprint``);
    with ``spec``, the inputs not yet in the store are recorded first (teachers load only then).
    ValueError naming the command that records them when some are missing."""
    from distillery.teachers.record import record
    from distillery.teachers.store import TraceStore, parse_traces_ref

    if not labels.requests:
        raise ValueError(f"inputs {inputs}: no requests.jsonl lines and no images to evaluate on")
    uri, version = parse_traces_ref(str(traces))
    if spec is not None and version is None:
        record(spec, str(inputs), uri)
    store = TraceStore(uri)
    found = store.read(version, fingerprint=fingerprint) if store.version is not None else []
    records, missing = labels.select(found)
    if missing:
        raise ValueError(f"trace store {traces}: {len(missing)} of the {len(labels.requests)} inputs of {inputs} "
                         f"(first: {missing[0].where}) have no trace of teacher graph {fingerprint}; record "
                         f"them first: distillery record SPEC --inputs {inputs} --traces {traces} (or give the spec "
                         "and they are recorded)")
    return [r for r in records if r.status == "ok"]


def evaluate_inputs(student: str | Path, inputs: str | Path, traces: str, spec=None, *,
                    batch_size: int = 16) -> dict[str, Any]:
    """A student folder on a held-out inputs folder: its labels (``truth.read_labels``: a bad
    label file is a ValueError before any model loads), the records of its requests in
    ``traces`` (``URI`` or ``URI@VERSION``; recorded first when ``spec`` is given and no version
    is pinned), then ``evaluate_model`` with the truth aligned to them. The graph is ``spec`` or
    the student's own schema; the detector's class names are the student's."""
    labels = read_labels(inputs)
    folder = student_dir(student)
    schema = read_schema(folder)
    fingerprint = graph_fingerprint(folder, spec)
    records = held_out_records(inputs, traces, labels, fingerprint, spec)
    graph = spec if spec is not None else schema
    truth = align(labels, graph, records, class_names(schema))
    report = evaluate_model(folder, graph, records, truth.outputs if any(truth.outputs) else None,
                            types=truth.types if any(truth.types) else None, batch_size=batch_size)
    return report | {"inputs": str(inputs), "traces": str(traces), "graph_fingerprint": fingerprint,
                     "labels": truth.summary()}


# ---------------------------------------------------------------------------------------------
# Showing: rows, a rich table, a bar chart
# ---------------------------------------------------------------------------------------------

def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (node, metric): student vs teacher, student vs truth, teacher vs truth, retained;
    and, where the answers have labels, the answer agreement over those the teacher got right."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for comp in (*COMPARISONS, "retained"):
        for node, metrics in report.get(comp, {}).items():
            for metric, v in metrics.items():
                if metric != "n":
                    rows.setdefault((node, metric), {"node": node, "metric": metric})[comp] = round(float(v), 4)
    for node, w in report.get("who_is_right", {}).items():  # the agreement that copies no teacher mistake
        if w["agreement_where_teacher_right"] == w["agreement_where_teacher_right"]:
            rows[(node, "where_teacher_right")] = {"node": node, "metric": "answer_em where the teacher is right",
                                                   "student_vs_teacher": round(w["agreement_where_teacher_right"], 4)}
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
        cols = (*COMPARISONS, "agreement_where_teacher_right")
        for c in ("type", *cols, "n"):
            t.add_column(c.replace("_", " "), justify="left" if c == "type" else "right")
        for qtype, row in report["by_type"].items():
            t.add_row(qtype, *[f"{row[c]:.3f}" if c in row else "" for c in cols], str(row["n"]))
        console.print(t)
    for node, w in report.get("who_is_right", {}).items():
        console.print(f"{node}: {who_is_right_sentence(w)}")


def who_is_right_sentence(w: dict[str, Any]) -> str:
    """``who_is_right``'s figures in one sentence."""
    return (f"{w['differ']} of {w['n']} answers differ from the teacher's; the truth sides with the student on "
            f"{w['student_right']}, the teacher on {w['teacher_right']}, neither on {w['both_wrong']}; agreement "
            f"where the teacher is right {w['agreement_where_teacher_right']:.3f}")


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
