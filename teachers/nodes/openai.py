"""`openai` node: a black-box reasoning LLM behind any OpenAI-compatible chat-completions server
(vLLM, Ollama, llama.cpp's server, SGLang, hosted APIs), through the official ``openai`` client.

run: render the prompt (the graph's templates) -> ``num_samples`` requests per input, all of the
batch's requests concurrently (at most ``max_concurrency`` in flight, ``requests_per_minute``
paced) -> per response: the trace from ``message.reasoning_content`` (vLLM, DeepSeek) or from
``<think>…</think>`` in the content, the answer, ``finish_reason: length`` as truncation, the
returned top-k log-probs mapped to token ids by ``tokenizer`` -> with several drafts, one kept as
the ``llm`` node keeps it (``distillery.teachers.generation``): the records have the ``llm`` node's
keys, so the student's ``llm`` head trains on them unchanged.

Failures: 429 / 408 / 409 / 5xx, connection errors and timeouts are retried with exponential
backoff and jitter, honouring ``Retry-After``; a request that still fails, a refused request (other
4xx) or a malformed body is an ``ItemError`` naming the input (the input is quarantined with the
reason, never dropped silently). When *every* request of a batch failed to connect (the server is
down), the batch raises ``TransientError`` instead: nothing of that shard is committed and the
record flow's task retry (or the next run) does it again.

Soft labels: with ``logprobs_k > 0`` the node asks for ``top_logprobs``; it stores them in the
``llm`` layout only when ``tokenizer`` maps every returned token to exactly one id. Otherwise the
record holds hard labels (``token_ids`` from ``tokenizer``, or none: the student tokenizes ``text``
itself), logged once per run; a server that ignores ``logprobs`` is not an error.

The API key never enters the config: ``api_key_env`` names the environment variable that holds it,
read at load; error messages are scrubbed of it. Fingerprint: the config (served model name,
``base_url``, sampling) and the tokenizer's files; a provider may change a model behind the same
name, so every output records the ``system_fingerprint`` the server returned, and
``expect_system_fingerprint`` pins one (a response with another is refused).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillery.teachers.base import ItemError, NodeInput, RetryableError, TeacherNode, TransientError, register_node
from distillery.teachers.generation import GenerationConfig, assemble, generation_row, topk_layout
from distillery.teachers.remote import Pacer, TokenMap, retry_after, run_coroutine, soft_labels

log = logging.getLogger(__name__)
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_HIDDEN = "<hidden: not an environment variable name>"
RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx


class Price(BaseModel):
    """US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")
    prompt: float = Field(0.0, ge=0)
    completion: float = Field(0.0, ge=0)


