"""The answer head (teacher node type ``llm``): the teacher's answer and its reasoning trace as two
tasks on the student's text decoder (distilling step by step), trained on the teacher's tokens
with their stored top-k log-probabilities as soft labels."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.students.model import losses
from distillery.students.model.config import StudentConfig
from distillery.students.model.heads.base import (Features, Head, Output, Segment, Target, TargetContext,
                                                  lengths_mask, pad, present_mask, register_head)
from distillery.students.model.scores import answer_agreement


@register_head("llm")
class AnswerHead(Head):
    """Two tasks on the shared decoder, each behind a learned task token (Hsieh et al. 2023,
    distilling step by step): [answer] -> the teacher's answer, [rationale] -> the teacher's whole
    generated text (reasoning trace + answer). Both are trained; inference runs [answer] only."""

    generative = True
    OUTPUT_KEY = "answer"

    @classmethod
    def schema_entry(cls, name: str, config: Any, outputs: list[Output]) -> dict[str, Any]:
        return {"model": config.model, "stop": list(config.stop), "think_start": config.think_start,
                "think_end": config.think_end}

    @classmethod
    def tokenizer_source(cls, node: dict[str, Any]) -> str | None:
        return node["model"]  # the teacher LLM's tokenizer, so per-token soft labels line up

    @classmethod
    def token_ids(cls, output: Output) -> list[Any]:
        return [output.get(key, []) for key in ("token_ids", "topk_ids")]

    @classmethod
    def target_builder(cls, name: str, node: dict[str, Any], ctx: TargetContext
                       ) -> Callable[[Output | None], Target | None]:
        if node.get("cross_tokenizer"):
            return lambda out: None if out is None else cross_tokenizer_target(out, ctx.tokenizer, ctx.text, ctx.cfg)
        return lambda out: None if out is None else llm_target(out, ctx.tokenizer, ctx.text, ctx.cfg)

    @classmethod
    def collate(cls, entries: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        return collate_llm(entries)

    @classmethod
    def metrics(cls, preds: Sequence[Output], refs: Sequence[Output], *, k: int = 5,
                truth: bool = False) -> dict[str, float]:
        """Exact match of the normalised answers."""
        return {"answer_em": answer_agreement([p.get("answer", "") for p in preds],
                                              [r.get("answer", "") for r in refs])}

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
                                       target[f"{key}_kd_mask"], **kd,
                                       aligned="sorted" if self.node.get("cross_tokenizer") else "ids")
            total = total + weight * loss
        return total

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        return {"answer": out["answer"][i]}


# -- targets ---------------------------------------------------------------------------------------

def answer_start(ids: np.ndarray, answer: str, tok, eos_ids: list[int]) -> int | None:
    """Where the answer's tokens start when they are the tail of the generation (before its
    eos), so the teacher's soft labels for them can be used; None when they are not."""
    body = ids[:-1] if int(ids[-1]) in eos_ids else ids
    for text in (answer, " " + answer):
        cand = tok(text, add_special_tokens=False)["input_ids"]
        if cand and len(body) >= len(cand) and body[-len(cand):].tolist() == list(cand):
            return len(body) - len(cand)
    return None


def llm_target(out: dict, tok, text: dict, cfg: StudentConfig) -> dict[str, Tensor] | None:
    """Rationale = the teacher's generated tokens with their top-k soft labels; answer = the
    tail of those tokens that spells the answer (+ eos), with soft labels where they line up.
    None (no target) for a truncated generation or an empty answer."""
    answer = str(out.get("answer", "")).strip()
    ids = np.asarray(out.get("token_ids", []), dtype=np.int64).reshape(-1)  # (T,)
    if out.get("truncated") or not answer or ids.size == 0:
        return None
    topk_ids = np.asarray(out.get("topk_ids", np.zeros((0, 1))), dtype=np.int64)  # (T, k)
    topk_lp = np.asarray(out.get("topk_logprobs", np.zeros((0, 1))), dtype=np.float16)  # (T, k)
    has_kd = topk_ids.ndim == 2 and len(topk_ids) == len(ids) and topk_lp.shape == topk_ids.shape
    if not has_kd:
        topk_ids, topk_lp = _no_soft_labels(len(ids), 1)
    r = slice(0, cfg.max_rationale_tokens)
    rationale = _seq("rationale", ids[r], topk_ids[r], topk_lp[r], np.full(len(ids[r]), has_kd))
    eos_ids, k = text["eos_ids"], topk_ids.shape[1]
    start = answer_start(ids, answer, tok, eos_ids)
    if start is None:  # the answer's tokens are not the generation's tail: hard labels only
        a_ids = np.asarray(tok(answer, add_special_tokens=False)["input_ids"], np.int64)
        (a_tk, a_lp), kd = _no_soft_labels(len(a_ids), k), np.zeros(len(a_ids), bool)
    else:
        a_ids, a_tk, a_lp, kd = ids[start:], topk_ids[start:], topk_lp[start:], np.full(len(ids) - start, has_kd)
    if not len(a_ids) or int(a_ids[-1]) not in eos_ids:  # the student must learn to stop: eos, no soft label
        a_ids, kd = np.append(a_ids, eos_ids[0]), np.append(kd, False)
        pad_tk, pad_lp = _no_soft_labels(1, k)
        a_tk, a_lp = np.concatenate([a_tk, pad_tk]), np.concatenate([a_lp, pad_lp])
    m = slice(0, cfg.max_answer_tokens)
    return rationale | _seq("answer", a_ids[m], a_tk[m], a_lp[m], kd[m])


