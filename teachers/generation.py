"""What every text-generating teacher node shares (``llm``: transformers in process; ``openai``: any
OpenAI-compatible server): the common config fields, parsing a generation into think and answer,
the top-k soft-label layout, and choosing one of several drafts (rejection sampling).

Both nodes build one *row* per generated draft with ``generation_row`` and turn the drafts of one
input into its output with ``assemble``, so their records have the same keys and the student's
``llm`` head trains on either unchanged:

    prompt, num_prompt_tokens, text, think, answer, truncated, finish_reason, num_generated_tokens,
    token_ids (T,) int32, topk_ids (T, k) int32, topk_logprobs (T, k) float16 sorted descending,
    drafts (num_samples > 1 only): [{text, answer, mean_logprob, votes, kept, finish_reason, ...}]

This module is not in ``teachers/nodes/`` because every module there registers a node type.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from distillery.teachers.base import NodeConfig
from distillery.text import normalize_answer, parse_output

Selection = Literal["majority", "logprob"]


class GenerationConfig(NodeConfig):
    """Settings shared by the nodes that generate text (a subclass adds ``type`` and its model)."""

    prompt: str = Field(description="Template citing {request.question} and {node.field}.")
    system: str | None = Field(None, description="Optional system message (the llm node: with chat: true).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (end generation).")
    num_samples: int = Field(1, ge=1, le=64, description="Drafts per input (rejection sampling).")
    selection: Selection = Field("majority", description="How the kept draft is chosen when num_samples > 1.")
    think_start: str = "<think>"
    think_end: str = "</think>"
    seed: int = 0

    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = ("prompt",)
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"prompt", "text", "think", "answer"})

    @model_validator(mode="after")
    def _stop_strings_non_empty(self) -> "GenerationConfig":
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")
        return self


@dataclass
class Draft:
    text: str
    answer: str
    mean_logprob: float  # mean over generated tokens of the teacher's log-prob (-inf: unknown)
    truncated: bool


def select_draft(drafts: list[Draft], selection: Selection) -> tuple[int, list[int]]:
    """(index of the kept draft, votes per draft).

    Only the best tier of drafts competes (and votes): finished drafts with an answer, else
    finished ones, else all; the others get 0 votes, so a truncated draft never wins when a
    finished one exists. ``majority``: most votes for the draft's normalized answer, ties broken
    by the higher mean log-prob (self-consistency, Wang et al. 2022). ``logprob``: highest mean
    log-prob."""
    finished = [i for i, d in enumerate(drafts) if not d.truncated]
    answered = [i for i in finished if normalize_answer(drafts[i].answer)]
    eligible = answered or finished or list(range(len(drafts)))
    counts = Counter(normalize_answer(drafts[i].answer) for i in eligible)
    votes = [counts[normalize_answer(d.answer)] if i in eligible else 0 for i, d in enumerate(drafts)]
    if selection == "majority":
        kept = max(eligible, key=lambda i: (votes[i], drafts[i].mean_logprob))
    else:
        kept = max(eligible, key=lambda i: drafts[i].mean_logprob)
    return kept, votes


def topk_layout(ids: Any, logprobs: Any) -> dict[str, np.ndarray]:
    """The stored soft-label layout from (T, k) ids and log-probs: ids int32, log-probs float16,
    each row sorted by descending log-prob."""
    ids, lp = np.asarray(ids).reshape(len(ids), -1), np.asarray(logprobs, dtype=np.float32).reshape(len(ids), -1)
    order = np.argsort(-lp, axis=1, kind="stable")  # (T, k)
    return {"topk_ids": np.take_along_axis(ids, order, 1).astype(np.int32),
            "topk_logprobs": np.take_along_axis(lp, order, 1).astype(np.float16)}


def generation_row(text: str, finish_reason: str, cfg: GenerationConfig, *, think: str | None = None,
                   num_generated_tokens: int, mean_logprob: float, **labels: Any) -> dict[str, Any]:
    """One generated draft parsed: think and answer from ``text`` (``think`` given: a trace the
    server returned apart, and ``text`` holds the rest), the truncation flag, and ``labels``
    (``token_ids``, ``topk_ids``, ``topk_logprobs`` and any extra per-draft field) as given."""
    parsed_think, answer = parse_output(text, cfg.think_start, cfg.think_end, cfg.stop)
    if think is not None:
        text = f"{cfg.think_start}{think}{cfg.think_end}{text}"
    return {
        "text": text,
        "think": parsed_think if think is None else think.strip(),
        "answer": answer,
        **labels,
        "truncated": finish_reason == "length",
        "finish_reason": finish_reason,
        "num_generated_tokens": num_generated_tokens,
        "mean_logprob": mean_logprob,
    }


DRAFT_EXTRAS = ("usage", "seconds", "system_fingerprint")
"""Per-draft fields a node may add to its rows; kept in each ``drafts`` entry when present."""


def assemble(head: dict[str, Any], rows: list[dict[str, Any]], selection: Selection) -> dict[str, Any]:
    """The output for one input: ``head`` (prompt, ...) and the kept draft's fields, plus every
    draft (its text, answer, mean log-prob, votes) when there are several."""
    if len(rows) == 1:
        return head | {k: v for k, v in rows[0].items() if k != "mean_logprob"}
    drafts = [Draft(r["text"], r["answer"], r["mean_logprob"], r["truncated"]) for r in rows]
    kept, votes = select_draft(drafts, selection)
    out = head | {k: v for k, v in rows[kept].items() if k != "mean_logprob"}
    out["drafts"] = [
        {"text": r["text"], "answer": r["answer"], "mean_logprob": r["mean_logprob"], "votes": votes[n],
         "kept": n == kept, "finish_reason": r["finish_reason"], **{k: r[k] for k in DRAFT_EXTRAS if k in r}}
        for n, r in enumerate(rows)
    ]
    return out
