"""The student's losses, tested by their math (TRL-style): KL(p, p) = 0; top-k KL with k = V is
the full KL; the tail bucket never makes the divergence larger than the full one at T = 1 (data
processing inequality); T^2 keeps gradient magnitudes comparable across temperatures; masked
positions contribute nothing; the detection, mask and retrieval losses and the balancer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.students.model.losses import (LossBalancer, center_heatmaps, distill_loss, divergence, fcos_assign, mask_loss,
                             quality_focal_loss, retrieval_loss, topk_kd_loss, topk_kd_per_token, uld_per_token)

KINDS = ("forward", "reverse", "jsd")


def teacher_topk(logits: torch.Tensor, k: int):
    lp = logits.log_softmax(-1)
    vals, ids = lp.topk(k, -1)  # (B, T, k) sorted, like the llm node stores them
    return ids, vals


def full_divergence(teacher_logits, student_logits, temperature: float, kind: str, beta: float = 0.5):
    """Reference over the whole vocabulary with torch's own kl_div."""
    log_p = (teacher_logits / temperature).log_softmax(-1)
    log_q = (student_logits / temperature).log_softmax(-1)
    kl = lambda a, b: F.kl_div(b, a, log_target=True, reduction="none").sum(-1)  # noqa: E731  KL(a || b)
    if kind == "forward":
        d = kl(log_p, log_q)
    elif kind == "reverse":
        d = kl(log_q, log_p)
    else:
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        d = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    return d * temperature ** 2


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    teacher, student = (torch.randn(3, 7, 40, generator=g) * 2 for _ in range(2))  # (B, T, V)
    return teacher, student


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [5, 40])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_of_a_distribution_with_itself_is_zero(logits, kind, k, temperature):
    t, _ = logits
    ids, vals = teacher_topk(t, k)
    per = topk_kd_per_token(t, ids, vals, temperature, kind)
    assert per.abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_topk_with_k_equal_vocab_is_the_full_divergence(logits, kind, temperature):
    """No tail mass on either side: the empty tail bucket is dropped, so values and gradients are
    the full divergence's (an empty -inf bucket would make the JSD's logaddexp back-propagate NaN)."""
    t, s = logits
    ids, vals = teacher_topk(t, t.shape[-1])
    s = s.clone().requires_grad_()
    got = topk_kd_per_token(s, ids, vals, temperature, kind)
    s_ref = s.detach().clone().requires_grad_()
    want = full_divergence(t, s_ref, temperature, kind)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got.sum().backward()
    want.sum().backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad, s_ref.grad, atol=1e-4, rtol=1e-4)
    loss = topk_kd_loss(s, ids, vals, torch.ones(3, 7, dtype=torch.bool), temperature, kind)
    s.grad = None
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 10, 39])
def test_tail_bucket_never_exceeds_the_full_divergence_at_t1(logits, kind, k):
    """Merging the non-top-k tokens into one bucket is a coarse-graining of both distributions,
    and f-divergences cannot grow under coarse-graining (data processing inequality)."""
    t, s = (x.double() for x in logits)  # a one-token tail is below float32's resolution of 1
    ids, vals = teacher_topk(t, k)
    bucketed = topk_kd_per_token(s, ids, vals, 1.0, kind)
    assert (bucketed <= full_divergence(t, s, 1.0, kind) + 1e-9).all()
    assert bucketed.min() > 0  # and it still sees the difference


def test_fp16_stored_logprobs_give_finite_losses_and_gradients(logits):
    t, s = logits
    ids, vals = teacher_topk(t, 5)
    s = s.clone().requires_grad_()
    for kind in KINDS:
        loss = topk_kd_loss(s, ids.int(), vals.half(), torch.ones(3, 7, dtype=torch.bool), 2.0, kind)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        s.grad = None


def kd_grad_norms(kind: str, temperatures: tuple[float, ...]) -> dict[float, float]:
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 16, 50, generator=g) * 2
    ids, vals = teacher_topk(teacher, 8)
    mask = torch.ones(4, 16, dtype=torch.bool)
    student = torch.randn(4, 16, 50, generator=g).requires_grad_()
    norms = {}
    for temperature in temperatures:
        student.grad = None
        topk_kd_loss(student, ids, vals, mask, temperature, kind).backward()
        norms[temperature] = student.grad.norm().item()
    return norms


