"""The student's losses: pure functions over tensors, each with its paper.

Shapes: B batch, T tokens, V vocabulary, k stored top-k, P feature-map locations, N boxes per
image (padded), C classes, M prototypes, H x W prototype resolution, D documents.

Token-level KD works on what the trace store keeps: the teacher's top-k log-probabilities per
generated token. Both distributions are first coarse-grained to k + 1 buckets (the k stored ids,
and the tail: every other token; no tail when k >= V), then tempered. With k = V this is exactly the full KL at
temperature T; at T = 1 the bucketed divergence is <= the full one (data-processing inequality);
KL(p, p) = 0 always.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

MIN_TEACHER_TAIL = 1e-6  # tail mass the fp16 top-k values cannot resolve is treated as this much
MIN_TEACHER_LOGPROB = -1e4  # -inf in stored log-probs (masked tokens) becomes this, finite


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (same shape); 0 (still in the graph) when the mask is empty."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() / mask.sum().clamp(min=1)


def _f32(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64: the tests check the math in double)."""
    return x if x.dtype == torch.float64 else x.float()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------
# Token-level distillation from stored top-k log-probs
# ---------------------------------------------------------------------------------------------

def student_buckets(student_logits: Tensor, topk_ids: Tensor) -> Tensor:
    """Student log-probs of the teacher's top-k ids plus the tail bucket: (B, T, k + 1).

    With k >= V there is no tail: (B, T, k). An empty bucket would be -inf on both sides, and
    -inf - -inf (the JSD mixture's logaddexp) back-propagates NaN; same rule as teacher_buckets."""
    logp = _f32(student_logits).log_softmax(-1)  # (B, T, V)
    top = logp.gather(-1, topk_ids)  # (B, T, k)
    if topk_ids.shape[-1] >= logp.shape[-1]:
        return top  # no tail mass: the k buckets are the whole distribution
    tail = logp.scatter(-1, topk_ids, -math.inf).logsumexp(-1, keepdim=True)  # (B, T, 1)
    return torch.cat([top, tail], -1)


def teacher_buckets(topk_logprobs: Tensor, vocab_size: int) -> Tensor:
    """Teacher log-probs of its top-k plus the tail mass 1 - sum(top-k): (B, T, k + 1);
    (B, T, k) when k >= vocab_size (no tail, as in student_buckets)."""
    top = _f32(topk_logprobs).clamp(min=MIN_TEACHER_LOGPROB)  # (B, T, k)
    if top.shape[-1] >= vocab_size:
        return top
    # 1 - sum(top-k) in float64: the tail can be far smaller than float32's resolution of 1
    mass = top.double().logsumexp(-1, keepdim=True)
    tail = _log1mexp(mass).clamp(min=math.log(MIN_TEACHER_TAIL)).to(top.dtype)
    return torch.cat([top, tail], -1)


def temper(log_probs: Tensor, temperature: float) -> Tensor:
    """p^(1/T), renormalised, in log space (softmax of logits / T for the top-k entries)."""
    z = log_probs / temperature
    return z - z.logsumexp(-1, keepdim=True)


