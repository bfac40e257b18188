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
from torch import Tensor, nn

from distillery.students.model import losses
from distillery.students.model.config import StudentConfig


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
    from distillery.students.model import detection  # noqa: F401  (the yolo head, in its own module, registers on import)

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
        B = batch["question_ids"].shape[0]
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
        B, device = batch["question_ids"].shape[0], batch["question_ids"].device
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