@pytest.mark.parametrize("kind", KINDS)
def test_t_squared_keeps_kd_gradients_comparable_across_temperatures(kind):
    """At high T every f-divergence is ~ f''(1)/2 * chi^2 of the tempered distributions, whose
    gradient w.r.t. the logits shrinks like 1/T^2: times T^2 it no longer depends on T, for all
    three kinds. Without the factor, doubling T from 4 to 8 would quarter the gradients."""
    norms = kd_grad_norms(kind, (1.0, 4.0, 8.0))
    assert 0.8 < norms[8.0] / norms[4.0] < 1.25
    assert norms[4.0] / norms[1.0] / 16 < 0.25  # without the T^2 factor: ~T^2-fold smaller
    if kind == "forward":  # forward KL's gradient T (q_T - p_T) is comparable from T = 1 on
        assert 0.5 < norms[4.0] / norms[1.0] < 2.0
    else:
        # Reverse KL and JSD are not: at T = 1, far from the teacher, they are outside the quadratic
        # regime (reverse KL weights its gradient by q, mode-seeking; JSD saturates at log 2), so
        # their T = 1 gradients are ~2.5x smaller here. The T^2 factor still keeps them bounded.
        assert 0.5 < norms[4.0] / norms[1.0] < 4.0


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_contribute_nothing(logits, kind):
    t, s = logits
    ids, vals = teacher_topk(t, 5)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2] = False
    s = s.clone().requires_grad_()
    loss = topk_kd_loss(s, ids, vals, mask, 2.0, kind)
    loss.backward()
    assert s.grad[~mask].abs().max() == 0
    garbage = s.detach().clone()
    garbage[~mask] = 1e4
    vals2 = vals.clone()
    vals2[~mask] = float("nan")  # whatever sits in masked rows (padding) is never read
    torch.testing.assert_close(topk_kd_loss(garbage, ids, vals2, mask, 2.0, kind), loss.detach())
    per = topk_kd_per_token(s.detach(), ids, vals, 2.0, kind)
    torch.testing.assert_close(loss.detach(), per[mask].mean())


def test_distill_loss_blends_kd_and_cross_entropy(logits):
    t, s = logits
    ids, vals = teacher_topk(t, 5)
    labels = t.argmax(-1)  # (B, T) the teacher's tokens
    mask = torch.ones(3, 7, dtype=torch.bool)
    kd_mask = mask.clone()
    kd_mask[0] = False  # no soft labels for the first sequence: cross-entropy only there
    ce = F.cross_entropy(s.transpose(1, 2), labels, reduction="none")
    kd = topk_kd_per_token(s, ids, vals, 2.0, "forward")
    got = distill_loss(s, labels, mask, ids, vals, kd_mask, temperature=2.0, alpha=0.3)
    want = torch.where(kd_mask, 0.3 * kd + 0.7 * ce, ce).mean()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(distill_loss(s, labels, mask, ids, vals, kd_mask, alpha=0.0), ce.mean())


@pytest.mark.parametrize("k", [5, 40])
def test_uld_is_zero_for_the_same_distribution_under_another_vocabulary(logits, k):
    """Cross-tokenizer soft labels: the student's vocabulary is a permutation of the teacher's
    (and larger): sorted probabilities are equal, so the loss is 0; another distribution is not."""
    t, s = logits
    _, vals = teacher_topk(t, k)
    perm = torch.randperm(t.shape[-1], generator=torch.Generator().manual_seed(1))
    relabelled = torch.cat([t[..., perm], torch.full((*t.shape[:-1], 9), -1e4)], -1)  # (B, T, V + 9)
    assert uld_per_token(relabelled, vals).abs().max() < 1e-5
    other = uld_per_token(s, vals)
    assert (other > 1e-3).all() and (other <= 2 + 1e-5).all()


def test_uld_trains_a_student_with_another_vocabulary_toward_the_teacher(logits):
    t, _ = logits
    _, vals = teacher_topk(t, 8)
    student = torch.zeros(3, 7, 55, requires_grad=True)  # another vocabulary size
    opt = torch.optim.Adam([student], lr=0.1)
    labels, mask = torch.zeros(3, 7, dtype=torch.long), torch.ones(3, 7, dtype=torch.bool)
    first = None
    for _ in range(200):
        loss = distill_loss(student, labels, mask, None, vals, mask, alpha=1.0, aligned="sorted")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    with pytest.raises(ValueError, match="aligned"):
        distill_loss(student, labels, mask, None, vals, mask, aligned="bytes")


def test_divergence_rejects_unknown_kind():
    with pytest.raises(ValueError, match="forward, reverse, jsd"):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), kind="tvd")


# ---------------------------------------------------------------------------------------------
# Detection, masks, retrieval, balancing
# ---------------------------------------------------------------------------------------------

def grid_points(n: int) -> torch.Tensor:
    c = (torch.arange(n) + 0.5) / n
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([gx, gy], -1).view(-1, 2)  # (n*n, 2)


def test_fcos_assignment_center_sampling_smallest_box_and_tiny_boxes():
    pts = grid_points(8)  # stride 1/8
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75], [0.9, 0.9, 0.92, 0.92]]])  # (1, 3, 4)
    matched = fcos_assign(pts, boxes, torch.ones(1, 3, dtype=torch.bool), stride=1 / 8, radius=1.5)[0]  # (64,)
    center = 4 * 8 + 4  # the location at (0.5625, 0.5625): inside both big boxes, the smaller wins
    assert matched[center] == 1
    assert matched[0] == -1  # the image corner is far from every center: background
    assert (matched == 2).sum() == 1  # the tiny box keeps its nearest location
    padded = fcos_assign(pts, boxes, torch.tensor([[True, False, False]]), stride=1 / 8, radius=1.5)[0]
    assert set(padded.unique().tolist()) <= {-1, 0}  # invalid (padding) boxes are never assigned