def kl_div_log(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim from log-probs; entries with p = 0 contribute 0."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), device=p.device))
    return (p * diff).sum(-1)


def divergence(log_p: Tensor, log_q: Tensor, kind: str = "forward", beta: float = 0.5) -> Tensor:
    """Teacher p, student q (log-probs, same buckets) -> divergence over the last dim.

    forward: KL(p || q) (Hinton et al. 2015); reverse: KL(q || p), mode-seeking (MiniLLM, Gu et
    al. 2024); jsd: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    (generalized JSD of GKD, Agarwal et al. 2024)."""
    if kind == "forward":
        return kl_div_log(log_p, log_q)
    if kind == "reverse":
        return kl_div_log(log_q, log_p)
    if kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        return beta * kl_div_log(log_p, log_m) + (1 - beta) * kl_div_log(log_q, log_m)
    raise ValueError(f"unknown KD kind {kind!r}; known: forward, reverse, jsd")


def topk_kd_per_token(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                      temperature: float = 1.0, kind: str = "forward", beta: float = 0.5,
                      mask: Tensor | None = None) -> Tensor:
    """Per-token KD on (top-k + tail) buckets at temperature T, scaled by T^2: (B, T).

    Distilling the knowledge in a neural network (Hinton, Vinyals, Dean 2015): softened targets,
    and the T^2 factor keeps gradient magnitudes comparable across temperatures.
    student_logits (B, T, V); topk_ids (B, T, k) int; topk_logprobs (B, T, k) raw teacher
    log-softmax at T = 1; mask (B, T) bool: positions outside it are made harmless (finite)."""
    if mask is not None:
        topk_ids = torch.where(mask[..., None], topk_ids, torch.zeros_like(topk_ids))
        topk_logprobs = torch.where(mask[..., None], topk_logprobs, torch.zeros_like(topk_logprobs))
    log_q = temper(student_buckets(student_logits, topk_ids.long()), temperature)  # (B, T, k+1) or (B, T, k)
    log_p = temper(teacher_buckets(topk_logprobs, student_logits.shape[-1]), temperature).to(log_q.dtype)
    return divergence(log_p, log_q, kind, beta) * temperature ** 2


def topk_kd_loss(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor,
                 temperature: float = 1.0, kind: str = "forward", beta: float = 0.5) -> Tensor:
    """Mean over ``mask`` (B, T) of ``topk_kd_per_token``: a scalar."""
    per = topk_kd_per_token(student_logits, topk_ids, topk_logprobs, temperature, kind, beta, mask)
    return masked_mean(per, mask)


def uld_per_token(student_logits: Tensor, topk_logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Universal logit distillation across tokenizers, per token: (B, T).

    Boizard et al. 2024 ("Towards cross-tokenizer distillation: the universal logit distillation
    loss"): when the student's vocabulary is not the teacher's, token ids do not line up, but
    sorted probability vectors do: the L1 distance between the student's and the teacher's
    probabilities sorted in decreasing order (a Wasserstein-1 distance under their cost), positions
    aligned by index. With the teacher's stored top-k: its k sorted probabilities and the tail mass
    1 - sum(top-k) against the student's k largest and its own tail. 0 when the distributions are
    equal up to a relabelling of the tokens; at most 2.
    student_logits (B, T, V); topk_logprobs (B, T, k) sorted descending; mask (B, T)."""
    if mask is not None:
        topk_logprobs = torch.where(mask[..., None], topk_logprobs, torch.zeros_like(topk_logprobs))
    p_t = _f32(topk_logprobs).clamp(min=MIN_TEACHER_LOGPROB).exp()  # (B, T, k)
    k = min(p_t.shape[-1], student_logits.shape[-1])
    p_s = _f32(student_logits).softmax(-1).topk(k, -1).values  # (B, T, k), sorted
    p_t = p_t[..., :k]
    tails = (1 - p_s.sum(-1)).clamp(min=0) - (1 - p_t.sum(-1)).clamp(min=0)  # (B, T)
    return (p_s - p_t).abs().sum(-1) + tails.abs()


def distill_loss(student_logits: Tensor, labels: Tensor, label_mask: Tensor,
                 topk_ids: Tensor | None = None, topk_logprobs: Tensor | None = None,
                 kd_mask: Tensor | None = None, temperature: float = 2.0, alpha: float = 0.5,
                 kind: str = "forward", beta: float = 0.5, aligned: str = "ids") -> Tensor:
    """alpha * KD + (1 - alpha) * CE per token where soft labels exist, CE alone elsewhere.

    Hinton et al. 2015 (KD blended with the hard-label loss); the hard labels are the teacher's
    own tokens (sequence-level KD, Kim & Rush 2016). labels, label_mask, kd_mask: (B, T).
    aligned: "ids" (one vocabulary: the divergence ``kind`` at ``temperature`` over the stored
    ids) or "sorted" (another tokenizer's soft labels: ``uld_per_token``, ids unused)."""
    ce = F.cross_entropy(student_logits.float().transpose(1, 2), labels.long(), reduction="none")  # (B, T)
    if topk_logprobs is None or kd_mask is None or alpha == 0 or (topk_ids is None and aligned == "ids"):
        return masked_mean(ce, label_mask)
    kd_mask = kd_mask & label_mask
    if aligned == "sorted":
        kd = uld_per_token(student_logits, topk_logprobs, kd_mask)
    elif aligned == "ids":
        kd = topk_kd_per_token(student_logits, topk_ids, topk_logprobs, temperature, kind, beta, kd_mask)
    else:
        raise ValueError(f"aligned {aligned!r}: ids or sorted")
    per = torch.where(kd_mask, alpha * kd + (1 - alpha) * ce, ce)
    return masked_mean(per, label_mask)


# ---------------------------------------------------------------------------------------------
# Detection (FCOS assignment, quality focal loss, GIoU) and masks (YOLACT)
# ---------------------------------------------------------------------------------------------

def fcos_assign(points: Tensor, boxes: Tensor, valid: Tensor, stride: float, radius: float) -> Tensor:
    """Each location's teacher box (index into N) or -1: (B, P).

    FCOS (Tian et al. 2019) with center sampling: a location is a positive for a box when it lies
    inside it and within ``radius * stride`` of its center; the smallest such box wins. Every box
    also keeps its nearest location, so tiny boxes are never left without a positive.
    points (P, 2) normalized xy; boxes (B, N, 4) normalized xyxy; valid (B, N) bool; stride
    normalized (pixels / image size)."""
    if boxes.shape[1] == 0:
        return torch.full((boxes.shape[0], points.shape[0]), -1, dtype=torch.long, device=points.device)
    x, y = points[None, :, None, 0], points[None, :, None, 1]  # (1, P, 1)
    x1, y1, x2, y2 = (boxes[:, None, :, i] for i in range(4))  # (B, 1, N) each
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    inside = torch.minimum(torch.minimum(x - x1, y - y1), torch.minimum(x2 - x, y2 - y)) > 0  # (B, P, N)
    near = ((x - cx).abs() < radius * stride) & ((y - cy).abs() < radius * stride)
    cand = inside & near & valid[:, None, :]
    nearest = ((x - cx) ** 2 + (y - cy) ** 2).argmin(1)  # (B, N)
    cand = cand | (F.one_hot(nearest, points.shape[0]).transpose(1, 2).bool() & valid[:, None, :])
    area = ((x2 - x1) * (y2 - y1)).expand_as(cand).masked_fill(~cand, math.inf)  # (B, P, N)
    best = area.argmin(-1)  # (B, P)
    return torch.where(cand.any(-1), best, torch.full_like(best, -1))


def quality_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Element-wise BCE(sigmoid(logits), soft targets) * |sigmoid(logits) - targets|^gamma.

    Generalized Focal Loss (Li et al. 2020): a focal loss for soft labels, minimised exactly at
    sigmoid(logits) = targets, so the teacher's per-class scores are reproduced, not just ranked."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return bce * (logits.sigmoid() - targets).abs().pow(gamma)


def centerness(ltrb: Tensor) -> Tensor:
    """FCOS centerness of (..., 4) non-negative distances: sqrt(min/max (l, r) * min/max (t, b))."""
    lr, tb = ltrb[..., [0, 2]], ltrb[..., [1, 3]]
    ratio = (lr.amin(-1) / lr.amax(-1).clamp(min=1e-9)) * (tb.amin(-1) / tb.amax(-1).clamp(min=1e-9))
    return ratio.clamp(min=0).sqrt()


def center_heatmaps(points: Tensor, boxes: Tensor, valid: Tensor, probs: Tensor, stride: float) -> Tensor:
    """Class targets (B, P, C): CenterNet heatmaps (Zhou et al. 2019) whose peaks are the teacher's
    per-class scores. Each box puts a Gaussian (sigma = side / 6 per axis, in cells, >= 1/3) on the
    cell holding its center, scaled by its score vector; where objects meet, the max wins. One peak
    per object, so inference needs no more than a 3 x 3 local-maximum test and the peak heights are
    the teacher's scores (its confidence threshold means the same for the student).
    points (P, 2); boxes (B, N, 4); valid (B, N) bool; probs (B, N, C); stride normalized."""
    B, N, C = probs.shape
    if N == 0:
        return probs.new_zeros(B, points.shape[0], C)
    n = round(1 / stride)
    cell = (points / stride).floor()  # (P, 2) integer cell coordinates
    center = (((boxes[..., :2] + boxes[..., 2:]) / 2) / stride).floor().clamp(0, n - 1)  # (B, N, 2)
    sigma = ((boxes[..., 2:] - boxes[..., :2]) / stride / 6).clamp(min=1 / 3)  # (B, N, 2)
    d = cell[None, :, None, :] - center[:, None]  # (B, P, N, 2)
    g = torch.exp(-(d ** 2 / (2 * sigma[:, None] ** 2)).sum(-1)) * valid[:, None, :]  # (B, P, N)
    return (g[..., None] * probs[:, None]).amax(2)  # (B, P, C)


def detection_loss(cls_logits: Tensor, boxes: Tensor, points: Tensor, matched: Tensor, heat: Tensor,
                   gt_boxes: Tensor, image_mask: Tensor, n_objects: Tensor, box_weight: float = 2.0) -> Tensor:
    """Teacher boxes as targets, the teacher's class scores as soft labels.

    cls_logits (B, P, C) vs ``center_heatmaps`` (B, P, C): quality focal loss (Li et al. 2020),
    normalised by the number of teacher boxes (CenterNet). boxes (B, P, 4) decoded normalized
    xyxy vs the box each location is assigned by ``fcos_assign`` (matched (B, P)): GIoU
    (Rezatofighi et al. 2019) weighted by FCOS centerness (Tian et al. 2019). image_mask (B,) bool:
    images without a target for this node contribute nothing."""
    cls = quality_focal_loss(cls_logits.float(), heat.float()).sum(-1)  # (B, P)
    cls = torch.where(image_mask[:, None], cls, torch.zeros_like(cls)).sum() / n_objects.clamp(min=1)
    pos = (matched >= 0) & image_mask[:, None]  # (B, P)
    tgt = gt_boxes.gather(1, matched.clamp(min=0)[..., None].expand(-1, -1, 4))  # (B, P, 4)
    w = centerness(torch.cat([points - tgt[..., :2], tgt[..., 2:] - points], -1).clamp(min=0))[pos]  # (n,)
    w = w.clamp(min=0.05)
    giou = generalized_box_iou_loss(boxes.float()[pos], tgt.float()[pos], reduction="none")  # (n,)
    box = (giou * w).sum() / w.sum().clamp(min=1e-6)
    return cls + box_weight * box + 0.0 * boxes.sum()  # keeps the box branch in the graph when pos is empty


def box_region(boxes: Tensor, height: int, width: int) -> Tensor:
    """(n, 4) normalized xyxy -> (n, H, W) bool: the pixels whose centers lie in each box."""
    ys = (torch.arange(height, device=boxes.device) + 0.5) / height  # (H,)
    xs = (torch.arange(width, device=boxes.device) + 0.5) / width  # (W,)
    in_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])  # (n, W)
    in_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])  # (n, H)
    return in_y[:, :, None] & in_x[:, None, :]


