"""Fidelity: how close the student's outputs are to its teachers' (and to the ground truth).

Metric functions first (library-backed: torchmetrics' COCO mAP, pycocotools mask IoU, scipy's
Hungarian matching), then the per-node comparison used by the trainer, the registry and the
benchmarks. Outputs on both sides are teacher-shaped dicts (see ``teachers/``):

* detection (yolo): ``boxes`` (N, 4) normalized xyxy, ``classes`` (N,), ``scores`` (N,), and for
  segmentation ``masks`` (N COCO RLEs at the image's size);
* retrieval (rag): ``ids`` ranked best first (``scores`` optional);
* text (llm): ``answer``.

A node's kind is read from its outputs' keys, so the same comparison serves student vs teacher,
teacher vs truth and student vs truth; "retained accuracy" per node is then the caller's ratio
``student_vs_truth / teacher_vs_truth``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from distillery import rle
from distillery.text import normalize_answer

Output = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Metric functions
# ---------------------------------------------------------------------------------------------

def _det(out: Output | None, with_scores: bool) -> dict[str, torch.Tensor]:
    """A teacher-shaped detection output -> torchmetrics' dict of tensors."""
    out = out or {}
    boxes = torch.as_tensor(np.asarray(out.get("boxes", []), dtype=np.float32)).reshape(-1, 4)  # (N, 4)
    labels = torch.as_tensor(np.asarray(out.get("classes", []), dtype=np.int64)).reshape(-1)  # (N,)
    if len(labels) != len(boxes):
        raise ValueError(f"detection output has {len(boxes)} boxes but {len(labels)} classes")
    d = {"boxes": boxes, "labels": labels}
    if with_scores:
        scores = out.get("scores")
        scores = torch.ones(len(boxes)) if scores is None else torch.as_tensor(np.asarray(scores, np.float32))
        d["scores"] = scores.reshape(-1)  # (N,)
    return d


def detection_map(preds: Sequence[Output], targets: Sequence[Output]) -> dict[str, float]:
    """COCO box mAP of ``preds`` against ``targets`` (one dict per image), via torchmetrics.

    Returns ``{"map50", "map50_95"}``. When the targets hold no box at all, mAP is undefined in
    COCO; here it is 1.0 if the predictions hold none either (perfect agreement), else 0.0."""
    if len(preds) != len(targets):
        raise ValueError(f"detection_map: {len(preds)} predictions for {len(targets)} targets")
    from torchmetrics.detection import MeanAveragePrecision

    p = [_det(o, with_scores=True) for o in preds]
    t = [_det(o, with_scores=False) for o in targets]
    n_pred, n_true = sum(len(d["boxes"]) for d in p), sum(len(d["boxes"]) for d in t)
    if n_true == 0:
        v = 1.0 if n_pred == 0 else 0.0
        return {"map50": v, "map50_95": v}
    # sync_on_compute=False: this process's inputs only, even inside a DDP run (rank 0 evaluates)
    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy", sync_on_compute=False)
    metric.update(p, t)
    r = metric.compute()
    return {"map50": max(float(r["map_50"]), 0.0), "map50_95": max(float(r["map"]), 0.0)}


def mask_iou(pred_rles: Sequence[dict], target_rles: Sequence[dict]) -> float:
    """Mean IoU of one image's instance masks, matched one-to-one by Hungarian on IoU.

    Unmatched masks (extra or missing instances) count as IoU 0, so the mean is over
    ``max(len(pred), len(target))``; no mask on either side is perfect agreement (1.0)."""
    p, t = rle.to_coco_list(pred_rles), rle.to_coco_list(target_rles)
    if not p and not t:
        return 1.0
    if not p or not t:
        return 0.0
    sizes = {tuple(r["size"]) for r in p + t}
    if len(sizes) > 1:
        raise ValueError(f"mask_iou: masks of different sizes {sorted(sizes)}; "
                         "predict masks at the image's size")
    iou = np.asarray(mask_utils.iou(p, t, [0] * len(t)), dtype=np.float64)  # (P, T)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / max(len(p), len(t)))


