"""A minimal OpenAI-compatible chat-completions server for the demo's reasoning LLM: what the
``openai`` node's tests, its benchmark and ``distillery demo --teacher openai`` talk to.

    python -m distillery.demo.openai_server --model MODEL_DIR --port PORT [--max-batch 8] [--latency-s 0.5]

    with TeacherServer(llm_dir) as server:            # a child process on 127.0.0.1, always stopped
        spec["reasoner"] = {"type": "openai", "base_url": server.base_url, ...}

It serves a local transformers causal LM on 127.0.0.1 through the ``llm`` node's own generation
(``LLMNode``), so at temperature 0 its answers and top-k log-probs are the in-process node's:
the prompt is the messages' contents joined by newlines, taken raw (no chat template, which a
word-level tokenizer does not have). Like vLLM it returns ``logprobs.content`` for every
generated token, the eos token included, and leaves special tokens out of the text.

Throughput knobs (off by default, so each answer is exactly the node's at batch 1):
``--max-batch N`` generates up to N waiting requests with the same settings in one call, as vLLM
batches concurrent requests; ``--latency-s`` adds a fixed delay to every completion, slept
asynchronously so concurrent requests overlap in it: the network and queueing time of a remote
server whose compute is not on this machine; ``--cache`` answers a request seen before from
memory (``benchmarks/openai_record.py`` computes every answer once, untimed, then measures the
client's concurrency against latency alone).

Why not ``transformers serve``, vLLM or llama.cpp's server: none serves a local word-level tiny
model on CPU offline with ``top_logprobs`` and scripted faults; this file does both on FastAPI.

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
import socket
import subprocess
import sys
import time
from pathlib import Path
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


def settings(node: ServedLLM, body: dict[str, Any]) -> LLMConfig:
    """The ``llm`` node's config for a request's sampling settings."""
    temperature = float(body.get("temperature") or 0.0)
    stop = body.get("stop") or []
    return LLMConfig(model=node.config.model, prompt="-", max_new_tokens=int(body.get("max_tokens") or 16),
                     stop=[stop] if isinstance(stop, str) else stop, do_sample=temperature > 0,
                     temperature=temperature or 1.0, top_p=float(body.get("top_p") or 1.0),
                     logprobs_k=max(1, int(body.get("top_logprobs") or 1)), seed=int(body.get("seed") or 0))


class Batcher:
    """Generation, one ``generate`` call at a time (on a worker thread): the requests waiting with
    the same settings go together, at most ``max_batch`` (as vLLM batches concurrent requests);
    ``max_batch`` 1: one request at a time, each output exactly the in-process node's at batch 1.
    ``cache``: a request seen before (same prompt and settings) is answered from memory, computing
    nothing (the benchmark's model of a server whose compute is elsewhere)."""

    def __init__(self, node: ServedLLM, max_batch: int = 1, cache: bool = False):
        self.node, self.max_batch = node, max(1, max_batch)
        self.waiting: dict[str, list[tuple[str, asyncio.Future]]] = {}  # settings -> (prompt, future)
        self.busy = False  # touched from the event loop only
        self.cache: dict[tuple[str, str], dict[str, Any]] | None = {} if cache else None

    async def generate(self, prompt: str, body: dict[str, Any]) -> dict[str, Any]:
        key = settings(self.node, body).model_dump_json()
        if self.cache is not None and (key, prompt) in self.cache:
            return self.cache[key, prompt]
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(key, []).append((prompt, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        out = await future
        if self.cache is not None:
            self.cache[key, prompt] = out
        return out

    async def _drain(self) -> None:
        try:
            while self.waiting:
                key = next(iter(self.waiting))
                group, rest = self.waiting[key][: self.max_batch], self.waiting[key][self.max_batch:]
                if rest:
                    self.waiting[key] = rest
                else:
                    del self.waiting[key]
                group = [(p, f) for p, f in group if not f.done()]  # a client that gave up
                if not group:
                    continue
                try:
                    outs = await run_in_threadpool(self._run, LLMConfig.model_validate_json(key), [p for p, _ in group])
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                    outs = [e] * len(group)
                for (_, future), out in zip(group, outs):
                    if not future.done():
                        future.set_exception(out) if isinstance(out, Exception) else future.set_result(out)
        finally:
            self.busy = False

    def _run(self, cfg: LLMConfig, prompts: list[str]) -> list[dict[str, Any] | Exception]:
        self.node.config = cfg
        outs = self.node.run([_item(p) for p in prompts])
        return [o if isinstance(o, dict) else ValueError(str(o)) for o in outs]


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


async def answer(node: ServedLLM, batcher: Batcher, state: State, request: Request, body: dict[str, Any],
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
    out = await batcher.generate(prompt, body)
    return JSONResponse(completion(node, out, body, kind, state.fingerprint))


def make_app(model: str, latency_s: float = 0.0, max_batch: int = 1, cache: bool = False) -> FastAPI:
    """The app serving ``model``; ``latency_s`` is added to every completion (slept, not computed);
    ``max_batch``: waiting requests generated together (1: one at a time); ``cache``: see ``Batcher``."""
    node = ServedLLM("served", LLMConfig(model=model, prompt="-", device="cpu"))
    node.load()
    batcher, state, app = Batcher(node, max_batch, cache), State(), FastAPI()

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
            if latency_s:
                await asyncio.sleep(latency_s)  # the network / queue of a remote server: requests overlap here
            return await answer(node, batcher, state, request, body, prompt)
        finally:
            state.in_flight -= 1

    return app


class TeacherServer:
    """This server as a child process on 127.0.0.1 (killed by the kernel if this process dies), a
    context manager that always stops it; ``stop`` then ``start`` model an outage.

    port: None picks a free one; a busy port picks a free one too (``port_changed`` says so).
    latency_s, max_batch, cache: see ``make_app``. env: extra environment for the child
    (``OPENAI_SERVER_KEY`` makes it demand a key)."""

    def __init__(self, model: str | Path, port: int | None = None, latency_s: float = 0.0, max_batch: int = 1,
                 cache: bool = False, env: dict[str, str] | None = None, startup_timeout_s: float = 90.0):
        from distillery.prefect_server import free_port  # here: the server process itself never imports Prefect

        self.model, self.latency_s, self.max_batch, self.cache = str(model), float(latency_s), int(max_batch), cache
        self.extra_env = dict(env or {})
        self.port = port if port is not None and port_is_free(port) else free_port()
        self.port_changed = port is not None and self.port != port
        self.startup_timeout_s = startup_timeout_s
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "TeacherServer":
        import httpx

        from distillery.prefect_server import die_with

        env = os.environ | {"DISTILLERY_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | self.extra_env
        cmd = [sys.executable, "-m", "distillery.demo.openai_server", "--model", self.model, "--port", str(self.port),
               "--latency-s", str(self.latency_s), "--max-batch", str(self.max_batch), *(["--cache"] if self.cache else [])]
        self.proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with(os.getpid()))
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the OpenAI-compatible teacher server ({' '.join(cmd)}) exited with "
                                   f"{self.proc.returncode} before it answered on {self.url}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the OpenAI-compatible teacher server did not answer on {self.url} within "
                           f"{self.startup_timeout_s:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *faults: dict, fingerprint: str = "fp_test") -> None:
        """Replace the scripted faults and reset the statistics."""
        import httpx

        httpx.post(f"{self.url}/control", json={"faults": list(faults), "fingerprint": fingerprint}, timeout=5)

    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/stats", timeout=5).json()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main() -> None:
    import torch
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="A local transformers causal LM folder.")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency-s", type=float, default=0.0,
                    help="Seconds added to every completion, overlapping across requests (a remote server's "
                         "network and queueing time).")
    ap.add_argument("--max-batch", type=int, default=1,
                    help="Waiting requests with the same settings generated together (as vLLM batches them).")
    ap.add_argument("--cache", action="store_true",
                    help="Answer a request seen before from memory (compute each prompt once).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    app = make_app(args.model, args.latency_s, args.max_batch, args.cache)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
