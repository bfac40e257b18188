"""Fidelity: how close the student's outputs are to its teachers' (and to the ground truth).

Metric functions first (library-backed: torchmetrics' COCO mAP, pycocotools mask IoU, scipy's
Hungarian matching), then the per-node comparison used by the trainer, the registry and the
benchmarks. Outputs on both sides are teacher-shaped dicts (see ``teachers/``):

* detection (yolo): ``boxes`` (N, 4) normalized xyxy, ``classes`` (N,), ``scores`` (N,), and for
  segmentation ``masks`` (N COCO RLEs at the image's size);
* retrieval (rag): ``ids`` ranked best first (``scores`` optional);
* text (llm): ``answer``.

A node's head (and so its metrics) is read from its outputs' keys, so the same comparison serves student vs teacher,
teacher vs truth and student vs truth; "retained accuracy" per node is then the caller's ratio
``student_vs_truth / teacher_vs_truth``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from distillery.students.model.heads import head_class, output_head
from distillery.students.model.scores import (answer_agreement, detection_map, mask_iou, mean_mask_iou,  # noqa: F401
                                              retrieval_agreement)

Output = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Metric functions (the scores live with the model's heads, which pick from them)
# ---------------------------------------------------------------------------------------------

def token_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
             mask: torch.Tensor | None = None) -> float:
    """Mean per-token KL(teacher || student) on the teacher's text, over the stored top-k.

    Both distributions are the k stored ids plus one tail bucket (``students.losses``, T = 1).
    student_logits: (T, V) or (B, T, V); topk_ids, topk_logprobs: (..., T, k); mask: (..., T)."""
    from distillery.students.model.losses import topk_kd_loss

    if student_logits.dim() == 2:
        student_logits, topk_ids, topk_logprobs = student_logits[None], topk_ids[None], topk_logprobs[None]
        mask = None if mask is None else mask[None]
    mask = torch.ones(student_logits.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    if not mask.any():
        return float("nan")
    return float(topk_kd_loss(student_logits, topk_ids.long(), topk_logprobs, mask, temperature=1.0))


# ---------------------------------------------------------------------------------------------
# Per-node comparison
# ---------------------------------------------------------------------------------------------

def compare_node(preds: Sequence[Output | None], refs: Sequence[Output | None], *, k: int = 5,
                 truth: bool = False) -> dict[str, float]:
    """The metrics of one node's outputs: those of the head whose outputs ``refs`` are (read off
    their keys, so the same comparison serves student vs teacher, teacher vs truth and student vs
    truth); no metric when no head's outputs match."""
    preds = [p or {} for p in preds]
    refs = [r or {} for r in refs]
    head = output_head(refs)
    return {} if head is None else head.metrics(preds, refs, k=k, truth=truth)


def compare_outputs(predictions: Sequence[dict[str, Output]], references: Sequence[dict[str, Output]],
                    nodes: Iterable[str] | None = None, *, k: int | dict[str, int] = 5, truth: bool = False
                    ) -> dict[str, dict[str, float]]:
    """Per node: its metrics over the inputs whose reference has that node.

    predictions[i], references[i]: node name -> output for input i (a missing student output
    counts as an empty one; a missing reference leaves the input out for that node).
    k: recall@k of retrieval nodes, one for all or per node name (default 5)."""
    if len(predictions) != len(references):
        raise ValueError(f"compare_outputs: {len(predictions)} predictions for {len(references)} references")
    names = list(nodes) if nodes is not None else sorted({n for r in references for n in r})
    result = {}
    for node in names:
        pairs = [(p.get(node), r[node]) for p, r in zip(predictions, references) if r.get(node) is not None]
        if pairs:
            node_k = k.get(node, 5) if isinstance(k, dict) else k
            metrics = compare_node([p for p, _ in pairs], [r for _, r in pairs], k=node_k, truth=truth)
            result[node] = {name: v for name, v in metrics.items() if not math.isnan(v)} | {"n": len(pairs)}
    return result