def mean_mask_iou(preds: Sequence[Output], targets: Sequence[Output]) -> float:
    """``mask_iou`` averaged over images (outputs carry their masks under ``masks``)."""
    if len(preds) != len(targets):
        raise ValueError(f"mean_mask_iou: {len(preds)} predictions for {len(targets)} targets")
    if not targets:
        return float("nan")
    vals = [mask_iou((p or {}).get("masks", []), (t or {}).get("masks", [])) for p, t in zip(preds, targets)]
    return float(np.mean(vals))


def retrieval_agreement(pred_ids: Sequence[Sequence[str]], ref_ids: Sequence[Sequence[str]], k: int = 5,
                        *, relevant_set: bool = False) -> dict[str, float]:
    """Top-1 agreement and recall@k of ranked document ids (set arithmetic, no library needed).

    Against a teacher (default): ``top1`` = the student's first id is the teacher's first id;
    ``recall@k`` = share of the teacher's top-k found in the student's top-k.
    Against ground truth (``relevant_set=True``): ``ref_ids`` is the set of relevant documents;
    ``top1`` = the first id is relevant; ``recall@k`` = share of the relevant ids in the top-k;
    inputs with no relevant document are left out. Empty vs empty counts as agreement."""
    if len(pred_ids) != len(ref_ids):
        raise ValueError(f"retrieval_agreement: {len(pred_ids)} predictions for {len(ref_ids)} references")
    if k < 1:
        raise ValueError(f"retrieval_agreement: k must be >= 1, got {k}")
    top1, recall = [], []
    for pred, ref in zip(pred_ids, ref_ids):
        pred, ref = list(pred), list(ref)
        if relevant_set and not ref:
            continue
        relevant = set(ref) if relevant_set else set(ref[:k])
        if not relevant:
            top1.append(float(not pred))
            recall.append(float(not pred))
            continue
        top1.append(float(bool(pred) and (pred[0] in relevant if relevant_set else pred[0] == ref[0])))
        recall.append(len(set(pred[:k]) & relevant) / len(relevant))
    if not top1:
        return {"top1": float("nan"), f"recall@{k}": float("nan")}
    return {"top1": float(np.mean(top1)), f"recall@{k}": float(np.mean(recall))}


def answer_agreement(pred_answers: Sequence[str], ref_answers: Sequence[str]) -> float:
    """Exact match after normalisation (case, spaces and surrounding punctuation, as the
    teacher's own voting does: ``distillery.text.normalize_answer``)."""
    if len(pred_answers) != len(ref_answers):
        raise ValueError(f"answer_agreement: {len(pred_answers)} predictions for {len(ref_answers)} references")
    if not ref_answers:
        return float("nan")
    same = [normalize_answer(str(p)) == normalize_answer(str(r)) for p, r in zip(pred_answers, ref_answers)]
    return float(np.mean(same))


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

def node_kind(outputs: Iterable[Output | None]) -> str | None:
    """``detection`` | ``retrieval`` | ``answer`` from the keys the outputs carry."""
    keys: set[str] = set()
    for o in outputs:
        keys |= set(o or {})
    if "boxes" in keys:
        return "detection"
    if "ids" in keys:
        return "retrieval"
    if "answer" in keys:
        return "answer"
    return None


def compare_node(preds: Sequence[Output | None], refs: Sequence[Output | None], *, k: int = 5,
                 truth: bool = False) -> dict[str, float]:
    """The metrics that apply to one node's outputs (``refs`` decide the kind)."""
    preds = [p or {} for p in preds]
    refs = [r or {} for r in refs]
    kind = node_kind(refs)
    if kind == "detection":
        out = detection_map(preds, refs)
        if any(r.get("masks") for r in refs) or any(p.get("masks") for p in preds):
            out["mask_iou"] = mean_mask_iou(preds, refs)
        return out
    if kind == "retrieval":
        return retrieval_agreement([p.get("ids", []) for p in preds], [r.get("ids", []) for r in refs], k,
                                   relevant_set=truth)
    if kind == "answer":
        return {"answer_em": answer_agreement([p.get("answer", "") for p in preds],
                                              [r.get("answer", "") for r in refs])}
    return {}


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

    nodes = [n for n, node in model.schema.nodes.items() if node["type"] == "llm"]
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