def mask_loss(coef: Tensor, protos: Tensor, matched: Tensor, pos: Tensor, gt_masks: Tensor,
              gt_boxes: Tensor) -> Tensor:
    """YOLACT (Bolya et al. 2019): mask = coefficients . prototypes, BCE inside the teacher box.

    coef (B, P, M); protos (B, M, H, W); matched, pos (B, P); gt_masks (B, N, H, W) in [0, 1]
    (teacher masks resized to the prototype grid); gt_boxes (B, N, 4). Each positive's loss is
    averaged over its box's pixels, then over positives."""
    b, p = pos.nonzero(as_tuple=True)  # (n,), (n,)
    touch = 0.0 * (coef.sum() + protos.sum())
    if b.numel() == 0:
        return touch
    n = matched[b, p]
    B, M, H, W = protos.shape
    # per image, its positives' coefficients times its prototypes (b is sorted: nonzero's order).
    # Cheaper than a copy of the prototype stack per positive (n is ~1000 at batch 32), or
    # than every location's mask followed by a gather (its backward fills a (B, P, H*W) zero tensor)
    sizes = torch.bincount(b, minlength=B).tolist()
    flat, rows = protos.float().flatten(2), coef[b, p].float().split(sizes)  # (B, M, HW), [(n_i, M)]
    logits = torch.cat([r @ flat[i] for i, r in enumerate(rows) if len(r)]).view(-1, H, W)  # (n, H, W)
    target = gt_masks[b, n].float()  # (n, H, W)
    region = box_region(gt_boxes[b, n].float(), *logits.shape[1:]).float()  # (n, H, W)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    per = (bce * region).sum((1, 2)) / region.sum((1, 2)).clamp(min=1)
    return per.mean() + touch


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------