def evaluate_student(predictor_or_model, records: Sequence, schema=None, *, batch_size: int = 16,
                     k: int | None = None) -> dict[str, dict[str, float]]:
    """Student vs the teacher outputs stored in ``records`` (TeacherRecords), per node: detection
    mAP50/mAP50-95 (+ mask IoU), retrieval top-1/recall@k, answer exact match, and for llm nodes
    the token-level KL on the teacher's text.

    ``predictor_or_model``: a ``StudentPredictor`` or a ``MultimodalStudent``. ``schema``
    (StudentSchema) selects the nodes; default: the model's. k: recall@k (default: each
    retrieval node's own top_k)."""
    predictor = as_predictor(predictor_or_model)
    schema = schema if schema is not None else predictor.model.schema
    records = list(records)
    predictions = predict_records(predictor, records, batch_size)
    ks = k if k is not None else {n: int(node.get("top_k", 5)) for n, node in schema.nodes.items()}
    result = compare_outputs(predictions, [r.outputs for r in records], list(schema.nodes), k=ks)
    for node, kl in teacher_text_kl(predictor.model, records, batch_size).items():
        result.setdefault(node, {})["token_kl"] = kl
    return result


@torch.no_grad()
def teacher_text_kl(model, records: Sequence, batch_size: int = 16) -> dict[str, float]:
    """Per llm node: mean per-token KL(teacher || student) over the teacher's generated text
    (reasoning + answer, teacher-forced on the [rationale] task), at T = 1 on the stored top-k."""
    from distillery.students.data import TraceDataset, batch_to, collate
    from distillery.students.model.schema import load_tokenizer
    from distillery.students.model.losses import topk_kd_per_token

    nodes = [n for n, node in model.schema.nodes.items() if head_class(node["type"]).generative]
    if not nodes or not records:
        return {}
    tok = model.tokenizer or load_tokenizer(model.schema)
    ds = TraceDataset(list(records), model.schema, model.cfg, tok, train=False)
    device, was_training = next(model.parameters()).device, model.training
    sums = {n: [0.0, 0] for n in nodes}
    model.eval()
    try:
        for start in range(0, len(ds), batch_size):
            batch = batch_to(collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))]), device)
            out = model(batch)
            for n in nodes:
                t = batch["targets"][n]
                mask = t["rationale_mask"] & t["rationale_kd_mask"] & t["mask"][:, None]  # (B, T)
                per = topk_kd_per_token(out[n]["rationale_logits"], t["rationale_topk_ids"],
                                        t["rationale_topk_logprobs"], 1.0, "forward", mask=mask)  # (B, T)
                sums[n][0] += float(per[mask].sum())
                sums[n][1] += int(mask.sum())
    finally:
        model.train(was_training)
    return {n: total / count for n, (total, count) in sums.items() if count}


def evaluate_against_truth(predictions: Sequence[dict[str, Output]], ground_truth: Sequence[dict[str, Output]],
                           *, k: int | dict[str, int] = 5) -> dict[str, dict[str, float]]:
    """The same metrics against ground truth, for the student's or the teacher graph's outputs.

    ground_truth[i]: node name -> teacher-shaped truth for input i (detection: ``boxes``,
    ``classes``, ``masks``; retrieval: ``ids`` = the relevant documents; text: ``answer``)."""
    return compare_outputs(predictions, ground_truth, k=k, truth=True)


def retained(student: dict[str, dict[str, float]], teacher: dict[str, dict[str, float]]
             ) -> dict[str, dict[str, float]]:
    """Retained accuracy: student metric / teacher metric, per node and metric (both vs truth)."""
    out: dict[str, dict[str, float]] = {}
    for node, metrics in student.items():
        for name, v in metrics.items():
            ref = teacher.get(node, {}).get(name)
            if name != "n" and ref:
                out.setdefault(node, {})[name] = v / ref
    return out


def as_predictor(obj):
    """A StudentPredictor as is; a MultimodalStudent wrapped into one."""
    if hasattr(obj, "predict"):
        return obj
    from distillery.students.serving.predictor import StudentPredictor

    return StudentPredictor.from_model(obj)


def predict_records(predictor, records: Sequence, batch_size: int = 16) -> list[dict[str, Output]]:
    """The student's outputs for each record's image and question, in batches."""
    out: list[dict[str, Output]] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        out.extend(predictor.predict([{"image": r.image_bytes or r.image_path, "question": r.question}
                                      for r in chunk]))
    return out
