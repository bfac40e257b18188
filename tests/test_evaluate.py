"""Fidelity metrics on hand-made cases whose answers are known (identical, disjoint, partial)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from distillery.students.evaluation.metrics import (
    answer_agreement,
    compare_outputs,
    detection_map,
    evaluate_against_truth,
    mask_iou,
    retained,
    retrieval_agreement,
    token_kl,
)


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def det(boxes, classes, scores=None, masks=None) -> dict:
    out = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "classes": np.asarray(classes, np.int32)}
    if scores is not None:
        out["scores"] = np.asarray(scores, np.float32)
    if masks is not None:
        out["masks"] = masks
    return out


A, B = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]


# -- detection mAP (torchmetrics) ----------------------------------------------------------------

def test_identical_boxes_give_perfect_map():
    teacher = [det([A, B], [0, 1], [0.9, 0.8]), det([B], [2], [0.7])]
    assert detection_map(teacher, teacher) == {"map50": 1.0, "map50_95": 1.0}


def test_disjoint_boxes_give_zero_map():
    assert detection_map([det([A], [0], [0.9])], [det([B], [0])]) == {"map50": 0.0, "map50_95": 0.0}


def test_wrong_class_gives_zero_map():
    assert detection_map([det([A], [1], [0.9])], [det([A], [0])])["map50"] == 0.0


def test_one_of_two_boxes_found_gives_coco_interpolated_half():
    # precision 1.0 up to recall 0.5, never reaches recall 1: COCO's 101 recall points
    # 0.00 .. 0.50 (51 of them) have precision 1, the rest 0 -> AP = 51 / 101.
    r = detection_map([det([A], [0], [0.9])], [det([A, B], [0, 0])])
    assert r["map50"] == pytest.approx(51 / 101, abs=1e-4)
    assert r["map50_95"] == pytest.approx(51 / 101, abs=1e-4)


def test_no_boxes_anywhere_is_agreement_and_spurious_boxes_are_not():
    empty = det(np.zeros((0, 4)), [])
    assert detection_map([empty], [empty])["map50"] == 1.0
    assert detection_map([det([A], [0], [0.9])], [empty])["map50"] == 0.0


def test_detection_map_refuses_misaligned_inputs():
    with pytest.raises(ValueError, match="2 boxes but 1 classes"):
        detection_map([det([A, B], [0])], [det([A], [0])])
    with pytest.raises(ValueError, match="1 predictions for 2 targets"):
        detection_map([det([A], [0])], [det([A], [0])] * 2)


# -- mask IoU (pycocotools + Hungarian) ----------------------------------------------------------

def masks_4_and_2() -> tuple[np.ndarray, np.ndarray]:
    m4 = np.zeros((8, 8), bool)
    m4[0, :4] = True  # 4 pixels
    m2 = np.zeros((8, 8), bool)
    m2[0, :2] = True  # 2 pixels, both inside m4
    return m4, m2


def test_mask_iou_known_values():
    m4, m2 = masks_4_and_2()
    far = np.zeros((8, 8), bool)
    far[7, 7] = True
    assert mask_iou([rle(m4)], [rle(m4)]) == 1.0
    assert mask_iou([rle(m4)], [rle(far)]) == 0.0
    assert mask_iou([rle(m4)], [rle(m2)]) == pytest.approx(0.5)  # |inter| 2 / |union| 4
    assert mask_iou([], []) == 1.0
    assert mask_iou([rle(m4)], []) == 0.0


def test_mask_iou_matches_one_to_one_and_counts_missing_instances():
    m4, m2 = masks_4_and_2()
    far = np.zeros((8, 8), bool)
    far[7, 6:] = True
    # order does not matter: far matches far (1.0), m2 matches m4 (0.5)
    assert mask_iou([rle(far), rle(m2)], [rle(m4), rle(far)]) == pytest.approx(0.75)
    # a missing instance counts as 0: (1.0 + 0) / 2
    assert mask_iou([rle(far)], [rle(m4), rle(far)]) == pytest.approx(0.5)


def test_mask_iou_refuses_masks_of_different_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        mask_iou([rle(np.ones((4, 4), bool))], [rle(np.ones((8, 8), bool))])


# -- retrieval, answers, token KL ----------------------------------------------------------------

def test_retrieval_agreement_known_values():
    same = retrieval_agreement([["a", "b", "c"]], [["a", "b", "c"]], k=3)
    assert same == {"top1": 1.0, "recall@3": 1.0}
    assert retrieval_agreement([["x", "y"]], [["a", "b"]], k=2) == {"top1": 0.0, "recall@2": 0.0}
    # second input: first id differs, 1 of the teacher's top-2 found
    partial = retrieval_agreement([["a", "b"], ["c", "a"]], [["a", "b"], ["a", "d"]], k=2)
    assert partial == {"top1": 0.5, "recall@2": pytest.approx(0.75)}


def test_retrieval_against_truth_uses_the_relevant_set():
    r = retrieval_agreement([["b", "a", "z"], ["q"]], [["a", "b"], []], k=2, relevant_set=True)
    assert r == {"top1": 1.0, "recall@2": 1.0}  # the input with no relevant document is left out


def test_answer_agreement_normalises_case_space_and_punctuation():
    assert answer_agreement(["Three.", " yes", "red"], ["three", "Yes", "blue"]) == pytest.approx(2 / 3)
    assert answer_agreement(["a"], ["a"]) == 1.0
    assert math.isnan(answer_agreement([], []))


def test_token_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(5, 11)  # (T, V)
    vals, ids = logits.log_softmax(-1).topk(3, -1)  # (T, k)
    assert token_kl(logits, ids, vals) == pytest.approx(0.0, abs=1e-6)
    assert token_kl(torch.randn(5, 11), ids, vals) > 0.01
    # k = vocabulary size: the bucketed KL is the full KL
    full_v, full_i = logits.log_softmax(-1).topk(11, -1)
    other = torch.randn(5, 11)
    expected = torch.nn.functional.kl_div(other.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1).mean()
    assert token_kl(other, full_i, full_v) == pytest.approx(float(expected), rel=1e-4)


# -- per node ------------------------------------------------------------------------------------

def test_compare_outputs_reads_each_nodes_kind_and_retained_is_a_ratio():
    m4, m2 = masks_4_and_2()
    teacher = [{"det": det([A], [0], [0.9], [rle(m4)]), "rag": {"ids": ["d1", "d2"]}, "llm": {"answer": "2"}},
               {"det": det([B], [1], [0.8], [rle(m2)]), "rag": {"ids": ["d3"]}, "llm": {"answer": "no"}}]
    student = [{"det": det([A], [0], [0.7], [rle(m4)]), "rag": {"ids": ["d1", "d9"]}, "llm": {"answer": "2"}},
               {"det": det([B], [1], [0.6], [rle(m4)]), "rag": {"ids": ["d4"]}}]  # llm missing
    r = compare_outputs(student, teacher, k=2)
    assert r["det"]["map50"] == 1.0 and r["det"]["mask_iou"] == pytest.approx(0.75)
    assert r["rag"] == {"top1": 0.5, "recall@2": pytest.approx(0.25), "n": 2}
    assert r["llm"] == {"answer_em": 0.5, "n": 2}
    truth = [{"llm": {"answer": "2"}}, {"llm": {"answer": "yes"}}]
    s, t = evaluate_against_truth(student, truth), evaluate_against_truth(teacher, truth)
    assert s["llm"]["answer_em"] == 0.5 and t["llm"]["answer_em"] == 0.5
    assert retained(s, t) == {"llm": {"answer_em": 1.0}}


def test_flat_metrics_are_names_mlflow_accepts():
    """``recall@4`` is not a valid MLflow metric name: logging it failed a whole distill run."""
    from mlflow.utils.validation import _validate_metric_name

    from distillery.students.evaluation.report import flat_metrics

    flat = flat_metrics({"retriever": {"top1": 1.0, "recall@4": 0.5, "n": 3, "bad": float("nan")}})
    assert flat == {"fidelity.retriever.top1": 1.0, "fidelity.retriever.recall_at_4": 0.5, "fidelity.retriever.n": 3.0}
    for name in flat:
        _validate_metric_name(name)
