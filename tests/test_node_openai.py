"""The `openai` node against a real HTTP server process (demo/openai_server.py) that serves a tiny
Llama the tests train, through the in-process ``llm`` node's own generation: answers and soft labels
equal the ``llm`` node's; faults (429 + Retry-After, 500, a hang, a malformed body, an outage) lose
nothing and record nothing twice; requests overlap up to ``max_concurrency``; the key never leaks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from test_node_llm import PROMPT, save_tiny_llm

from distillery.demo.openai_server import TeacherServer as Server
from distillery.teachers.base import ItemError, NodeInput, TransientError
from distillery.teachers.nodes.llm import LLMConfig, LLMNode
from distillery.teachers.nodes.openai import OpenAIConfig, OpenAINode
from distillery.teachers.remote import Pacer, retry_after

KEY = f"sk-test-{uuid.uuid4().hex}"  # what the server demands; must never be written anywhere
ENV = "TEACHER_API_KEY"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The llm node tests' tiny Llama (trained to continue PROMPT with TARGET), on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def server(tiny_model):
    with Server(tiny_model, env={"OPENAI_SERVER_KEY": KEY}) as srv:  # started, always stopped
        yield srv


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


def config(server: Server, **kw) -> OpenAIConfig:
    return OpenAIConfig(**{"base_url": server.base_url, "model": "tiny-llm", "api_key_env": ENV,
                           "prompt": "{request.question}", "max_tokens": 24, "logprobs_k": 5, "timeout_s": 5,
                           "backoff_s": 0.05, "max_backoff_s": 0.2, "max_retries": 2, **kw})


def make_node(server: Server, **kw) -> OpenAINode:
    node = OpenAINode("reasoner", config(server, **kw))
    node.load()
    return node


def items(prompts: list[str]) -> list[NodeInput]:
    return [NodeInput(input_id=f"in{i}", image=None, texts={"prompt": p}) for i, p in enumerate(prompts)]


PROMPTS = [PROMPT, "q : what color is grass ?", "q : sky ?"]


@pytest.fixture(scope="module")
def reference(tiny_model) -> dict:
    """The in-process llm node's outputs for PROMPTS, one prompt at a time (as the server runs)."""
    out = {}
    for max_new in (24, 3):
        node = LLMNode("reasoner", LLMConfig(model=tiny_model, prompt="{request.question}", max_new_tokens=max_new,
                                             logprobs_k=5))
        node.load()
        out[max_new] = [node.run(items([p]))[0] for p in PROMPTS]
    return out


# -- the same records as the llm node ------------------------------------------------------------

def assert_same(out: dict, ref: dict, soft: bool = True) -> None:
    for key in ("text", "think", "answer", "truncated", "num_generated_tokens"):
        assert out[key] == ref[key], key
    if soft:
        for key in ("token_ids", "topk_ids", "topk_logprobs"):
            assert out[key].dtype == ref[key].dtype and np.array_equal(out[key], ref[key]), key
    assert out["usage"] == {"prompt_tokens": ref["num_prompt_tokens"],
                            "completion_tokens": ref["num_generated_tokens"], "requests": 1}


@pytest.mark.parametrize("max_tokens", [24, 3])
def test_answers_and_soft_labels_equal_the_llm_node(server, tiny_model, reference, max_tokens):
    server.script()
    outs = make_node(server, tokenizer=tiny_model, max_tokens=max_tokens).run(items(PROMPTS))
    for out, ref in zip(outs, reference[max_tokens]):
        assert_same(out, ref)
        assert out["system_fingerprint"] == "fp_test" and out["model"] == "tiny-llm" and out["seconds"] > 0
    full = max_tokens == 24
    assert outs[0]["answer"] == ("the answer is blue ." if full else "")
    assert outs[0]["think"] == ("light scatters short waves" if full else "light scatters")
    assert [o["truncated"] for o in outs] == [not full] * 3
    assert outs[0]["finish_reason"] == ("stop" if full else "length")


def test_trace_from_reasoning_content(server, tiny_model, reference):
    server.script({"match": "", "kind": "reasoning", "times": -1})
    outs = make_node(server, tokenizer=tiny_model).run(items(PROMPTS))
    for out, ref in zip(outs, reference[24]):
        assert_same(out, ref)