def cross_tokenizer_target(out: dict, tok, text: dict, cfg: StudentConfig) -> dict[str, Tensor] | None:
    """When the student has its own tokenizer: rationale = the student tokenizer's ids of the
    teacher's whole text (+ eos), with the teacher's top-k log-probs of position i as the soft label
    of position i (the universal logit distillation loss compares sorted probabilities, so ids need
    not match; positions past the shorter sequence have none); answer = its ids, hard labels."""
    answer = str(out.get("answer", "")).strip()
    if out.get("truncated") or not answer:
        return None
    eos = text["eos_ids"][0]
    ids = np.asarray(tok(str(out.get("text", "")), add_special_tokens=False)["input_ids"] + [eos], np.int64)
    topk_lp = np.asarray(out.get("topk_logprobs", np.zeros((0, 1))), dtype=np.float16)  # (T_teacher, k)
    k = topk_lp.shape[1] if topk_lp.ndim == 2 and len(topk_lp) else 1
    n = min(len(ids), len(topk_lp)) if topk_lp.ndim == 2 else 0
    lp = np.zeros((len(ids), k), np.float16)
    lp[:n] = topk_lp[:n]
    r = slice(0, cfg.max_rationale_tokens)
    rationale = _seq("rationale", ids[r], np.zeros((len(ids), k), np.int64)[r], lp[r], (np.arange(len(ids)) < n)[r])
    a_ids = np.asarray(tok(answer, add_special_tokens=False)["input_ids"] + [eos], np.int64)
    (a_tk, a_lp), m = _no_soft_labels(len(a_ids), k), slice(0, cfg.max_answer_tokens)
    return rationale | _seq("answer", a_ids[m], a_tk[m], a_lp[m], np.zeros(len(a_ids), bool)[m])


def _no_soft_labels(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, k), np.int64), np.zeros((n, k), np.float16)  # top-k ids, log-probs (masked out)


def _seq(key: str, ids, topk_ids, topk_lp, kd) -> dict[str, torch.Tensor]:
    return {f"{key}_ids": torch.as_tensor(ids, dtype=torch.long), f"{key}_topk_ids": torch.as_tensor(topk_ids),
            f"{key}_topk_logprobs": torch.as_tensor(topk_lp), f"{key}_kd_mask": torch.as_tensor(kd, dtype=torch.bool)}


def _fit_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k') -> (T, k): the first k columns, zero-padded on the right (padding = no soft label)."""
    return F.pad(x[:, :k], (0, max(0, k - x.shape[1])))


def _batch_k(ts: list[dict | None]) -> int:
    """The batch's top-k: the smallest k among the sequences that carry soft labels (kd_mask.any()).
    Sequences without any (no stored log-probs: k = 1) are padded to it, never cut it."""
    ks = [t[f"{key}_topk_ids"].shape[-1] for t in ts if t is not None for key in ("answer", "rationale")
          if t[f"{key}_kd_mask"].any()]
    return min(ks or [1])


def collate_llm(entries: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """The answer and rationale sequences of a batch, padded, at the batch's top-k."""
    ts = [e["target"] if e["present"] else None for e in entries]
    k = _batch_k(ts)
    out = {"mask": present_mask(entries)}
    for key in ("answer", "rationale"):
        ids = [t[f"{key}_ids"] if t is not None else torch.zeros(0, dtype=torch.long) for t in ts]
        tk = [_fit_k(t[f"{key}_topk_ids"], k) if t is not None else torch.zeros(0, k, dtype=torch.long) for t in ts]
        lp = [_fit_k(t[f"{key}_topk_logprobs"], k) if t is not None else torch.zeros(0, k, dtype=torch.float16)
              for t in ts]
        kd = [t[f"{key}_kd_mask"] if t is not None else torch.zeros(0, dtype=torch.bool) for t in ts]
        out[f"{key}_ids"] = pad(ids, 0, torch.long)
        out[f"{key}_mask"] = lengths_mask(ids, out[f"{key}_ids"].shape[1])
        out[f"{key}_topk_ids"] = pad(tk, 0, torch.long)
        out[f"{key}_topk_logprobs"] = pad(lp, 0.0, torch.float16)
        out[f"{key}_kd_mask"] = pad(kd, False, torch.bool)
    return out
