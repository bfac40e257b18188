"""On-policy distillation (``training.on_policy``, students/training/onpolicy.py): the loss by its
math, the scores' own records in the trace store, a run on the tiny world that goes through the
real ``llm`` node (a tiny Llama over the test tokenizer), and a killed run that resumes without
paying for a stored round's teacher calls again."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.students.training.config import OnPolicyConfig, TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def target_from(topk_ids, topk_lp, ids) -> dict[str, torch.Tensor]:
    """A collated one-row answer target (what the llm head's collate gives) from scores."""
    T = len(ids)
    ones = torch.ones(1, T, dtype=torch.bool)
    return {"mask": torch.ones(1, dtype=torch.bool), "answer_ids": torch.as_tensor(ids)[None], "answer_mask": ones,
            "answer_topk_ids": torch.as_tensor(topk_ids)[None].long(),
            "answer_topk_logprobs": torch.as_tensor(topk_lp)[None], "answer_kd_mask": ones}


# -- the loss -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_onpolicy_loss_is_zero_when_the_student_is_the_teacher(kind):
    from distillery.students.training.onpolicy import onpolicy_loss

    torch.manual_seed(0)
    T, V = 5, 11
    logits = torch.randn(1, T, V)  # the student's
    lp = logits[0].log_softmax(-1)
    vals, ids = lp.topk(V, -1)  # the teacher's top-k with k = V: the same distribution
    target = target_from(ids, vals, torch.randint(0, V, (T,)))
    cfg = OnPolicyConfig(kind=kind)
    assert onpolicy_loss(logits, target, cfg).item() == pytest.approx(0.0, abs=1e-6)
    other = onpolicy_loss(logits + torch.randn(1, T, V), target, cfg).item()
    assert other > 1e-3


def save_tiny_llm(path: Path, words: list[str], bos: bool = False) -> str:
    """A 2-layer random Llama over ``words`` (the tokenizer must already be saved in ``path``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(words),
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def test_onpolicy_loss_on_tiny_teacher_scores_decreases(tmp_path):
    """A student (a table of logits) answers; the real tiny teacher scores that answer with
    ``LLMNode.score``; a few steps on the on-policy loss bring the student toward the teacher."""
    from student_support import WORDS, build_tokenizer

    from distillery.students.training.onpolicy import onpolicy_loss
    from distillery.teachers.nodes.llm import LLMConfig, LLMNode

    build_tokenizer().save_pretrained(str(tmp_path))
    node = LLMNode("reasoner", LLMConfig(model=save_tiny_llm(tmp_path, WORDS), prompt="{request.question}",
                                         logprobs_k=8))
    node.load()
    torch.manual_seed(1)
    student = torch.nn.Parameter(3 * torch.randn(1, 4, len(WORDS)))  # (1, T, V): far from the teacher
    answer = student[0].argmax(-1).tolist()  # the student's own (greedy) tokens
    (scores,) = node.score(["how many red boxes are there ?"], [answer])
    target = target_from(scores["topk_ids"], scores["topk_logprobs"], answer)
    opt = torch.optim.Adam([student], lr=0.05)
    seen = []
    for _ in range(30):
        loss = onpolicy_loss(student, target, OnPolicyConfig(kind="jsd"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    assert seen[0] > 0.1 and seen[-1] < 0.5 * seen[0] and seen[5] < seen[0]


# -- the scores' own records ---------------------------------------------------------------------

def test_scores_are_their_own_records_deduplicated_and_leave_the_traces_version_alone(tmp_path):
    from student_support import make_records

    from distillery.teachers.records import ScoreRecord, answer_hash
    from distillery.teachers.store import TraceStore

    store = TraceStore(tmp_path / "traces.lance")
    assert store.append(make_records()) == 1
    scores = {"topk_ids": np.arange(6, dtype=np.int32).reshape(3, 2),
              "topk_logprobs": np.full((3, 2), -0.5, np.float16), "token_logprobs": np.zeros(3, np.float32)}
    rec = ScoreRecord(1, "in0", answer_hash([4, 5, 2]), "fp", "reasoner", "p", np.array([4, 5, 2]), scores, 0.1)
    assert store.scores.append([rec, rec]) == 1 and store.scores.append([rec]) == 0
    assert store.scores.append([replace(rec, round=2)]) == 1
    back = store.scores.read("fp", "reasoner", rounds=[1])
    assert list(back) == [rec.key] and back[rec.key].scores["topk_logprobs"].dtype == np.float16
    assert np.array_equal(back[rec.key].token_ids, [4, 5, 2])
    assert store.version == 1 and len(store.read()) == len(make_records())


# -- a run on the tiny world through the real llm node ------------------------------------------------

@pytest.fixture(scope="module")
def llm_root(tmp_path_factory):
    """The tiny graph's files with a real (tiny, random) Llama in the llm node's folder."""
    from student_support import WORDS, write_graph

    root = tmp_path_factory.mktemp("onpolicy")
    write_graph(root)
    save_tiny_llm(root / "llm", WORDS)
    return root


def world(root: Path, name: str, spec_file: str = "spec.yaml", **on_policy):
    """A spec with on-policy rounds and a fresh trace store of the tiny records under ``root/name``."""
    from student_support import make_records, tiny_config

    from distillery.flows.spec import load_spec
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.store import TraceStore

    spec = load_spec(root / spec_file)
    op = {"enabled": True, "rounds": 2, "samples_per_round": 4, "steps_per_round": 2, "gkd_lambda": 1.0,
          "lr": 1e-3} | on_policy
    training = TrainConfig(epochs=25, batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=2, val_fraction=0.3,
                           agreement_every=0, device="cpu", seed=3, onnx_export=False, on_policy=op)
    spec = spec.model_copy(update={"student": tiny_config(max_answer_tokens=4), "training": training})
    fp = TeacherGraph(spec.teachers).fingerprint
    store = TraceStore(root / name / "traces.lance")
    store.append([replace(r, graph_fingerprint=fp) for r in make_records()])
    return spec, store


class Crash(RuntimeError):
    pass


def test_on_policy_run_goes_through_the_real_llm_node_and_stores_its_calls(llm_root):
    from distillery.students.training.train import train

    spec, store = world(llm_root, "run")
    events = []
    result = train(spec, store.uri, out_dir=llm_root / "run" / "student", progress=False, callback=events.append)
    op = result.metrics["on_policy"]
    assert op["node"] == "reasoner" and op["rounds"] == 2 and op["answered"] == 2 * min(4, result.num_train)
    assert op["scored"] > 0 and op["teacher_calls"] == op["scored"] and op["cached"] == 0
    assert op["teacher_seconds"] > 0 and op["on_policy_steps"] == op["steps"] == 4
    assert store.scores.count() == op["teacher_calls"]
    stored = store.scores.read(result.lineage["graph_fingerprint"], "reasoner")
    # the prompt the teacher saw: rendered through the node's template from the recorded detector output
    questions = {r.question for r in store.read()}
    assert all(any(rec.prompt.endswith(q) for q in questions) and rec.prompt != "p" for rec in stored.values())
    written = json.loads((result.out_dir / "metrics.json").read_text())
    assert written["on_policy"]["teacher_calls"] == op["teacher_calls"]
    assert "agreement_offline" in written and "reasoner" in written["agreement"]
    assert [e["round"] for e in events if e["event"] == "onpolicy_round"] == [1, 2]


def test_killed_on_policy_run_resumes_without_rescoring_stored_rounds(llm_root):
    from distillery.students.training.train import train

    spec, store = world(llm_root, "killed")
    out = llm_root / "killed" / "student"

    def crash(event):
        if event["event"] == "onpolicy_scored" and event["round"] == 2:
            raise Crash("killed after round 2's teacher calls")

    with pytest.raises(Crash):
        train(spec, store.uri, out_dir=out, progress=False, callback=crash)
    paid = store.scores.count()
    assert paid > 0 and (out / "checkpoints_onpolicy").is_dir()
    resumed = train(spec, store.uri, out_dir=out, progress=False, resume=True)
    op = resumed.metrics["on_policy"]
    assert store.scores.count() == paid  # nothing scored twice
    assert op["per_round"][1]["teacher_calls"] == 0 and op["per_round"][1]["cached"] == op["per_round"][1]["scored"]
    assert op["teacher_calls"] == op["per_round"][0]["teacher_calls"]  # round 1's, from its checkpoint
    # and the resumed run ends where an uninterrupted one does
    spec2, store2 = world(llm_root, "straight")
    straight = train(spec2, store2.uri, out_dir=llm_root / "straight" / "student", progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- a black-box teacher: score where the server can, else say so and stay offline -----------------

def openai_world(root: Path, name: str, base_url: str):
    """The tiny world with its reasoner behind an OpenAI-compatible server."""
    import yaml

    spec_path = root / f"spec-{name}.yaml"
    raw = yaml.safe_load((root / "spec.yaml").read_text())
    raw["teachers"]["reasoner"] = {"type": "openai", "base_url": base_url, "model": "tiny", "tokenizer": "llm",
                                   "prompt": raw["teachers"]["reasoner"]["prompt"], "max_retries": 0}
    spec_path.write_text(yaml.safe_dump(raw))
    return world(root, name, spec_path.name)


def test_a_server_that_cannot_score_falls_back_to_the_offline_student_and_says_why(llm_root):
    """The demo's OpenAI-compatible server (a real one, on 127.0.0.1) serves chat completions
    only: no echoed prompt log-probs, so the on-policy rounds are skipped with a clear message."""
    from distillery.demo.openai_server import TeacherServer
    from distillery.students.training.train import train

    with TeacherServer(llm_root / "llm") as server:
        spec, store = openai_world(llm_root, "blackbox", server.base_url)
        with pytest.warns(UserWarning, match="on-policy distillation skipped.*cannot score a given continuation"):
            result = train(spec, store.uri, out_dir=llm_root / "blackbox" / "student", progress=False)
    op = result.metrics["on_policy"]
    assert op["node"] == "reasoner" and "HTTP 404" in op["fallback"] and store.scores.count() == 0
    assert (result.out_dir / "model.safetensors").is_file() and result.metrics["agreement"]


def test_openai_node_scores_through_echoed_completions_logprobs(llm_root):
    """Where the server scores (completions with echo + logprobs, as vLLM): the node sends the
    prompt and continuation as token ids and returns the rows of the continuation in the ``llm``
    layout. (The server here is a stand-in answering from the in-process tiny Llama.)"""
    import httpx

    from distillery.teachers.nodes.llm import LLMConfig, LLMNode
    from distillery.teachers.nodes.openai import OpenAIConfig, OpenAINode, ScoringUnsupported

    llm = LLMNode("ref", LLMConfig(model=str(llm_root / "llm"), prompt="-", logprobs_k=5))
    llm.load()
    vocab = {i: t for t, i in llm.tok.get_vocab().items()}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        ids = body["prompt"]
        (s,) = llm.score([llm.tok.decode(ids[:1])], [ids[1:]])  # row i: the log-probs of token i + 1
        top = [None] + [{vocab[int(t)]: float(v) for t, v in zip(ti, tv)}
                        for ti, tv in zip(s["topk_ids"], s["topk_logprobs"])]
        lp = {"tokens": [vocab[i] for i in ids], "token_logprobs": [None, *s["token_logprobs"].tolist()],
              "top_logprobs": top, "text_offset": list(range(len(ids)))}
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 0, "model": "tiny",
                                         "choices": [{"index": 0, "text": "", "finish_reason": "length",
                                                      "logprobs": lp}]})

    node = OpenAINode("reasoner", OpenAIConfig(base_url="http://127.0.0.1:9/v1", model="tiny", prompt="-",
                                               tokenizer=str(llm_root / "llm"), logprobs_k=5))
    node.load()
    node.http_client = httpx.Client(transport=httpx.MockTransport(handler))
    prompt, cont = "how", llm.tok("two <eos>", add_special_tokens=False)["input_ids"]
    (got,) = node.score([prompt], [cont])
    (want,) = llm.score([prompt], [cont])
    assert np.array_equal(got["topk_ids"], want["topk_ids"]) and got["topk_logprobs"].dtype == np.float16
    np.testing.assert_allclose(got["topk_logprobs"].astype(float), want["topk_logprobs"].astype(float), atol=2e-3)
    no_tok = OpenAINode("reasoner", OpenAIConfig(base_url="http://127.0.0.1:9/v1", model="tiny", prompt="-"))
    no_tok.load()
    with pytest.raises(ScoringUnsupported, match="needs `tokenizer`"):
        no_tok.score([prompt], [cont])
