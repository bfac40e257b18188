"""Greedy decoding of the answer, shared by the torch student and its ONNX Runtime export."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from distillery.students.model.config import StudentConfig


def answer_limit(cfg: StudentConfig, max_new_tokens: int | None = None) -> int:
    """Tokens a greedy answer may take: the request's limit, never above the config's."""
    return min(max_new_tokens or cfg.max_answer_tokens, cfg.max_answer_tokens)


def greedy_decode(logits: Tensor, step: Callable[[Tensor, Tensor], Tensor], pos: Tensor, eos_ids: list[int],
                  limit: int, done: Tensor | None = None) -> list[list[int]]:
    """Greedy decoding from the first token's logits (B, V); ``step(tokens (B,), positions (B,))``
    returns the next logits (the caller keeps the cache). A row stops at an eos id (cut from it),
    every row at ``limit`` tokens; ``done`` (B,) marks rows that need no more tokens. Shared by
    the torch and the ONNX Runtime students."""
    eos = torch.tensor(list(eos_ids), device=logits.device)
    tokens = []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device) if done is None else done.clone()
    for t in range(limit):
        nxt = logits.argmax(-1)  # (B,)
        tokens.append(nxt)
        done |= torch.isin(nxt, eos)
        if t == limit - 1 or bool(done.all()):
            break
        logits = step(nxt, pos + t)
    rows = []
    for row in torch.stack(tokens, 1).tolist():
        cut = next((j for j, tok in enumerate(row) if tok in eos_ids), len(row))
        rows.append(row[:cut])
    return rows