def retrieval_loss(logits: Tensor, doc_idx: Tensor, scores: Tensor, mask: Tensor,
                   temperature: float = 0.05, ce_weight: float = 0.5) -> Tensor:
    """KL(teacher || student) over documents + ce_weight * CE on the teacher's top-1.

    The teacher's scores over its top-k are softmaxed at ``temperature`` (every other document ~0),
    as in listwise retriever distillation (RocketQAv2, Ren et al. 2021; Izacard & Grave 2021).
    logits (B, D); doc_idx (B, k) document indices, -1 = padding; scores (B, k); mask (B,) bool."""
    B, D = logits.shape
    idx = torch.where(doc_idx >= 0, doc_idx, torch.full_like(doc_idx, D))  # padding -> dummy column
    t = torch.full((B, D + 1), -math.inf, device=logits.device)
    t = t.scatter(1, idx, (scores.float() / temperature).masked_fill(doc_idx < 0, -math.inf))[:, :D]
    t = torch.where(mask[:, None], t, torch.zeros_like(t))  # rows without a target: harmless uniform
    log_p, log_q = t.log_softmax(-1), logits.float().log_softmax(-1)  # (B, D)
    kl = kl_div_log(log_p, log_q)  # (B,)
    ce = F.cross_entropy(logits.float(), idx[:, 0].clamp(max=D - 1), reduction="none")  # (B,)
    return masked_mean(kl + ce_weight * ce, mask)