class OpenAIConfig(GenerationConfig):
    """Black-box LLM teacher behind an OpenAI-compatible server; records what the ``llm`` node does."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)

    type: Literal["openai"] = "openai"
    base_url: str = Field(description="The server's API root, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="The served model's name (not a path: nothing is hashed).")
    api_key_env: str | None = Field(None, pattern=_ENV_NAME, description="NAME of the environment variable "
                                    "holding the API key (never the key); None: the server needs none.")
    max_tokens: int = Field(256, ge=1, description="Length limit; hitting it flags truncation.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    logprobs_k: int = Field(20, ge=0, le=1000, description="top_logprobs per token (OpenAI allows 20); 0: text.")
    tokenizer: str | None = Field(None, description="Local tokenizer folder: maps returned tokens to ids.")
    max_concurrency: int = Field(8, ge=1, le=1024, description="Requests in flight.")
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side pacing.")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0, le=100)
    backoff_s: float = Field(1.0, ge=0, description="First retry's delay (doubles, with jitter).")
    max_backoff_s: float = Field(60.0, ge=0)
    price_per_million_tokens: Price | None = None
    expect_system_fingerprint: str | None = Field(None, description="Refuse responses of another backend.")

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("tokenizer",)

    @model_validator(mode="before")
    @classmethod
    def _hide_pasted_key(cls, data: Any) -> Any:
        """A key pasted into ``api_key_env`` fails validation without being echoed."""
        env = data.get("api_key_env") if isinstance(data, dict) else None
        if isinstance(env, str) and not re.match(_ENV_NAME, env):
            data = {**data, "api_key_env": _HIDDEN}
        return data

    @model_validator(mode="after")
    def _drafts_need_sampling(self) -> "OpenAIConfig":
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("num_samples > 1 needs temperature > 0 (greedy decoding repeats one draft)")
        return self

    def identity(self) -> dict[str, str]:
        return {"served_model": self.model, **super().identity()}  # + the tokenizer's file hashes


class ScoringUnsupported(NotImplementedError):
    """The server (or this node's config) cannot score a given continuation: on-policy distillation
    falls back to the offline path, saying why."""


class RequestFailed(Exception):
    """One request that failed in this run; ``connect``: it never reached the server;
    ``retryable``: it kept failing in a way a later run may not (5xx, 429, timeouts, lost
    connections, after every retry), so the input is recorded for a later run to try again."""

    def __init__(self, message: str, connect: bool = False, retryable: bool = False):
        super().__init__(message)
        self.connect, self.retryable = connect, retryable


@register_node("openai")
class OpenAINode(TeacherNode):
    config_cls = OpenAIConfig
    config: OpenAIConfig

    def load(self) -> None:
        cfg = self.config
        self._key = "EMPTY"  # local servers need none; the client insists on a string
        if cfg.api_key_env:
            if not os.environ.get(cfg.api_key_env):
                raise ValueError(f"openai node {self.name!r}: environment variable {cfg.api_key_env} is not set "
                                 "(it must hold the API key)")
            self._key = os.environ[cfg.api_key_env]
        self.tok, self.tokens = None, None
        if cfg.tokenizer:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=Path(cfg.tokenizer).exists(),
                                                     trust_remote_code=False)
            self.tokens = TokenMap(self.tok)
        self._told: set[str] = set()
        self._pacer = Pacer(cfg.requests_per_minute)
        if cfg.logprobs_k and not cfg.tokenizer:
            self._tell("no_tokenizer", "no tokenizer: returned tokens cannot be mapped to ids, so records hold "
                       "hard labels only (the student tokenizes the text)")

    def _tell(self, what: str, message: str) -> None:
        """Log a message once per load (not once per input)."""
        if what not in self._told:
            self._told.add(what)
            log.warning("openai node %r: %s", self.name, message)

    def _scrub(self, message: str) -> str:
        return message.replace(self._key, "***") if len(self._key) >= 4 else message

    def run(self, batch: list[NodeInput]) -> list[dict[str, Any] | ItemError]:
        outs = run_coroutine(lambda: self._run_batch(batch))
        failed = [o for o in outs if isinstance(o, RequestFailed)]
        if failed and len(failed) == len(outs) and all(f.connect for f in failed):
            raise TransientError(f"openai node {self.name!r}: no request reached {self.config.base_url} "
                                 f"({failed[0]}); the whole batch will be retried")
        return [(RetryableError if o.retryable else ItemError)(str(o)) if isinstance(o, RequestFailed) else o
                for o in outs]

    async def _run_batch(self, batch: list[NodeInput]) -> list[dict[str, Any] | RequestFailed]:
        from openai import AsyncOpenAI

        cfg = self.config
        client = AsyncOpenAI(base_url=cfg.base_url, api_key=self._key, timeout=cfg.timeout_s, max_retries=0)
        slots = asyncio.Semaphore(cfg.max_concurrency)  # this call's own: run may be called from several threads
        async with client:
            return list(await asyncio.gather(*(self._one(client, slots, item) for item in batch)))

    async def _one(self, client: Any, slots: asyncio.Semaphore, item: NodeInput) -> dict[str, Any] | RequestFailed:
        """One input: its drafts requested concurrently, then assembled as the ``llm`` node does."""
        cfg, prompt = self.config, item.texts["prompt"]
        if not prompt.strip():
            return RequestFailed("prompt is empty (the 'prompt' template rendered to blank text)")
        rows = await asyncio.gather(*(self._draft(client, slots, item, n) for n in range(cfg.num_samples)))
        bad = next((r for r in rows if isinstance(r, RequestFailed)), None)
        if bad is not None:
            return bad
        usage = {key: sum(r["usage"][key] for r in rows) for key in ("prompt_tokens", "completion_tokens")}
        usage["requests"] = len(rows)
        if cfg.price_per_million_tokens:
            price = cfg.price_per_million_tokens
            usage["estimated_cost"] = (usage["prompt_tokens"] * price.prompt
                                       + usage["completion_tokens"] * price.completion) / 1e6
        head = {"prompt": prompt, "num_prompt_tokens": rows[0]["usage"]["prompt_tokens"]}
        return assemble(head, rows, cfg.selection) | {"usage": usage, "seconds": sum(r["seconds"] for r in rows)}

    # -- scoring given continuations (on-policy distillation) ----------------------------------------
    def score(self, prompts: list[str], continuations: list[list[int]]) -> list[dict[str, np.ndarray]]:
        """The served model's top-k log-probs on given continuations (the student's answers), in the
        ``llm`` node's ``score`` layout, through the completions API: the prompt (the tokenizer's chat
        template applied when it has one) and the continuation sent as token ids, with ``echo`` and
        ``logprobs``, so the server returns the log-probs of the tokens it was given (vLLM and
        other servers of the legacy completions API do). Raises ``ScoringUnsupported`` naming the
        reason where that cannot work: no ``tokenizer``, no completions endpoint, no prompt log-probs
        returned, or returned tokens that are not the ones sent."""
        cfg = self.config
        if self.tok is None:
            raise ScoringUnsupported(f"openai node {self.name!r}: scoring the student's tokens needs `tokenizer` "
                                     "(the served model's) to send token ids and map the returned ones back")
        from openai import APIStatusError, OpenAI

        k = max(1, min(cfg.logprobs_k or 1, 20))
        out = []
        with OpenAI(base_url=cfg.base_url, api_key=self._key, timeout=cfg.timeout_s, max_retries=cfg.max_retries,
                    http_client=getattr(self, "http_client", None)) as client:
            for prompt, cont in zip(prompts, continuations):
                p_ids = self._prompt_ids(prompt)
                try:
                    resp = client.completions.create(model=cfg.model, prompt=p_ids + list(cont), echo=True,
                                                     logprobs=k, max_tokens=1, temperature=0.0)
                except APIStatusError as e:
                    if e.status_code >= 500 or e.status_code in RETRY_STATUS:
                        raise
                    raise ScoringUnsupported(self._scrub(
                        f"openai node {self.name!r}: {cfg.base_url} refused a completions request with echo and "
                        f"logprobs (HTTP {e.status_code}): it cannot score a given continuation")) from None
                out.append(self._echoed(resp, len(p_ids), list(cont)))
        return out

    def _prompt_ids(self, prompt: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            messages = ([{"role": "system", "content": self.config.system}] if self.config.system else []) + \
                [{"role": "user", "content": prompt}]
            return list(self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        return self.tok(prompt)["input_ids"]

    def _echoed(self, resp: Any, start: int, cont: list[int]) -> dict[str, np.ndarray]:
        """The continuation's rows of an echoed completion, checked against the ids sent."""
        lp = resp.choices[0].logprobs if resp.choices else None
        where = f"openai node {self.name!r}: {self.config.base_url}"
        rows = (getattr(lp, "top_logprobs", None) or [])[start:start + len(cont)]
        if lp is None or len(rows) != len(cont) or any(not r for r in rows):
            raise ScoringUnsupported(f"{where} returned no log-probs of the prompt's tokens (echo ignored): it "
                                     "cannot score a given continuation")
        tokens = lp.tokens[start:start + len(cont)]
        if [self.tokens.id(t, None) for t in tokens] != cont:
            raise ScoringUnsupported(f"{where} echoed other tokens than the ones sent (is `tokenizer` the "
                                     "served model's?)")
        k = min(len(r) for r in rows)
        top = [sorted(r.items(), key=lambda kv: -kv[1])[:k] for r in rows]
        ids = [[self.tokens.id(t, None) for t, _ in row] for row in top]
        if any(i is None for row in ids for i in row):
            raise ScoringUnsupported(f"{where}: returned alternatives do not map to {self.config.tokenizer}'s ids")
        return topk_layout(ids, [[v for _, v in row] for row in top]) | {
            "token_logprobs": np.asarray(lp.token_logprobs[start:start + len(cont)], np.float32)}

    def _request(self, prompt: str, sample: int) -> dict[str, Any]:
        """The chat-completions arguments of one draft (seeded, so drafts differ reproducibly)."""
        cfg = self.config
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
            [{"role": "user", "content": prompt}]
        kw: dict[str, Any] = dict(model=cfg.model, messages=messages, max_tokens=cfg.max_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + sample)
        if cfg.stop:
            kw["stop"] = cfg.stop
        if cfg.logprobs_k:
            kw.update(logprobs=True, top_logprobs=cfg.logprobs_k)
        return kw

    async def _draft(self, client: Any, slots: asyncio.Semaphore, item: NodeInput,
                     sample: int) -> dict[str, Any] | RequestFailed:
        """One request with retries; its response parsed into a row (or why it failed)."""
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        cfg, where = self.config, f"input {item.input_id}"
        kw = self._request(item.texts["prompt"], sample)
        for attempt in range(cfg.max_retries + 1):
            await self._pacer.wait()
            t0 = time.perf_counter()
            try:
                async with slots:
                    raw = await client.chat.completions.with_raw_response.create(**kw)
                return self._row(raw.text, where, time.perf_counter() - t0)
            except APIStatusError as e:
                status, wait = e.status_code, retry_after(e.response.headers)
                error = RequestFailed(self._scrub(f"{where}: HTTP {status} from {cfg.base_url}: {e.message}"))
                if status not in RETRY_STATUS and status < 500:
                    return error  # refused (bad request, auth, unknown model): retrying will not help
            except APIConnectionError as e:
                wait, timed_out = None, isinstance(e, APITimeoutError)
                reason = f"timed out after {cfg.timeout_s:g} s" if timed_out else f"connection failed ({e})"
                error = RequestFailed(self._scrub(f"{where}: {reason} ({cfg.base_url})"), connect=not timed_out)
            except RequestFailed as e:
                return e  # malformed body: the same request would get the same answer
            if attempt < cfg.max_retries:
                await asyncio.sleep(self._backoff(attempt, wait))
        return RequestFailed(f"{error} (after {cfg.max_retries + 1} attempts)", connect=error.connect, retryable=True)

    def _backoff(self, attempt: int, asked: float | None) -> float:
        """``Retry-After`` when the server sent one, else exponential backoff with equal jitter."""
        if asked is not None:
            return asked
        delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** attempt)
        return delay / 2 + random.uniform(0, delay / 2)

    def _row(self, body: str, where: str, seconds: float) -> dict[str, Any]:
        """A response body -> a row in the shared layout; RequestFailed when it is malformed."""
        try:
            completion = parse_completion(body)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise RequestFailed(f"{where}: malformed response body from {self.config.base_url} "
                                f"({type(e).__name__}: {str(e)[:120]})") from None
        fp = completion["system_fingerprint"]
        if self.config.expect_system_fingerprint and fp != self.config.expect_system_fingerprint:
            raise RequestFailed(f"{where}: system_fingerprint {fp!r} is not the expected "
                                f"{self.config.expect_system_fingerprint!r} (the served model changed)")
        return self._parse(completion, seconds)

    def _parse(self, c: dict[str, Any], seconds: float) -> dict[str, Any]:
        cfg, lp, reasoning = self.config, c["logprobs"], c["reasoning"]
        if cfg.logprobs_k and not lp:
            self._tell("no_logprobs", f"{cfg.base_url} returned no logprobs: hard labels only")
        labels = soft_labels(lp or [], self.tokens, cfg.logprobs_k)
        if labels is None and lp and self.tokens is not None:
            self._tell("unmapped", f"tokens returned by {cfg.base_url} do not all map to {cfg.tokenizer}'s ids: "
                       "hard labels only")
        if labels is None and self.tok is not None:
            text = c["content"] if reasoning is None else f"{cfg.think_start}{reasoning}{cfg.think_end}{c['content']}"
            labels = {"token_ids": np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], np.int32)}
        n = c["completion_tokens"] if c["completion_tokens"] is not None else len(lp or [])
        return generation_row(
            c["content"], c["finish_reason"], cfg, think=reasoning, num_generated_tokens=n,
            mean_logprob=float(np.mean([t["logprob"] for t in lp])) if lp else float("-inf"), **(labels or {}),
            usage={"prompt_tokens": c["prompt_tokens"], "completion_tokens": n},
            seconds=seconds, model=c["model"], system_fingerprint=c["system_fingerprint"],
        )