def test_server_without_logprobs_gives_hard_labels(server, tiny_model, reference, caplog):
    server.script({"match": "", "kind": "nologprobs", "times": -1})
    with caplog.at_level(logging.WARNING, logger="distillery.teachers.nodes.openai"):
        outs = make_node(server, tokenizer=tiny_model).run(items(PROMPTS))
    assert caplog.text.count("returned no logprobs: hard labels only") == 1  # once, not per input
    for out, ref in zip(outs, reference[24]):
        assert_same(out, ref, soft=False)
        assert "topk_ids" not in out and "topk_logprobs" not in out
        assert np.array_equal(out["token_ids"], ref["token_ids"][:-1])  # the text's tokens (no eos in text)


def test_text_only_records_train_the_llm_head_with_a_byte_tokenizer(server, tmp_path, caplog):
    """No tokenizer: text only; the schema falls back to the byte-level tokenizer and the head
    tokenizes the text into hard labels."""
    from student_support import tiny_config

    from distillery.flows.spec import Spec
    from distillery.students.model.heads import TargetContext, head_class
    from distillery.students.model.heads.llm import AnswerHead
    from distillery.students.model.schema import build_schema, load_tokenizer
    from distillery.teachers.records import TeacherRecord

    server.script()
    with caplog.at_level(logging.WARNING, logger="distillery.teachers.nodes.openai"):
        out = make_node(server).run(items([PROMPT]))[0]
    assert "no tokenizer" in caplog.text
    assert "token_ids" not in out and out["answer"] == "the answer is blue ."
    spec = Spec.model_validate({"name": "t", "teachers": {"reasoner": config(server).model_dump()}})
    schema = build_schema(spec, [TeacherRecord("a", "fp", "x.png", "q", outputs={"reasoner": out})])
    assert schema.nodes["reasoner"]["type"] == "openai" and schema.tokenizer is None  # byte-level
    head = head_class("openai")
    assert issubclass(head, AnswerHead)
    tok, cfg = load_tokenizer(schema), tiny_config(max_answer_tokens=32, max_rationale_tokens=128)
    build = head.target_builder("reasoner", schema.nodes["reasoner"], TargetContext(cfg, tok, schema.text))
    target = build(out)
    assert target is not None and not target["rationale_kd_mask"].any()  # hard labels only
    assert tok.decode(target["answer_ids"][:-1]) == "the answer is blue ." and int(target["answer_ids"][-1]) == 1


def test_drafts_are_kept_as_the_llm_node_keeps_them(server, tiny_model):
    server.script()
    node = make_node(server, tokenizer=tiny_model, num_samples=4, temperature=1.5, seed=3)
    out = node.run(items([PROMPT]))[0]
    drafts = out["drafts"]
    assert len(drafts) == 4 and sum(d["kept"] for d in drafts) == 1
    kept = next(d for d in drafts if d["kept"])
    assert (out["text"], out["answer"]) == (kept["text"], kept["answer"])
    assert out["usage"]["requests"] == 4
    assert out["usage"]["completion_tokens"] == sum(d["usage"]["completion_tokens"] for d in drafts)
    again = node.run(items([PROMPT]))[0]  # each draft's request carries seed + its number
    assert [d["text"] for d in again["drafts"]] == [d["text"] for d in drafts]
    with pytest.raises(ValidationError, match="num_samples > 1 needs temperature > 0"):
        config(server, num_samples=2)


# -- faults through the record loop: nothing lost, nothing twice ---------------------------------

