"""`llm` node: a transformers causal LM that reasons (``<think>…</think>``) and answers.

run: refuse prompts that do not fit the context -> one batched ``generate`` (greedy or sampled,
``num_samples`` drafts per prompt) -> per draft: cut at EOS / stop string, top-k log-probs of the
raw model (``out.logits``, before temperature / top-p) -> parse think and answer -> with several
drafts, keep one by majority vote or by mean log-prob (self-consistency, rejection sampling).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from distillery.text import normalize_answer, parse_output
from distillery.teachers.base import ItemError, NodeConfig, NodeInput, TeacherNode, path_identity, register_node


class LLMConfig(NodeConfig):
    """Reasoning LLM teacher; records text, trace, answer, token ids and top-k log-probs."""

    type: Literal["llm"] = "llm"
    model: str = Field(description="transformers model: local folder or hub id.")
    revision: str | None = Field(None, description="Hub revision (commit) for hub ids.")
    prompt: str = Field(description="Template citing {request.question} and {node.field}.")
    max_new_tokens: int = Field(256, ge=1, description="Length limit; hitting it flags truncation.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (end generation).")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    num_samples: int = Field(1, ge=1, le=64, description="Drafts per input (rejection sampling).")
    selection: Literal["majority", "logprob"] = Field(
        "majority", description="How the kept draft is chosen when num_samples > 1."
    )
    logprobs_k: int = Field(20, ge=1, le=1000, description="Top-k log-probs stored per token.")
    think_start: str = "<think>"
    think_end: str = "</think>"
    seed: int = 0
    device: str | None = None

    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = ("prompt",)
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"prompt", "text", "think", "answer"})
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("model",)

    @model_validator(mode="after")
    def _drafts_need_sampling(self) -> "LLMConfig":
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs do_sample: true (greedy decoding repeats one draft)")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")
        return self

    def identity(self) -> dict[str, str]:
        out = {"model": path_identity(self.model)}
        if self.revision:
            out["revision"] = self.revision
        return out


# -- pure helpers: parsing and draft selection -------------------------------------------------

@dataclass
class Draft:
    text: str
    answer: str
    mean_logprob: float  # mean over generated tokens of the raw model's log-prob
    truncated: bool


def select_draft(drafts: list[Draft], selection: Literal["majority", "logprob"]) -> tuple[int, list[int]]:
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


def end_of_generation(ids: list[int], eos_ids: set[int], pad_id: int | None, stop: list[str],
                      decode: Callable[[list[int]], str], max_new_tokens: int) -> tuple[int, str]:
    """(number of tokens to keep, finish reason) for one generated row.

    "eos": ends with an EOS token (kept, so the student learns to stop); "stop": cut after the
    token that completes the first stop string; "length": ran into ``max_new_tokens``. Rows that
    finished early are padded to the batch's length: a trailing run of padding is dropped (a
    pad token the model sampled mid-row is kept, since generation went on after it)."""
    eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    body = ids[:eos_at] if eos_at is not None else ids
    while eos_at is None and body and body[-1] == pad_id:
        body = body[:-1]
    has_stop = lambda toks: any(s in decode(toks) for s in stop)  # noqa: E731
    if stop and has_stop(body):
        lo, hi = 1, len(body)  # shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(body[:mid]) else (mid + 1, hi)
        return lo, "stop"
    if eos_at is not None:
        return eos_at + 1, "eos"
    if len(body) < len(ids) or len(ids) < max_new_tokens:
        return len(body), "stop"  # a stop criterion ended the row (its text hides the stop string)
    return len(ids), "length"


def topk_logprobs(step_logits: tuple, tokens, k: int):
    """Raw-model log-probs from ``generate``'s per-step logits, one step at a time (a full
    (N, T, V) log-softmax would not fit for large vocabularies).

    step_logits: T tensors (N, V); tokens: (N, T) generated ids.
    Returns topk values (N, T, k) and ids (N, T, k), sorted descending, and the chosen token's
    log-prob (N, T)."""
    import torch

    vals, idx, chosen = [], [], []
    for t, logits in enumerate(step_logits):
        lp = logits.float().log_softmax(-1)  # (N, V)
        v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (N, k), sorted
        vals.append(v)
        idx.append(i)
        chosen.append(lp.gather(1, tokens[:, t:t + 1].to(lp.device)))  # (N, 1)
    return torch.stack(vals, 1).cpu(), torch.stack(idx, 1).cpu(), torch.cat(chosen, 1).cpu()


# -- the node -----------------------------------------------------------------------------------

@register_node("llm")
class LLMNode(TeacherNode):
    config_cls = LLMConfig
    config: LLMConfig

    def load(self) -> None:
        from distillery import runtime

        runtime.configure()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        kw = dict(revision=cfg.revision, local_files_only=Path(cfg.model).exists(), trust_remote_code=False)
        self.tok = AutoTokenizer.from_pretrained(cfg.model, **kw)
        self.tok.padding_side = "left"  # batched generation continues every row at the same column
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.device = str(runtime.resolve_device(cfg.device))
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, **kw).to(self.device).eval()
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in [*eos, self.tok.eos_token_id] if e is not None}
        self.hidden_ids = self._hidden_ids()
        self._check_stop_strings()

    def _hidden_ids(self) -> set[int]:
        """Special tokens left out of the decoded text, except the think markers (some tokenizers
        register ``<think>``/``</think>`` as special tokens; the trace needs them)."""
        markers = {self.config.think_start, self.config.think_end}
        return {i for i in self.tok.all_special_ids if self.tok.convert_ids_to_tokens(i) not in markers}

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t not in self.hidden_ids], skip_special_tokens=False)

    def _check_stop_strings(self) -> None:
        """Fail at load, not per batch, when the tokenizer cannot match the stop strings."""
        if not self.config.stop:
            return
        from transformers import StopStringCriteria

        try:
            StopStringCriteria(tokenizer=self.tok, stop_strings=self.config.stop)
        except Exception as e:
            raise ValueError(f"llm node {self.name!r}: stop strings {self.config.stop} cannot be "
                             f"matched with tokenizer of {self.config.model}: {e!r}") from e

    def run(self, batch: list[NodeInput]) -> list[dict[str, Any] | ItemError]:
        cfg = self.config
        prompts = [item.texts["prompt"] for item in batch]
        ids = self.tok(prompts)["input_ids"]
        outs: list[dict[str, Any] | ItemError | None] = [self._refusal(p, x) for p, x in zip(prompts, ids)]
        keep = [i for i, o in enumerate(outs) if o is None]
        if keep:
            rows = self._generate([ids[i] for i in keep])
            for j, i in enumerate(keep):
                drafts = rows[j * cfg.num_samples:(j + 1) * cfg.num_samples]
                outs[i] = self._assemble(prompts[i], len(ids[i]), drafts)
        return outs

    def _refusal(self, prompt: str, ids: list[int]) -> ItemError | None:
        cfg = self.config
        if not prompt.strip() or not ids:
            return ItemError("prompt is empty (the 'prompt' template rendered to blank text)")
        if self.context is not None and len(ids) + cfg.max_new_tokens > self.context:
            return ItemError(f"prompt is {len(ids)} tokens; model context is {self.context} "
                             f"(max_position_embeddings) with max_new_tokens={cfg.max_new_tokens}")
        return None

    def _generate(self, prompt_ids: list[list[int]]) -> list[dict[str, Any]]:
        """One ``generate`` call; returns one row dict per (prompt, sample), prompt-major."""
        import torch

        cfg = self.config
        enc = self.tok.pad({"input_ids": prompt_ids}, return_tensors="pt").to(self.device)  # (B, P) left-padded
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p) if cfg.do_sample \
            else dict(do_sample=False)
        stops = dict(stop_strings=cfg.stop, tokenizer=self.tok) if cfg.stop else {}
        torch.manual_seed(cfg.seed)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, **sampling, **stops, max_new_tokens=cfg.max_new_tokens,
                num_return_sequences=cfg.num_samples, pad_token_id=self.tok.pad_token_id,
                output_logits=True, return_dict_in_generate=True,
            )
        gen = out.sequences[:, enc["input_ids"].shape[1]:]  # (B * S, T)
        vals, idx, chosen = topk_logprobs(out.logits, gen, cfg.logprobs_k)  # (B*S, T, k) x2, (B*S, T)
        return [self._row(gen[n].tolist(), vals[n], idx[n], chosen[n]) for n in range(gen.shape[0])]

    def _row(self, ids: list[int], vals, idx, chosen) -> dict[str, Any]:
        """One generated row cut at its end, parsed, with its per-token soft labels."""
        cfg = self.config
        n, reason = end_of_generation(ids, self.eos_ids, self.tok.pad_token_id, cfg.stop, self.decode,
                                      cfg.max_new_tokens)
        text = self.decode(ids[:n])
        think, answer = parse_output(text, cfg.think_start, cfg.think_end, cfg.stop)
        return {
            "text": text,
            "think": think,
            "answer": answer,
            "token_ids": np.asarray(ids[:n], dtype=np.int32),  # (T,)
            "topk_ids": idx[:n].numpy().astype(np.int32),  # (T, k)
            "topk_logprobs": vals[:n].numpy().astype(np.float16),  # (T, k), sorted descending
            "truncated": reason == "length",
            "finish_reason": reason,
            "num_generated_tokens": n,
            "mean_logprob": float(chosen[:n].mean()) if n else float("-inf"),
        }

    def _assemble(self, prompt: str, num_prompt_tokens: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The output for one input: the kept draft's fields (+ every draft when there are several)."""
        head = {"prompt": prompt, "num_prompt_tokens": num_prompt_tokens}
        if len(rows) == 1:
            return head | {k: v for k, v in rows[0].items() if k != "mean_logprob"}
        drafts = [Draft(r["text"], r["answer"], r["mean_logprob"], r["truncated"]) for r in rows]
        kept, votes = select_draft(drafts, self.config.selection)
        out = head | {k: v for k, v in rows[kept].items() if k != "mean_logprob"}
        out["drafts"] = [
            {"text": r["text"], "answer": r["answer"], "mean_logprob": r["mean_logprob"],
             "votes": votes[n], "kept": n == kept, "finish_reason": r["finish_reason"]}
            for n, r in enumerate(rows)
        ]
        return out
