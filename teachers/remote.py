"""What a teacher node behind an HTTP API needs beside its client: running its coroutines from
the record loop's synchronous code, a client-side rate limit, ``Retry-After``, and mapping the
tokens a server returns to the ids of a local tokenizer (soft labels in the ``llm`` layout).
Used by the ``openai`` node (``teachers/nodes/openai.py``)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np

from distillery.teachers.generation import topk_layout

T = TypeVar("T")


def run_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code: ``asyncio.run`` on this thread, or on a
    private thread when this thread already runs an event loop (an async caller)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class Pacer:
    """Client-side rate limit: request starts at least 60 / rpm seconds apart, across batches,
    event loops and threads (the slot is booked under a thread lock; the wait is async)."""

    def __init__(self, rpm: float | None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            delay, self.next = max(0.0, self.next - now), max(now, self.next) + self.interval
        await asyncio.sleep(delay)


def retry_after(headers: Any) -> float | None:
    """Seconds a ``Retry-After`` / ``retry-after-ms`` header asks for (None: no usable header)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies spell tokens in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(shifted)}


class TokenMap:
    """Returned token strings -> ids of a local tokenizer: the token itself, vLLM's
    ``token_id:N``, the byte-level (GPT-2) spelling of its bytes, or SentencePiece's ``▁``."""

    def __init__(self, tok: Any):
        self.vocab: dict[str, int] = tok.get_vocab()
        self.byte_chars = byte_level_alphabet()

    def id(self, token: str, raw: list[int] | None) -> int | None:
        if token.startswith("token_id:") and token[9:].isdigit():
            return int(token[9:])
        if token in self.vocab:
            return self.vocab[token]
        if raw is not None:
            spelled = "".join(self.byte_chars[b] for b in raw)
            if spelled in self.vocab:
                return self.vocab[spelled]
        return self.vocab.get(token.replace(" ", "\u2581"))


def soft_labels(content: list[dict[str, Any]], tokens: TokenMap | None, k: int) -> dict[str, np.ndarray] | None:
    """``token_ids`` (T,) and the top-k layout from ``logprobs.content``; None unless every token
    and alternative maps to one id and every row has at least one distinct alternative."""
    if tokens is None or not content or k == 0:
        return None
    k = min(k, *(len(t["top_logprobs"]) for t in content))
    if k == 0:
        return None
    ids, alt_ids, alt_lp = [], [], []
    for t in content:
        top = sorted(t["top_logprobs"], key=lambda a: -a["logprob"])[:k]
        row = [tokens.id(a["token"], a["bytes"]) for a in top]
        chosen = tokens.id(t["token"], t["bytes"])
        if chosen is None or None in row or len(set(row)) != len(row):
            return None
        ids.append(chosen)
        alt_ids.append(row)
        alt_lp.append([a["logprob"] for a in top])
    return {"token_ids": np.asarray(ids, dtype=np.int32), **topk_layout(alt_ids, alt_lp)}