def test_center_heatmaps_peak_at_each_center_with_the_teacher_scores():
    pts = grid_points(8)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.55, 0.55, 0.95, 0.95], [0.0, 0.0, 0.0, 0.0]]])  # (1, 3, 4)
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.6], [1.0, 1.0]]])  # (1, 3, C=2)
    valid = torch.tensor([[True, True, False]])
    heat = center_heatmaps(pts, boxes, valid, probs, 1 / 8).view(8, 8, 2)  # (rows, cols, C)
    assert heat[2, 2].tolist() == pytest.approx([0.9, 0.1])  # center (0.3, 0.3) is in cell (2, 2)
    assert heat[6, 6].tolist() == pytest.approx([0.2, 0.6])  # center (0.75, 0.75) -> cell (6, 6)
    peaks = heat == F.max_pool2d(heat.permute(2, 0, 1), 3, 1, 1).permute(1, 2, 0)
    assert peaks[..., 0].logical_and(heat[..., 0] > 0.5).sum() == 1  # one peak per object and class
    assert 0 < heat[2, 3, 0] < 0.9 and heat[0, 7].max() < 0.01  # decays away from the center
    assert heat.max() <= 0.9  # the padded box (scores 1.0) left no trace


def test_quality_focal_loss_is_minimal_at_the_soft_label():
    target = torch.tensor([0.0, 0.3, 0.8])
    logits = torch.logit(target.clamp(1e-4, 1 - 1e-4)).requires_grad_()
    quality_focal_loss(logits, target).sum().backward()
    assert logits.grad.abs().max() < 1e-3
    worse = quality_focal_loss(logits.detach() + 1.0, target)
    assert (worse > quality_focal_loss(logits.detach(), target)).all()


def test_mask_loss_only_looks_inside_the_box():
    gt = torch.zeros(1, 1, 8, 8)
    gt[0, 0, 2:6, 2:6] = 1
    box = torch.tensor([[[0.25, 0.25, 0.75, 0.75]]])  # (1, 1, 4)
    protos = (gt * 20 - 10).expand(1, 1, 8, 8).clone()  # one prototype that is the mask
    matched, pos = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    good = mask_loss(torch.ones(1, 1, 1), protos, matched, pos, gt, box)
    protos_outside = protos.clone()
    protos_outside[..., 0, :] = 10  # wrong, but outside the box
    assert good < 1e-3
    torch.testing.assert_close(mask_loss(torch.ones(1, 1, 1), protos_outside, matched, pos, gt, box), good)
    assert mask_loss(-torch.ones(1, 1, 1), protos, matched, pos, gt, box) > 5


def test_retrieval_loss_matches_the_teacher_distribution():
    doc_idx = torch.tensor([[2, 0, -1], [1, 3, 4]])  # (B, k), -1 = padding
    scores = torch.tensor([[0.9, 0.7, 0.0], [0.8, 0.6, 0.5]])
    mask = torch.tensor([True, True])
    teacher = torch.full((2, 5), -1e4)
    for b in range(2):
        for j, s in zip(doc_idx[b].tolist(), scores[b].tolist()):
            if j >= 0:
                teacher[b, j] = s / 0.05
    kl_only = retrieval_loss(teacher, doc_idx, scores, mask, temperature=0.05, ce_weight=0.0)
    assert kl_only.abs() < 1e-5
    assert retrieval_loss(torch.zeros(2, 5), doc_idx, scores, mask, 0.05, 0.0) > 0.5
    logits = torch.zeros(2, 5, requires_grad=True)
    retrieval_loss(logits, doc_idx, scores, torch.tensor([True, False]), 0.05, 0.5).backward()
    assert logits.grad[1].abs().max() == 0 and logits.grad[0, 2] < 0  # only row 0 learns: raise its top-1


def test_balancer_normalises_each_node_by_its_running_magnitude():
    bal = LossBalancer(["a", "b"], momentum=0.5)
    for _ in range(20):
        out = bal({"a": torch.tensor(100.0), "b": torch.tensor(0.01)})
    assert math.isclose(out["a"].item(), 1.0, rel_tol=1e-4) and math.isclose(out["b"].item(), 1.0, rel_tol=1e-4)
    bal.eval()
    out = bal({"a": torch.tensor(50.0), "b": torch.tensor(0.0)})  # eval: no update, just the division
    assert math.isclose(out["a"].item(), 0.5, rel_tol=1e-4)
    assert bal.seen.tolist() == [20.0, 20.0]