def _opt(value: Any, kind: type) -> Any:
    """``value`` when it is None or of ``kind``, else TypeError (a malformed body)."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _token(t: Any) -> dict[str, Any]:
    """One ``logprobs.content`` entry, checked: token, logprob, bytes and its alternatives."""
    alts = [{"token": _opt(a["token"], str), "logprob": float(a["logprob"]), "bytes": _opt(a.get("bytes"), list)}
            for a in _opt(t.get("top_logprobs"), list) or []]
    return {"token": _opt(t["token"], str), "logprob": float(t["logprob"]), "bytes": _opt(t.get("bytes"), list),
            "top_logprobs": alts}


def parse_completion(body: str) -> dict[str, Any]:
    """The fields a chat-completions body must have, type-checked (KeyError, TypeError,
    ValueError: malformed). Lenient where servers differ: ``finish_reason`` any string, no
    ``usage``, ``reasoning_content`` (vLLM, DeepSeek) or ``reasoning`` (newer vLLM) for the trace."""
    data = json.loads(body)
    choice = _opt(data["choices"], list)[0]
    msg = _opt(choice["message"], dict)
    logprobs = _opt(choice.get("logprobs"), dict) or {}
    usage = _opt(data.get("usage"), dict) or {}
    return {
        "content": _opt(msg.get("content"), str) or "",
        "reasoning": _opt(msg.get("reasoning_content") or msg.get("reasoning"), str) or None,
        "finish_reason": _opt(choice.get("finish_reason"), str) or "stop",
        "logprobs": [_token(t) for t in _opt(logprobs.get("content"), list) or []] or None,
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": None if usage.get("completion_tokens") is None else int(usage["completion_tokens"]),
        "model": _opt(data.get("model"), str),
        "system_fingerprint": _opt(data.get("system_fingerprint"), str),
    }