# ---------------------------------------------------------------------------------------------
# Balancing the nodes
# ---------------------------------------------------------------------------------------------

class LossBalancer(nn.Module):
    """Divides each node's loss by a running mean (EMA) of its own magnitude.

    Loss scales differ by orders of magnitude between nodes (a GIoU sum vs a token KL); after this
    each node contributes ~its weight. A parameter-free alternative to uncertainty weighting
    (Kendall, Gal, Cipolla 2018) in the spirit of loss-ratio balancing (GradNorm, Chen et al.
    2018). The means are buffers: saved with the weights, restored on resume, and only updated in
    training mode, from batches where the node had targets (loss > 0)."""

    def __init__(self, names: list[str], momentum: float = 0.99):
        super().__init__()
        self.names, self.momentum = list(names), momentum
        self.register_buffer("running", torch.ones(len(self.names)))
        self.register_buffer("seen", torch.zeros(len(self.names)))

    def forward(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for i, name in enumerate(self.names):
            if name not in losses:  # (a text-only echo step has no detection loss)
                continue
            value = losses[name]
            if self.training and float(value.detach()) > 0:
                m = self.momentum * (self.seen[i] > 0)  # the first value initialises the mean
                self.running[i] = m * self.running[i] + (1 - m) * value.detach().float()
                self.seen[i] += 1
            out[name] = value / self.running[i].clamp(min=1e-8)
        return out
