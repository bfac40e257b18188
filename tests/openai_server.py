"""The smallest OpenAI-compatible chat-completions server the `openai` node's tests need.

    python tests/openai_server.py --model MODEL_DIR --port PORT

It serves a local transformers causal LM on 127.0.0.1 through the ``llm`` node's own generation
(``LLMNode``), so at temperature 0 its answers and top-k log-probs are the in-process node's:
the prompt is the messages' contents joined by newlines, taken raw (no chat template, which a
word-level test tokenizer does not have). Like vLLM it returns ``logprobs.content`` for every
generated token, the eos token included, and leaves special tokens out of the text.

Why not ``transformers serve`` or vLLM: neither serves a local tiny model on CPU offline with
``top_logprobs`` and scripted faults; this file does both in ~200 lines.

Faults are scripted over HTTP (``POST /control``): each ``{"match", "kind", "times", "arg"}`` is
used by the next ``times`` requests whose prompt contains ``match`` (``times`` -1: for ever).
kind: ``429`` (with ``Retry-After: arg``), ``500``, ``hang``, ``malformed`` (a 200 whose body is
not a chat completion), ``nologprobs``, ``reasoning`` (the trace in ``reasoning_content``),
``echo_auth`` (a 400 that echoes the Authorization header), ``delay`` (sleep ``arg`` seconds).
``GET /stats``: requests per prompt and the most requests ever in flight at once. With the
environment variable ``OPENAI_SERVER_KEY`` set, requests must carry it as a bearer token (a 401
echoes the header it got, so the tests see that the node scrubs keys from error messages).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from distillery.teachers.nodes.llm import LLMConfig, LLMNode
from distillery.text import cut_at_stop, split_reasoning


class ServedLLM(LLMNode):
    """The ``llm`` node, keeping each generated token's own log-prob too (the API returns it)."""

    def _row(self, ids, vals, idx, chosen) -> dict[str, Any]:
        row = super()._row(ids, vals, idx, chosen)
        row["chosen_logprobs"] = chosen[: row["num_generated_tokens"]].tolist()
        return row


class State:
    """Scripted faults and request statistics (touched from the event loop only)."""

    def __init__(self) -> None:
        self.faults: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0
        self.by_prompt: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}  # prompt -> when each request arrived (time.time())
        self.fingerprint = "fp_test"

    def take(self, prompt: str) -> dict[str, Any] | None:
        for f in self.faults:
            if f["match"] in prompt and f.get("times", 1) != 0:
                if f.get("times", 1) > 0:
                    f["times"] = f.get("times", 1) - 1
                return f
        return None


def generate(node: ServedLLM, lock: threading.Lock, prompt: str, body: dict[str, Any]) -> dict[str, Any]:
    """One completion by the ``llm`` node under the request's settings (one request at a time)."""
    temperature = float(body.get("temperature") or 0.0)
    stop = body.get("stop") or []
    cfg = LLMConfig(model=node.config.model, prompt="-", max_new_tokens=int(body.get("max_tokens") or 16),
                    stop=[stop] if isinstance(stop, str) else stop, do_sample=temperature > 0,
                    temperature=temperature or 1.0, top_p=float(body.get("top_p") or 1.0),
                    logprobs_k=max(1, int(body.get("top_logprobs") or 1)), seed=int(body.get("seed") or 0))
    with lock:
        node.config = cfg
        out = node.run([_item(prompt)])[0]
    if not isinstance(out, dict):
        raise ValueError(str(out))
    return out


def _item(prompt: str):
    from distillery.teachers.base import NodeInput

    return NodeInput(input_id="served", image=None, texts={"prompt": prompt})


def completion(node: ServedLLM, out: dict[str, Any], body: dict[str, Any], fault: str | None,
               fingerprint: str) -> dict[str, Any]:
    """The OpenAI chat-completion body of one generated output."""
    stop = body.get("stop") or []
    content = cut_at_stop(out["text"], [stop] if isinstance(stop, str) else stop)  # the API drops the stop string
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if fault == "reasoning":
        think, rest = split_reasoning(content, "<think>", "</think>")
        message = {"role": "assistant", "content": rest, "reasoning_content": think}
    choice: dict[str, Any] = {"index": 0, "message": message,
                              "finish_reason": "length" if out["truncated"] else "stop", "logprobs": None}
    if body.get("logprobs") and fault != "nologprobs":
        choice["logprobs"] = {"content": _logprobs(node, out, int(body.get("top_logprobs") or 0))}
    return {"id": "cmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", ""), "system_fingerprint": fingerprint, "choices": [choice],
            "usage": {"prompt_tokens": out["num_prompt_tokens"], "completion_tokens": out["num_generated_tokens"],
                      "total_tokens": out["num_prompt_tokens"] + out["num_generated_tokens"]}}


def _logprobs(node: ServedLLM, out: dict[str, Any], k: int) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = node.tok.convert_ids_to_tokens(int(token_id))
        return {"token": token, "logprob": float(logprob), "bytes": list(token.encode())}

    rows = []
    for t, token_id in enumerate(out["token_ids"]):
        top = [entry(i, v) for i, v in zip(out["topk_ids"][t][:k], out["topk_logprobs"][t][:k])]
        rows.append(entry(token_id, out["chosen_logprobs"][t]) | {"top_logprobs": top})
    return rows


async def answer(node: ServedLLM, lock: threading.Lock, state: State, request: Request, body: dict[str, Any],
                 prompt: str) -> Response:
    """The response to one chat-completions request: its scripted fault, else a completion."""
    fault = state.take(prompt)
    kind = fault["kind"] if fault else None
    if kind == "429":
        return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                            headers={"Retry-After": str(fault.get("arg", 0))})
    if kind == "500":
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)
    if kind == "echo_auth":
        return JSONResponse({"error": {"message": f"bad header {request.headers.get('authorization')}"}},
                            status_code=400)
    if kind == "hang":
        await asyncio.sleep(3600)
    if kind == "delay":
        await asyncio.sleep(float(fault.get("arg", 0.2)))
    if kind == "malformed":
        return Response('{"object": "chat.completion", "choices": [{"index": 0}]}', media_type="application/json")
    out = await run_in_threadpool(generate, node, lock, prompt, body)
    return JSONResponse(completion(node, out, body, kind, state.fingerprint))


def make_app(model: str) -> FastAPI:
    node = ServedLLM("served", LLMConfig(model=model, prompt="-", device="cpu"))
    node.load()
    lock, state, app = threading.Lock(), State(), FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/control")
    async def control(request: Request) -> dict[str, str]:
        body = await request.json()
        state.faults = body.get("faults", [])
        state.fingerprint = body.get("fingerprint", "fp_test")
        if body.get("reset", True):
            state.by_prompt, state.times, state.max_in_flight = {}, {}, 0
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {"by_prompt": state.by_prompt, "times": state.times, "max_in_flight": state.max_in_flight}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        key = os.environ.get("OPENAI_SERVER_KEY")
        if key and request.headers.get("authorization") != f"Bearer {key}":
            presented = request.headers.get("authorization")  # echoed, as careless servers do
            return JSONResponse({"error": {"message": f"invalid api key: {presented}"}}, status_code=401)
        body = await request.json()
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        state.by_prompt[prompt] = state.by_prompt.get(prompt, 0) + 1
        state.times.setdefault(prompt, []).append(time.time())
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            return await answer(node, lock, state, request, body, prompt)
        finally:
            state.in_flight -= 1

    return app


def main() -> None:
    import torch
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    uvicorn.run(make_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
