"""Scores of teacher-shaped outputs against references (the teacher's outputs or the ground
truth), library-backed: torchmetrics' COCO mAP, pycocotools mask IoU, scipy's Hungarian matching.
The student heads' ``metrics`` pick from these; ``students.evaluation`` runs them per node.

* detection: ``boxes`` (N, 4) normalized xyxy, ``classes`` (N,), ``scores`` (N,), and for
  segmentation ``masks`` (N COCO RLEs at the image's size);
* retrieval: ``ids`` ranked best first (``scores`` optional);
* text: ``answer``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from distillery import rle
from distillery.text import normalize_answer

Output = dict[str, Any]


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


def who_is_right(student: Sequence[str], teacher: Sequence[str], truth: Sequence[str]) -> dict[str, float | int]:
    """Where the student and the teacher disagree, which of them the truth sides with.

    A disagreement is not always the student's fault: a student trained on many teacher outputs
    can average away the teacher's one-off mistakes. Counts (normalised exact match, as
    ``answer_agreement``): ``student_right`` (differ; the student matches the truth, the teacher
    does not), ``teacher_right`` (differ; the reverse), ``both_wrong`` (differ; neither matches),
    and ``agreement_where_teacher_right``: the agreement over the answers the teacher got right
    (the fidelity that copies no teacher mistake)."""
    if not len(student) == len(teacher) == len(truth):
        raise ValueError(f"who_is_right: {len(student)} student, {len(teacher)} teacher and {len(truth)} true answers")
    s, t, g = ([normalize_answer(str(a)) for a in side] for side in (student, teacher, truth))
    differ = [i for i in range(len(g)) if s[i] != t[i]]
    teacher_right = [i for i in range(len(g)) if t[i] == g[i]]
    return {"n": len(g), "differ": len(differ),
            "student_right": sum(s[i] == g[i] for i in differ),
            "teacher_right": sum(t[i] == g[i] for i in differ),
            "both_wrong": sum(s[i] != g[i] and t[i] != g[i] for i in differ),
            "agreement_where_teacher_right": (sum(s[i] == t[i] for i in teacher_right) / len(teacher_right)
                                              if teacher_right else float("nan"))}
