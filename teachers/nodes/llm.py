"""`llm` node: a transformers causal LM that reasons (``<think>…</think>``) and answers.

run: refuse prompts that do not fit the context -> one batched ``generate`` (greedy or sampled,
``num_samples`` drafts per prompt) -> per draft: cut at EOS / stop string, top-k log-probs of the
raw model (``out.logits``, before temperature / top-p) -> parse think and answer -> with several
drafts, keep one by majority vote or by mean log-prob (self-consistency, rejection sampling).
Parsing, the top-k layout and draft selection are shared with the ``openai`` node
(``distillery.teachers.generation``), so both record the same keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from distillery.teachers.base import ItemError, NodeInput, TeacherNode, path_identity, register_node
from distillery.teachers.generation import GenerationConfig, assemble, generation_row, topk_layout


class LLMConfig(GenerationConfig):
    """Reasoning LLM teacher; records text, trace, answer, token ids and top-k log-probs."""

    type: Literal["llm"] = "llm"
    model: str = Field(description="transformers model: local folder or hub id.")
    revision: str | None = Field(None, description="Hub revision (commit) for hub ids.")
    max_new_tokens: int = Field(256, ge=1, description="Length limit; hitting it flags truncation.")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    logprobs_k: int = Field(20, ge=1, le=1000, description="Top-k log-probs stored per token.")
    device: str | None = None
    chat: bool = Field(False, description="Wrap the rendered prompt as the user message (after `system`) "
                       "in the tokenizer's chat template, with the assistant's generation prompt (instruct "
                       "and reasoning models: Qwen2.5, Llama 3, DeepSeek-R1 distills). False: the prompt as is.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Weights' dtype: bfloat16 halves memory and is fastest on GPUs and on CPUs "
        "with AMX/AVX512-BF16; float16 only on GPUs; auto: the checkpoint's own. Log-probs are taken in "
        "float32 either way.")

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("model",)

    @model_validator(mode="after")
    def _drafts_need_sampling(self) -> "LLMConfig":
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs do_sample: true (greedy decoding repeats one draft)")
        if self.system is not None and not self.chat:
            raise ValueError("system: a system message needs chat: true (the tokenizer's chat template places it)")
        return self

    def identity(self) -> dict[str, str]:
        out = {"model": path_identity(self.model)}
        if self.revision:
            out["revision"] = self.revision
        return out


# -- pure helpers: where a generated row ends, its soft labels ---------------------------------------

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
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=cfg.dtype, **kw).to(self.device).eval()
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in [*eos, self.tok.eos_token_id] if e is not None}
        self.hidden_ids = self._hidden_ids()
        self._check_stop_strings()
        if cfg.chat and not getattr(self.tok, "chat_template", None):
            raise ValueError(f"llm node {self.name!r}: chat: true, but the tokenizer of {cfg.model} has no "
                             "chat_template (set chat: false, or add the template to tokenizer_config.json)")

    def chat_prompt(self, prompt: str) -> str:
        """The rendered prompt as the chat template's user turn, ending with the assistant's prompt."""
        messages = ([{"role": "system", "content": self.config.system}] if self.config.system else []) + \
            [{"role": "user", "content": prompt}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

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
        rendered = [item.texts["prompt"] for item in batch]
        # a chat template writes its own special tokens (BOS included): the tokenizer adds none
        prompts = [self.chat_prompt(p) if p.strip() else p for p in rendered] if cfg.chat else rendered
        ids = self.tok(prompts, add_special_tokens=not cfg.chat)["input_ids"]
        outs: list[dict[str, Any] | ItemError | None] = [self._refusal(p, x) for p, x in zip(rendered, ids)]
        keep = [i for i, o in enumerate(outs) if o is None]
        if keep:
            rows = self._generate([ids[i] for i in keep])
            for j, i in enumerate(keep):
                drafts = rows[j * cfg.num_samples:(j + 1) * cfg.num_samples]
                outs[i] = self._assemble(prompts[i], len(ids[i]), drafts)
        return outs

    def score(self, prompts: list[str], continuations: list[list[int]]) -> list[dict[str, np.ndarray]]:
        """The teacher's view of given continuations (e.g. the student's own answers, for on-policy
        distillation): for each rendered prompt and continuation (token ids of this node's
        tokenizer), its top-k log-probs at every position of the continuation, teacher-forced, in
        the layout of recorded outputs: ``topk_ids`` (T, k) int32, ``topk_logprobs`` (T, k) fp16
        sorted descending, and ``token_logprobs`` (T,) float32 of the given tokens."""
        import torch

        cfg, out = self.config, []
        for prompt, cont in zip(prompts, continuations):
            text = self.chat_prompt(prompt) if cfg.chat else prompt
            p_ids = self.tok(text, add_special_tokens=not cfg.chat)["input_ids"]
            ids = torch.tensor([p_ids + list(cont)], device=self.device)  # (1, P + T)
            with torch.inference_mode():
                logits = self.model(ids).logits[0, len(p_ids) - 1:-1]  # (T, V): position t predicts cont[t]
            vals, idx, chosen = topk_logprobs(tuple(logits[:, None]), torch.tensor([list(cont)]), cfg.logprobs_k)
            out.append({"topk_ids": idx[0].numpy().astype(np.int32),  # (T, k)
                        "topk_logprobs": vals[0].numpy().astype(np.float16),
                        "token_logprobs": chosen[0].numpy().astype(np.float32)})
        return out

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
        return generation_row(
            self.decode(ids[:n]), reason, cfg, num_generated_tokens=n,
            mean_logprob=float(chosen[:n].mean()) if n else float("-inf"),
            token_ids=np.asarray(ids[:n], dtype=np.int32),  # (T,)
            **topk_layout(idx[:n].numpy(), vals[:n].numpy()),  # (T, k) int32 ids, float16 log-probs
        )

    def _assemble(self, prompt: str, num_prompt_tokens: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The output for one input: the kept draft's fields (+ every draft when there are several)."""
        return assemble({"prompt": prompt, "num_prompt_tokens": num_prompt_tokens}, rows, self.config.selection)
