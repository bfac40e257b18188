"""One head per teacher node, chosen by the node's type from a registry (``yolo``, ``rag``, ``llm``).

A head gets the shared features of one forward pass (``Features``: the conv pyramid and the text
decoder's hidden states) and returns its raw outputs; ``loss`` compares them with the node's
targets from ``students.data.collate``; ``postprocess`` turns one input's outputs into the
teacher node's output format (JSON-ready). Heads that read the text decoder ask for their own
tokens in its sequence through ``segments`` (a retrieval query token; the answer and rationale
tasks). Lookups fail with the list of known keys; configs never name code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from students import losses
from students.config import StudentConfig
from students.masks import instance_masks


@dataclass
class Segment:
    """Tokens a head appends to the decoder's sequence after [image tokens + question]: they see
    the prefix and (causally) each other, never another segment."""

    name: str
    embeds: Tensor  # (B, L, d)
    valid: Tensor  # (B, L) bool


@dataclass
class Features:
    maps: dict[str, Tensor]  # "p4" (B, C4, S/4, S/4) (segmentation only), "p8", "p16"
    text: dict[str, Tensor] = field(default_factory=dict)  # segment name -> hidden (B, L, d)
    lm_head: Callable[[Tensor], Tensor] | None = None  # hidden (..., d) -> logits (..., V)


HEADS: dict[str, type["Head"]] = {}


def register_head(key: str):
    def wrap(cls):
        if key in HEADS and HEADS[key] is not cls:
            raise ValueError(f"head type {key!r} is already registered by {HEADS[key]}")
        HEADS[key] = cls
        return cls
    return wrap


def head_class(key: str) -> type["Head"]:
    """The head for a teacher node type, failing with the known keys."""
    try:
        return HEADS[key]
    except KeyError:
        raise KeyError(f"no student head for node type {key!r}; known: {', '.join(sorted(HEADS))}") from None


class Head(nn.Module):
    """Base: ``name`` is the teacher node's name, ``node`` its schema entry."""

    generative = False  # True: the model decodes text for this head at inference
    reads_text = True  # False: runs on the conv features alone, before the text decoder

    def __init__(self, name: str, node: dict[str, Any], cfg: StudentConfig):
        super().__init__()
        self.name, self.node, self.cfg = name, node, cfg

    def segments(self, batch: dict, embed: nn.Embedding, echo: bool = False) -> list[Segment]:
        """``echo``: a text-only echo step (see ``MultimodalStudent.forward``), which may skip
        auxiliary tasks."""
        return []

    def mask_areas(self, out: dict[str, Tensor]) -> Tensor:
        """Per location, the share of the image its instance mask covers (logit > 0 inside its own
        box, on the prototypes' stride-4 grid): (B, P). Static shapes, so it traces into ONNX."""
        logits = torch.einsum("bpm,bmk->bpk", out["coef"].float(), out["protos"].float().flatten(2))  # (B, P, K)
        px, py = self.proto_points[:, 0], self.proto_points[:, 1]  # (K,)
        b = out["boxes"][..., None]  # (B, P, 4, 1)
        inside = (px >= b[:, :, 0]) & (px <= b[:, :, 2]) & (py >= b[:, :, 1]) & (py <= b[:, :, 3])  # (B, P, K)
        return ((logits > 0) & inside).float().mean(-1)

    def large_counts(self, out: dict[str, Tensor], target: dict[str, Tensor] | None) -> Tensor:
        """Large objects per class (B, C) (mask area >= ``large_area``): the teacher's masks' in
        training, the head's own at inference (like ``counts``)."""
        with torch.no_grad():
            scores, classes, _ = self.peak_scores(out["cls"])
            kept = scores > self.thresholds()[0]  # (B, P)
            if "coef" in out:  # (a text-only echo step's empty outputs have no masks: nothing seen)
                kept = kept & (self.mask_areas(out) >= self.large_area)
            else:
                kept = torch.zeros_like(kept)
            own = scores.new_zeros(scores.shape[0], self.num_classes).scatter_add_(1, classes, kept.float())  # (B, C)
            if target is None:
                return own
            valid = (target["valid"] & target["mask"][:, None] & (target["areas"] >= self.large_area)).float()
            teacher = torch.zeros_like(own).scatter_add_(1, target["probs"].argmax(-1), valid)  # (B, C)
            return torch.where(target["mask"][:, None], teacher, own)

    def prefix_len(self) -> int:
        """Most tokens ``prefix_embeds`` adds (sizes the decoder's position table)."""
        return 0

    def prefix_embeds(self, out: dict[str, Tensor], target: dict | None, tokenizer,
                      embed: nn.Embedding) -> tuple[Tensor, Tensor] | None:
        """Embeddings (B, L, d) and validity (B, L) this head puts before the question, or None."""
        return None

    def forward(self, feats: Features) -> dict[str, Tensor]:
        raise NotImplementedError

    def empty_outputs(self, B: int, device: torch.device) -> dict[str, Tensor]:
        """A conv head's outputs for a text-only (echo) step, which runs no vision: nothing seen."""
        raise NotImplementedError(f"{type(self).__name__} has no empty outputs for text-only steps")

    def loss(self, out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        raise NotImplementedError


def padded(rows: list[list[int]], device) -> Tensor:
    """Ragged token-id lists -> (N, L) long, padded with -1."""
    L = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def mean_embed(embed: nn.Embedding, ids: Tensor) -> Tensor:
    """(N, L) ids padded with -1 -> (N, d): the mean of each row's token embeddings."""
    valid = (ids >= 0).to(embed.weight.dtype)[..., None]  # (N, L, 1)
    return (embed(ids.clamp(min=0)) * valid).sum(1) / valid.sum(1).clamp(min=1)


def conv_bn_act(c1: int, c2: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU(inplace=True))


# ---------------------------------------------------------------------------------------------
# yolo -> detection (+ instance masks)
# ---------------------------------------------------------------------------------------------

@register_head("yolo")
class DetectionHead(Head):
    """Anchor-free head on the stride-8 features: per location class scores (CenterNet heatmaps
    peaking at the teacher's per-class scores) and box distances l, t, r, b (trained at FCOS
    positives); with task segment, YOLACT prototypes (stride 4) and per-location coefficients."""

    reads_text = False

    def __init__(self, name: str, node: dict[str, Any], cfg: StudentConfig):
        super().__init__(name, node, cfg)
        c4, c8, w = cfg.vision_widths[1], cfg.vision_widths[2], cfg.det_width
        self.num_classes, self.segment = int(node["num_classes"]), node.get("task") == "segment"
        self.tower = nn.Sequential(conv_bn_act(c8, w), conv_bn_act(w, w))
        self.cls = nn.Conv2d(w, self.num_classes, 1)
        self.box = nn.Conv2d(w, 4, 1)
        nn.init.constant_(self.cls.bias, -4.6)  # prior 0.01 (RetinaNet)
        if self.segment:
            self.coef = nn.Conv2d(w, cfg.num_prototypes, 1)
            self.proto = nn.Sequential(conv_bn_act(c4, c4), nn.Conv2d(c4, cfg.num_prototypes, 1))
        # teacher node's large_area: the slots (or summary) also carry how many objects per class
        # have a mask that covers at least this fraction of the image
        self.large_area = node.get("large_area") if self.segment else None
        if cfg.detection_summary == "slots":
            self.count_vec = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
            if self.large_area is not None:
                self.large_vec = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
                self.large_embed = nn.Embedding(cfg.max_count + 1, cfg.d_model)
                nn.init.normal_(self.large_embed.weight, std=0.02)
        if self.large_area is not None:
            q = cfg.image_size // 4  # the prototypes' grid
            c = (torch.arange(q, dtype=torch.float32) + 0.5) / q
            py, px = torch.meshgrid(c, c, indexing="ij")
            self.register_buffer("proto_points", torch.stack([px, py], -1).view(-1, 2), persistent=False)  # (K, 2)
        n = cfg.image_size // 8
        centers = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        gy, gx = torch.meshgrid(centers, centers, indexing="ij")
        self.register_buffer("points", torch.stack([gx, gy], -1).view(-1, 2), persistent=False)  # (P, 2)
        self.stride = 1.0 / n  # one stride, normalized

    def forward(self, feats: Features) -> dict[str, Tensor]:
        x = self.tower(feats.maps["p8"])  # (B, w, S/8, S/8)
        flat = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  (B, c, H, W) -> (B, P, c)
        dist = F.softplus(flat(self.box(x)).float()) * self.stride  # (B, P, 4) normalized l, t, r, b
        boxes = torch.cat([self.points - dist[..., :2], self.points + dist[..., 2:]], -1)  # (B, P, 4) xyxy
        out = {"cls": flat(self.cls(x)), "boxes": boxes}  # (B, P, C) logits, (B, P, 4)
        if self.segment:
            out["coef"] = flat(self.coef(x))  # (B, P, M)
            out["protos"] = self.proto(feats.maps["p4"])  # (B, M, S/4, S/4)
        return out

    def empty_outputs(self, B: int, device: torch.device) -> dict[str, Tensor]:
        return {"cls": torch.full((B, len(self.points), self.num_classes), -30.0, device=device)}

    # -- what the text decoder reads: detections per class ------------------------------------
    def thresholds(self) -> tuple[float, float, int]:
        node, cfg = self.node, self.cfg
        conf = cfg.det_conf if cfg.det_conf is not None else node.get("conf", 0.25)
        iou = cfg.det_iou if cfg.det_iou is not None else node.get("iou", 0.7)
        return conf, iou, cfg.max_det or node.get("max_det", 100)

    def peak_scores(self, cls_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Heatmap peaks (3 x 3 local maxima, CenterNet): per location the best peak class and
        its score, and every class score. cls_logits (B, P, C) -> (B, P), (B, P), (B, P, C)."""
        probs = cls_logits.float().sigmoid()  # (B, P, C)
        B, P, C = probs.shape
        n = self.cfg.image_size // 8  # the stride-8 grid (P = n * n), static for tracing
        grid = probs.transpose(1, 2).reshape(B, C, n, n)
        peaks = (grid == F.max_pool2d(grid, 3, 1, 1)).reshape(B, C, P).transpose(1, 2)  # (B, P, C)
        scores, classes = (probs * peaks).max(-1)
        return scores, classes, probs

    def counts(self, out: dict[str, Tensor], target: dict[str, Tensor] | None) -> Tensor:
        """Detections per class (B, C): the teacher's where the batch has them (training), else
        the head's own (peaks above the confidence threshold)."""
        with torch.no_grad():
            scores, classes, _ = self.peak_scores(out["cls"])
            kept = (scores > self.thresholds()[0]).float()  # (B, P)
            own = scores.new_zeros(scores.shape[0], self.num_classes).scatter_add_(1, classes, kept)  # (B, C)
            if target is None:
                return own
            valid = (target["valid"] & target["mask"][:, None]).float()  # (B, N)
            labels = target["probs"].argmax(-1)  # (B, N): a teacher box's class is its best score's
            teacher = torch.zeros_like(own).scatter_add_(1, labels, valid)  # (B, C)
            return torch.where(target["mask"][:, None], teacher, own)

    def prefix_len(self) -> int:
        mode = self.cfg.detection_summary
        return self.num_classes if mode == "slots" else self.cfg.max_summary_tokens if mode == "text" else 0

    def prefix_embeds(self, out: dict[str, Tensor], target: dict | None, tokenizer,
                      embed: nn.Embedding) -> tuple[Tensor, Tensor] | None:
        """What the text decoder reads of the detections (``detection_summary``): per-class slots,
        or the summary text, from the teacher's counts in training and the head's own at inference."""
        mode = self.cfg.detection_summary
        if mode == "none":
            return None
        counts = self.counts(out, target).round()  # (B, C)
        large = self.large_counts(out, target).round() if self.large_area is not None else None  # (B, C)
        if mode == "slots":
            return (self.slots(counts, tokenizer, embed, large),
                    torch.ones(counts.shape, dtype=torch.bool, device=counts.device))
        ids, valid = self.summary_ids(counts, tokenizer, large)
        return embed(ids.to(counts.device)), valid.to(counts.device)

    def slots(self, counts: Tensor, tokenizer, embed: nn.Embedding, large: Tensor | None = None) -> Tensor:
        """(B, C) counts -> (B, C, d): class c's slot = its name's embedding + the embedding of the
        number n + n * ``count_vec`` (+ with ``large_area``, a learned embedding of its number of
        large objects + that number * ``large_vec``). Fixed positions and every class present
        (zeros too), so a question's classes are found by what they are, and sums are linear."""
        names, numbers = self.token_tables(tokenizer, counts.device)  # (C, Ln), (max_count + 1, Lk) ids, -1 pad
        n = counts.long().clamp(0, self.cfg.max_count)  # (B, C)
        slot = (mean_embed(embed, names)[None] + mean_embed(embed, numbers)[n]
                + counts.clamp(max=self.cfg.max_count)[..., None] * self.count_vec)
        if large is not None:
            k = large.clamp(max=self.cfg.max_count)
            slot = slot + self.large_embed(k.long()) + k[..., None] * self.large_vec
        return slot

    def token_tables(self, tokenizer, device: torch.device) -> tuple[Tensor, Tensor]:
        """Token ids of every class name and of the numbers 0..max_count (padded with -1),
        built once per tokenizer: a name or a number may be several tokens."""
        if getattr(self, "_tables", None) is None or self._tables[0].device != device:
            names = self.node.get("class_names") or [str(c) for c in range(self.num_classes)]
            names = list(names) + [str(c) for c in range(len(names), self.num_classes)]
            ids = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] or [0] for t in texts]  # noqa: E731
            self._tables = tuple(padded(ids(texts), device) for texts in
                                 (names[: self.num_classes], [str(k) for k in range(self.cfg.max_count + 1)]))
        return self._tables

    def summary_ids(self, counts: Tensor, tokenizer, large: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The detection summary ("blue square x1, red circle x2 (1 large)", ``describe_detections``)
        as token ids (B, L) and validity: what the teacher LLM read in its prompt."""
        from teachers.yolo import describe_detections

        names = self.node.get("class_names", [])
        name = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
        big = large.long().tolist() if large is not None else [None] * len(counts)
        rows = []
        for row, brow in zip(counts.long().tolist(), big):  # (C,) per input
            labels = [name(c) for c, n in enumerate(row) for _ in range(n)]
            large_labels = None if brow is None else [name(c) for c, n in enumerate(brow) for _ in range(n)]
            rows.append(tokenizer(describe_detections(labels, large_labels), add_special_tokens=False)["input_ids"]
                        [: self.cfg.max_summary_tokens])
        ids = padded(rows, "cpu")
        return ids.clamp(min=0), ids >= 0

    def loss(self, out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        mask, valid = target["mask"], target["valid"] & target["mask"][:, None]  # (B,), (B, N)
        boxes, cfg = target["boxes"], self.cfg
        matched = losses.fcos_assign(self.points, boxes, valid, self.stride, cfg.det_center_radius)  # (B, P)
        heat = losses.center_heatmaps(self.points, boxes, valid, target["probs"], self.stride)  # (B, P, C)
        total = losses.detection_loss(out["cls"], out["boxes"], self.points, matched, heat, boxes, mask,
                                      valid.sum(), cfg.box_weight)
        if self.segment:
            pos = (matched >= 0) & (target["has_masks"] & mask)[:, None]
            m = losses.mask_loss(out["coef"], out["protos"], matched, pos, target["masks"].float() / 255, boxes)
            total = total + cfg.mask_weight * m
        return total

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        """Heatmap peaks (3 x 3 local maxima, CenterNet) above the confidence threshold, class-aware
        NMS as a safety net, masks at the original image size as COCO RLE (``students.masks``)."""
        from teachers.yolo import describe_detections, large_labels, mask_to_rle

        conf, iou, max_det = self.thresholds()
        scores, classes, probs = (t[0] for t in self.peak_scores(out["cls"][i:i + 1]))  # (P,), (P,), (P, C)
        keep = (scores > conf).nonzero().view(-1)
        keep = keep[scores[keep].argsort(descending=True)[: max(4 * max_det, 100)]]
        boxes = out["boxes"][i].float().clamp(0, 1)
        keep = keep[batched_nms(boxes[keep], scores[keep], classes[keep], iou)][:max_det]
        names = self.node.get("class_names", [])
        labels = [names[c] if c < len(names) else str(c) for c in classes[keep].tolist()]
        h, w = image_size
        res = {"boxes": boxes[keep].tolist(), "classes": classes[keep].tolist(), "scores": scores[keep].tolist(),
               "class_probs": probs[keep].tolist(), "labels": labels, "masks": [],
               "summary": describe_detections(labels), "count": len(labels), "image_size": [h, w]}
        if self.segment:
            logits = torch.einsum("nm,mhw->nhw", out["coef"][i][keep].float(), out["protos"][i].float())
            masks = list(instance_masks(logits.cpu().numpy(), boxes[keep].cpu().numpy(), (h, w)))
            res["masks"] = [mask_to_rle(m) for m in masks]
            res["areas"] = [round(float(m.sum()) / (h * w), 6) for m in masks]
            if self.large_area is not None:
                res["summary"] = describe_detections(labels, large_labels(labels, res["areas"], self.large_area))
        return res


# ---------------------------------------------------------------------------------------------
# rag -> retrieval over the knowledge base (no retriever at run time)
# ---------------------------------------------------------------------------------------------

@register_head("rag")
class RetrievalHead(Head):
    """Scores over the knowledge base's documents from a query token that reads the image and
    the question in the decoder."""

    def __init__(self, name: str, node: dict[str, Any], cfg: StudentConfig):
        super().__init__(name, node, cfg)
        self.query = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, len(node["doc_ids"]))

    def segments(self, batch: dict, embed: nn.Embedding, echo: bool = False) -> list[Segment]:
        B = batch["images"].shape[0]
        valid = torch.ones(B, 1, dtype=torch.bool, device=self.query.device)
        return [Segment(f"{self.name}/query", self.query.expand(B, 1, -1), valid)]

    def forward(self, feats: Features) -> dict[str, Tensor]:
        h = feats.text[f"{self.name}/query"][:, 0]  # (B, d)
        return {"logits": self.out(self.norm(h))}  # (B, D)

    def loss(self, out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        return losses.retrieval_loss(out["logits"], target["doc_idx"], target["scores"], target["mask"],
                                     self.cfg.retrieval_temperature, self.cfg.retrieval_ce_weight)

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        """Top-k documents (k as the teacher's) and the student's probability for each."""
        probs = out["logits"][i].float().softmax(-1)  # (D,)
        k = min(int(self.node.get("top_k", 3)), probs.numel())
        scores, idx = probs.topk(k)
        doc_ids = self.node["doc_ids"]
        return {"ids": [doc_ids[j] for j in idx.tolist()], "scores": scores.tolist()}


# ---------------------------------------------------------------------------------------------
# llm -> answer text (distilling step by step)
# ---------------------------------------------------------------------------------------------

@register_head("llm")
class AnswerHead(Head):
    """Two tasks on the shared decoder, each behind a learned task token (Hsieh et al. 2023,
    distilling step by step): [answer] -> the teacher's answer, [rationale] -> the teacher's whole
    generated text (reasoning trace + answer). Both are trained; inference runs [answer] only."""

    generative = True

    def __init__(self, name: str, node: dict[str, Any], cfg: StudentConfig):
        super().__init__(name, node, cfg)
        self.task = nn.Parameter(torch.randn(2, cfg.d_model) * 0.02)  # [answer], [rationale]

    def task_token(self, which: int, B: int) -> Tensor:
        return self.task[which].expand(B, 1, -1)  # (B, 1, d)

    def segments(self, batch: dict, embed: nn.Embedding, echo: bool = False) -> list[Segment]:
        """Training: [answer] and [rationale] with teacher forcing (echo steps: [answer] alone, the
        long rationale is trained in the full steps); inference: the [answer] task token."""
        B, device = batch["images"].shape[0], batch["images"].device
        target = batch.get("targets", {}).get(self.name)
        if target is None:  # inference: the [answer] task token; the model decodes from it
            ones = torch.ones(B, 1, dtype=torch.bool, device=device)
            return [Segment(f"{self.name}/answer", self.task_token(0, B), ones)]
        segs = []
        for which, key in ((0, "answer"), (1, "rationale"))[: 1 if echo else 2]:
            ids, valid = target[f"{key}_ids"], target[f"{key}_mask"]  # (B, L)
            emb = torch.cat([self.task_token(which, B), embed(ids[:, :-1])], 1)  # (B, L, d): teacher forcing
            ok = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), valid[:, :-1]], 1)
            segs.append(Segment(f"{self.name}/{key}", emb, ok))
        return segs

    def forward(self, feats: Features) -> dict[str, Tensor]:
        return {f"{key}_logits": feats.lm_head(feats.text[f"{self.name}/{key}"])  # (B, L, V)
                for key in ("answer", "rationale") if f"{self.name}/{key}" in feats.text}

    def loss(self, out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        cfg = self.cfg
        kd = dict(temperature=cfg.kd_temperature, alpha=cfg.kd_alpha, kind=cfg.kd_kind, beta=cfg.kd_beta)
        total = 0.0
        for key, weight in (("answer", 1.0), ("rationale", cfg.rationale_weight)):
            if f"{key}_logits" not in out:  # (an echo step has no rationale)
                continue
            label_mask = target[f"{key}_mask"] & target["mask"][:, None]  # (B, L)
            loss = losses.distill_loss(out[f"{key}_logits"], target[f"{key}_ids"], label_mask,
                                       target[f"{key}_topk_ids"], target[f"{key}_topk_logprobs"],
                                       target[f"{key}_kd_mask"], **kd)
            total = total + weight * loss
        return total

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        return {"answer": out["answer"][i]}