def write_inputs(folder: Path, cases: list[str]) -> Path:
    folder.mkdir()
    lines = []
    for i, case in enumerate(cases):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": f"q : sky ? {case}"}))
    (folder / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def spec_for(server: Server, **kw):
    from distillery.flows.spec import Spec

    node = config(server, timeout_s=1.0, price_per_million_tokens={"prompt": 1.0, "completion": 2.0}, **kw)
    return Spec.model_validate({"name": "t", "teachers": {"reasoner": node.model_dump()},
                                "record": {"shard_size": 4}})


def counts(server: Server) -> dict[str, int]:
    return {p.split()[-1]: n for p, n in server.stats()["by_prompt"].items()}


def test_faults_quarantine_only_their_input_and_a_rerun_records_nothing_twice(server, tmp_path, caplog):
    from distillery.teachers.record import record
    from distillery.teachers.store import TraceStore

    cases = ["rate", "down", "hang", "bad", "once", "fine", "leak"]
    inputs, traces = write_inputs(tmp_path / "in", cases), str(tmp_path / "traces.lance")
    server.script({"match": "rate", "kind": "429", "times": 2, "arg": "0.3"},
                  {"match": "down", "kind": "500", "times": -1}, {"match": "hang", "kind": "hang", "times": 1},
                  {"match": "bad", "kind": "malformed", "times": -1}, {"match": "once", "kind": "500", "times": 1},
                  {"match": "leak", "kind": "echo_auth", "times": -1})
    spec = spec_for(server)
    caplog.set_level(logging.DEBUG)
    summary = record(spec, str(inputs), traces)
    assert (summary.written, summary.quarantined) == (4, 3)
    assert summary.by_reason == {"node_error:reasoner": 3}
    assert counts(server) == {"rate": 3, "down": 3, "hang": 2, "bad": 1, "once": 2, "fine": 1, "leak": 1}
    times = server.stats()["times"]["q : sky ? rate"]
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.27  # Retry-After: 0.3 honoured
    recs = {r.question.split()[-1]: r for r in TraceStore(traces).read()}
    assert {c for c, r in recs.items() if r.status == "ok"} == {"rate", "hang", "once", "fine"}
    assert {c: r.status for c, r in recs.items() if r.status != "ok"} == {"down": "retry", "bad": "quarantined",
                                                                           "leak": "quarantined"}
    assert summary.to_retry == 1  # kept failing: a later run tries it again; the refused ones stay
    assert "HTTP 500" in recs["down"].detail and "after 3 attempts" in recs["down"].detail
    assert "malformed response body" in recs["bad"].detail and recs["bad"].input_id in recs["bad"].detail
    assert "HTTP 400" in recs["leak"].detail and "Bearer ***" in recs["leak"].detail
    ok = recs["fine"].outputs["reasoner"]
    usage = summary.usage["reasoner"]
    assert usage["requests"] == 4 and usage["completion_tokens"] == 4 * ok["usage"]["completion_tokens"]
    assert usage["estimated_cost"] == pytest.approx((usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6)

    server.script()  # the server is well again: the rerun asks for the one input that kept failing
    again = record(spec, str(inputs), traces)
    assert (again.written, again.quarantined, again.skipped) == (1, 0, 6)
    store = TraceStore(traces)
    assert counts(server) == {"down": 1} and store.count() == 7  # replaced in place, not added
    assert {r.question.split()[-1]: r.status for r in store.read()}["down"] == "ok"
    assert store.count(store.versions()[-2]["version"]) == 7  # the version before it still reads whole
    server.script()
    third = record(spec, str(inputs), traces)
    assert (third.written, third.skipped) == (0, 7) and counts(server) == {}
    assert_no_key(tmp_path, caplog.text, json.dumps(summary.to_json()), json.dumps(spec.model_dump()))


def test_an_outage_fails_the_shard_and_the_rerun_retries_only_it(server, tmp_path):
    from distillery.teachers.record import record
    from distillery.teachers.store import TraceStore

    cases = [f"o{i}" for i in range(8)]
    inputs, traces = write_inputs(tmp_path / "in", cases), str(tmp_path / "traces.lance")
    server.script()
    spec = spec_for(server)

    def outage(done: int, total: int) -> None:
        if done == 4:
            server.stop()  # after the first shard's commit

    try:
        with pytest.raises(TransientError, match="no request reached") as err:
            record(spec, str(inputs), traces, on_progress=outage)
    finally:
        server.start()
    assert KEY not in str(err.value)
    assert TraceStore(traces).count() == 4
    server.script()
    again = record(spec, str(inputs), traces)
    assert (again.written, again.skipped) == (4, 4)
    assert sorted(counts(server)) == ["o4", "o5", "o6", "o7"]
    assert TraceStore(traces).count() == 8


# -- throughput -------------------------------------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 4])
def test_requests_overlap_up_to_max_concurrency(server, concurrency):
    server.script({"match": "", "kind": "delay", "times": -1, "arg": 0.25})
    t0 = time.perf_counter()
    outs = make_node(server, max_concurrency=concurrency).run(items([PROMPT] * 8))
    seconds = time.perf_counter() - t0
    assert all(o["answer"] == "the answer is blue ." for o in outs)
    assert server.stats()["max_in_flight"] == concurrency
    assert seconds >= 8 * 0.25 / concurrency


def test_the_server_batches_waiting_requests_as_vllm_does(tiny_model, reference):
    """``--max-batch``: requests waiting with the same settings are generated together (the demo
    and the benchmark serve so); the answers stay the llm node's."""
    from distillery.demo.openai_server import Batcher, ServedLLM

    node = ServedLLM("served", LLMConfig(model=tiny_model, prompt="-", device="cpu"))
    node.load()
    batcher, sizes = Batcher(node, max_batch=2), []
    run = batcher._run
    batcher._run = lambda cfg, prompts: sizes.append(len(prompts)) or run(cfg, prompts)
    body = {"max_tokens": 24, "top_logprobs": 5, "logprobs": True}

    async def requests() -> list[dict]:
        return await asyncio.gather(*(batcher.generate(p, body) for p in PROMPTS * 2))

    outs = asyncio.run(requests())
    assert sizes == [2, 2, 2]  # six requests in flight, two at a time
    assert [o["answer"] for o in outs] == [r["answer"] for r in reference[24]] * 2


def test_pacer_and_retry_after():
    async def starts() -> list[float]:
        pacer, out = Pacer(600), []  # one start per 0.1 s
        for _ in range(4):
            await pacer.wait()
            out.append(time.monotonic())
        return out

    t = asyncio.run(starts())
    assert min(b - a for a, b in zip(t, t[1:])) >= 0.09
    assert retry_after({"retry-after": "2"}) == 2.0 and retry_after({"retry-after-ms": "250"}) == 0.25
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0 and retry_after({}) is None


def test_run_works_inside_a_running_event_loop(server):
    server.script()

    async def call() -> list:
        return make_node(server).run(items([PROMPT]))

    assert asyncio.run(call())[0]["answer"] == "the answer is blue ."


# -- config, fingerprint and the key ------------------------------------------------------------------

def assert_no_key(folder: Path, *texts: str) -> None:
    assert all(KEY not in t for t in texts)
    for f in folder.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_the_key_never_leaks(server, tmp_path, monkeypatch, caplog):
    cfg = config(server)
    assert KEY not in json.dumps(cfg.model_dump()) and cfg.api_key_env == ENV
    with pytest.raises(ValidationError) as err:
        config(server, api_key_env=KEY)  # a key pasted where its variable's name belongs
    assert KEY not in str(err.value) and KEY not in repr(err.value.errors())
    caplog.set_level(logging.DEBUG)
    wrong = KEY[::-1]
    monkeypatch.setenv(ENV, wrong)
    server.script()
    out = make_node(server).run(items([PROMPT]))[0]  # refused (401, not retried); the server echoes the key
    assert isinstance(out, ItemError) and "HTTP 401" in str(out) and "Bearer ***" in str(out)
    assert wrong not in str(out)
    assert KEY not in caplog.text and wrong not in caplog.text
    monkeypatch.delenv(ENV)
    with pytest.raises(ValueError, match=f"environment variable {ENV} is not set"):
        make_node(server)


def test_fingerprint_takes_served_model_and_tokenizer(server, tiny_model):
    from distillery.teachers.graph import TeacherGraph

    ident = config(server, tokenizer=tiny_model).identity()
    assert ident["served_model"] == "tiny-llm" and ident["tokenizer"].startswith("sha256-dir:")
    prints = {TeacherGraph({"r": config(server, **kw)}).fingerprint
              for kw in ({}, {"model": "other"}, {"expect_system_fingerprint": "fp_x"})}
    assert len(prints) == 3
    server.script(fingerprint="fp_new")  # the provider swapped the model behind the name
    out = make_node(server, expect_system_fingerprint="fp_test").run(items([PROMPT]))[0]
    assert isinstance(out, ItemError) and "'fp_new' is not the expected 'fp_test'" in str(out)


def test_returned_tokens_map_to_ids_or_give_no_soft_labels():
    from distillery.students.model.schema import byte_tokenizer
    from distillery.teachers.remote import TokenMap, soft_labels

    tokens = TokenMap(byte_tokenizer())  # byte-level: " a" is spelled "Ġa"-style, by its bytes
    vocab = byte_tokenizer().get_vocab()
    assert tokens.id(" ", [32]) == vocab["\u0120"] and tokens.id("token_id:7", None) == 7
    entry = lambda tok, lp, alts: {"token": tok, "logprob": lp, "bytes": list(tok.encode()),  # noqa: E731
                                   "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                                    for t, v in alts]}
    content = [entry("a", -0.1, [("b", -3.0), ("a", -0.1)]), entry(" ", -0.2, [(" ", -0.2), ("c", -2.0), ("d", -4)])]
    labels = soft_labels(content, tokens, 20)
    assert labels["token_ids"].tolist() == [vocab["a"], vocab["\u0120"]]
    assert labels["topk_ids"].tolist() == [[vocab["a"], vocab["b"]], [vocab["\u0120"], vocab["c"]]]  # k = 2
    assert labels["topk_logprobs"].dtype == np.float16 and labels["topk_ids"].dtype == np.int32
    assert soft_labels([entry("\u4e2d\u6587", -0.1, [])], tokens, 20) is None  # no alternatives
    assert soft_labels([entry("ab", -0.1, [("ab", -0.1)])], tokens, 20) is None  # not one token here
