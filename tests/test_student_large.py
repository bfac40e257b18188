"""Large objects: the detection head's in-graph mask areas and the per-class large counts it gives
the text decoder (the teacher's in training, its own at inference)."""

from __future__ import annotations

import numpy as np
import torch

from distillery.students.model.heads.yolo import DetectionHead
from distillery.students.model.heads import Features
from distillery.students.model.masks import instance_masks
from student_support import tiny_config

NODE = {"type": "yolo", "task": "segment", "num_classes": 3, "class_names": ["a", "b", "c"],
        "conf": 0.25, "iou": 0.7, "max_det": 100, "large_area": 0.05}  # max_det >= P: every peak counts


def _outputs(head: DetectionHead, cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    c4, c8 = cfg.vision_widths[1], cfg.vision_widths[2]
    S = cfg.image_size
    maps = {"p4": torch.randn(2, c4, S // 4, S // 4), "p8": torch.randn(2, c8, S // 8, S // 8)}
    head.eval()
    with torch.no_grad():
        out = head(Features(maps=maps))
        out["cls"] = torch.randn_like(out["cls"]) * 3  # peaks of all strengths, some above the threshold
    return out


def test_mask_areas_equal_the_decoded_masks_at_prototype_resolution():
    cfg = tiny_config()
    head = DetectionHead("detector", NODE, cfg)
    out = _outputs(head, cfg)
    areas = head.mask_areas(out)  # (B, P)
    q = cfg.image_size // 4
    for b in range(2):
        logits = torch.einsum("pm,mhw->phw", out["coef"][b], out["protos"][b]).numpy()
        masks = instance_masks(logits, out["boxes"][b].clamp(0, 1).numpy(), (q, q))
        expected = np.array([m.mean() for m in masks])
        np.testing.assert_allclose(areas[b].numpy(), expected, atol=2 / q**2)  # a pixel on a box edge at most
    assert (areas > 0).any() and (areas < 1).all()


def test_large_counts_are_the_teachers_in_training_and_the_heads_own_at_inference():
    cfg = tiny_config()
    head = DetectionHead("detector", NODE, cfg)
    out = _outputs(head, cfg)
    scores, classes, _ = head.peak_scores(out["cls"])
    areas = head.mask_areas(out)[scores > 0.25]
    assert len(areas) >= 4
    head.large_area = float(areas.median())  # about half the detections are large
    # the teacher: input 0 has two "b" boxes (one large) and one large "c"; input 1 has no target
    target = {"mask": torch.tensor([True, False]), "valid": torch.tensor([[True, True, True], [False] * 3]),
              "probs": torch.tensor([[[0.1, 0.9, 0.0], [0.0, 0.8, 0.1], [0.0, 0.1, 0.7]]] * 2),
              "areas": torch.tensor([[0.9, 0.0, 0.95], [0.0] * 3])}
    large = head.large_counts(out, target)
    own = head.large_counts(out, None)
    assert large[0].tolist() == [0.0, 1.0, 1.0]
    assert torch.equal(large[1], own[1])
    # the head's own: peaks above the threshold whose mask covers at least large_area
    kept = (scores > 0.25) & (head.mask_areas(out) >= head.large_area)
    expected = torch.zeros(2, 3).scatter_add_(1, classes, kept.float())
    assert torch.equal(own, expected) and own.sum() > 0
    assert (own <= head.counts(out, None)).all()  # large objects are some of the objects
    # with max_det, only the strongest peaks count (masks computed for them alone), as the teacher keeps max_det
    head.node = {**NODE, "max_det": 3}
    top = scores.topk(3, dim=1)
    kept3 = torch.zeros_like(kept).scatter_(1, top.indices, True) & kept
    assert torch.equal(head.large_counts(out, None), torch.zeros(2, 3).scatter_add_(1, classes, kept3.float()))


def test_slots_carry_the_large_counts():
    from student_support import build_tokenizer

    cfg = tiny_config()
    head = DetectionHead("detector", NODE, cfg)
    embed = torch.nn.Embedding(64, cfg.d_model)
    counts = torch.tensor([[2.0, 1.0, 0.0]])
    a = head.slots(counts, build_tokenizer(), embed, torch.tensor([[1.0, 0.0, 0.0]]))
    b = head.slots(counts, build_tokenizer(), embed, torch.tensor([[2.0, 0.0, 0.0]]))
    assert a.shape == (1, 6, cfg.d_model) and head.prefix_len() == 6  # a count slot and a large slot per class
    assert torch.equal(a[:, :3], head.slots(counts, build_tokenizer(), embed))  # the count slots as without sizes
    assert not torch.allclose(a[0, 3], b[0, 3]) and torch.equal(a[0, 4:], b[0, 4:])  # only class a's large slot moves


def test_the_runtimes_numpy_counts_equal_the_torch_heads():
    """``arrays.detection_counts`` (what the torch-free runtime feeds the ONNX text graph) gives
    the torch head's own counts and large counts exactly: random heads, saturated and tied scores,
    and max_det below the number of peaks (only the strongest count as large; where scores tie at
    that boundary, which of them count is torch's topk's choice)."""
    from distillery.students.model.arrays import detection_counts

    cfg = tiny_config()
    for seed in range(4):
        for max_det in (100, 3):
            head = DetectionHead("detector", {**NODE, "max_det": max_det}, cfg)
            out = _outputs(head, cfg, seed)
            if max_det > 5:  # saturated: probability 1.0 for different logits (tied scores; which of
                out["cls"][0, :5] = 30.0  # them are the strongest max_det is torch's topk's choice)
            scores, _, _ = head.peak_scores(out["cls"])
            head.large_area = float(head.mask_areas(out)[scores > 0.25].median())
            with torch.no_grad():
                want = head.prefix_inputs(out, None)
            got = detection_counts({k: v.numpy() for k, v in out.items()}, cfg.image_size // 8, 0.25, max_det,
                                   3, head.large_area)
            assert sorted(got) == sorted(want) == ["counts", "large"]
            for k in want:
                np.testing.assert_array_equal(got[k], want[k].numpy(), err_msg=f"seed {seed}, max_det {max_det}, {k}")
            assert want["large"].sum() > 0 and want["counts"].sum() > want["large"].sum()
    # given counts are taken as they are (the ONNX text graph's inputs)
    given = {"counts": torch.tensor([[1.0, 2.0, 3.0]]), "large": torch.tensor([[0.0, 1.0, 0.0]])}
    assert head.prefix_inputs(given, None) is not given and torch.equal(head.prefix_inputs(given, None)["counts"],
                                                                        given["counts"])
