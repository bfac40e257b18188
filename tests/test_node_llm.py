"""The `llm` node through real transformers on a tiny Llama that the tests build and train.

The model memorizes one sequence (~100 steps, well under a second), so greedy generation is
predictable: ``<think> light scatters short waves </think> the answer is blue . <eos>``.
"""

from __future__ import annotations

import io
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from distillery.teachers.base import ItemError, NodeInput
from distillery.teachers.generation import Draft, select_draft
from distillery.teachers.nodes.llm import LLMConfig, LLMNode, end_of_generation
from distillery.text import normalize_answer, parse_output, split_reasoning

# "abcdef": transformers' StopStringCriteria probes the vocabulary by encoding this prefix, so a
# word-level vocabulary must know it (byte-level BPE and SentencePiece tokenizers always do).
WORDS = ("abcdef <pad> <unk> <bos> <eos> <think> </think> q : what color is the sky ? light scatters "
         "short waves answer blue . facts question red green").split()
PROMPT = "q : what color is the sky ?"
TARGET = "<think> light scatters short waves </think> the answer is blue . <eos>"


def build_tokenizer(words: list[str] = WORDS, **special):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", **special)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_llm(one_thread, tmp_path_factory) -> str:
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def save_tiny_llm(path) -> str:
    """A 2-layer Llama trained to continue PROMPT with TARGET, saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=128, vocab_size=len(WORDS),
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor([tok(f"{PROMPT} {TARGET}")["input_ids"]])  # (1, T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_node(path: str, **kw) -> LLMNode:
    node = LLMNode("reasoner", LLMConfig(**{"model": path, "prompt": "{request.question}", "max_new_tokens": 24, **kw}))
    node.load()
    return node


def items(prompts: list[str]) -> list[NodeInput]:
    return [NodeInput(input_id=f"in{i}", image=None, texts={"prompt": p}) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def reference(tiny_llm):
    """Teacher-forced log-probs of the saved model: (prompt, generated ids) -> (T, V)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    tok = build_tokenizer()

    def logprobs(prompt: str, token_ids: np.ndarray) -> torch.Tensor:
        prompt_ids = tok(prompt)["input_ids"]
        full = torch.tensor([prompt_ids + token_ids.tolist()])  # (1, P + T)
        with torch.no_grad():
            return model(full).logits[0, len(prompt_ids) - 1:-1].log_softmax(-1)  # (T, V)

    return logprobs


@pytest.fixture(scope="module")
def greedy(tiny_llm) -> LLMNode:
    return make_node(tiny_llm)


# -- pure helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, think, rest", [
    ("<think> a b </think> c", " a b ", " c"),
    ("just c", "", "just c"),
    ("a b </think> c", "a b ", " c"),  # start marker in the prompt (chat templates)
    ("<think> a b", " a b", ""),  # truncated while thinking: no answer yet
])
def test_split_reasoning(text, think, rest):
    assert split_reasoning(text, "<think>", "</think>") == (think, rest)


def test_parse_output_cuts_answer_at_first_stop_string():
    text = "<think> x. </think> 42.\nQ: next ### more"
    assert parse_output(text, "<think>", "</think>", ["###", "\nQ:"]) == ("x.", "42.")
    assert parse_output(text, "<think>", "</think>", []) == ("x.", "42.\nQ: next ### more")


def test_normalize_answer():
    assert normalize_answer("  The  Answer is BLUE. ") == "the answer is blue"


def d(answer: str, lp: float, truncated: bool = False) -> Draft:
    return Draft(text=answer, answer=answer, mean_logprob=lp, truncated=truncated)


def test_select_draft_majority_ties_and_truncation():
    drafts = [d("Blue.", -2.0), d("red", -0.1), d("blue", -1.0), d("red", -3.0), d("green", -0.01, truncated=True)]
    kept, votes = select_draft(drafts, "majority")
    assert votes == [2, 2, 2, 2, 0]
    assert kept == 1  # blue and red tie on 2 votes; red holds the best mean log-prob (-0.1)
    assert select_draft(drafts, "logprob")[0] == 1  # the truncated -0.01 never wins
    kept, votes = select_draft([d("a", -5.0), d("b", -1.0), d("a", -4.0)], "majority")
    assert (kept, votes) == (2, [2, 1, 2])  # majority first, then the best draft within it
    assert select_draft([d("a", -2.0, True), d("b", -1.0, True)], "majority")[0] == 1  # all truncated
    kept, votes = select_draft([d("", -0.1), d(" . ", -0.1), d("", -0.2), d("blue", -3.0)], "majority")
    assert (kept, votes) == (3, [0, 0, 0, 1])  # drafts with no answer never outvote one with an answer
    assert select_draft([d("", -0.3), d("", -0.1, True), d("", -0.2)], "majority") == (2, [2, 0, 2])


def test_end_of_generation_reasons():
    words = ["x", "stop", "y", "<eos>", "<pad>"]
    decode = lambda ids: " ".join(words[i] for i in ids if i < 3)  # noqa: E731

    def end(ids, stop=()):
        return end_of_generation(ids, {3}, 4, list(stop), decode, max_new_tokens=4)

    assert end([0, 0, 3, 4]) == (3, "eos")  # the EOS token is kept
    assert end([0, 1, 2, 2], ["stop"]) == (2, "stop")
    assert end([0, 2, 4, 4], ["stop"]) == (2, "stop")  # trailing padding: a stop criterion fired
    assert end([0, 2]) == (2, "stop")  # the batch ended early, so this row was stopped
    assert end([0, 4, 2, 2]) == (4, "length")  # a pad the model sampled mid-row is kept
    assert end([0, 2, 2, 2], ["stop"]) == (4, "length")


def test_config_refuses_drafts_without_sampling():
    with pytest.raises(ValidationError, match="num_samples > 1 needs do_sample"):
        LLMConfig(model="m", prompt="p", num_samples=3)


# -- the node on a real model --------------------------------------------------------------------

def test_greedy_output_fields_and_raw_logprobs(greedy, reference):
    out = greedy.run(items([PROMPT]))[0]
    assert out["text"] == "<think> light scatters short waves </think> the answer is blue ."
    assert (out["think"], out["answer"]) == ("light scatters short waves", "the answer is blue .")
    assert (out["finish_reason"], out["truncated"]) == ("eos", False)
    T, k = len(TARGET.split()), 20
    assert out["num_generated_tokens"] == T and out["num_prompt_tokens"] == len(PROMPT.split()) + 1
    assert out["token_ids"].dtype == np.int32 and out["token_ids"].shape == (T,)
    assert out["topk_ids"].dtype == np.int32 and out["topk_ids"].shape == (T, k)
    assert out["topk_logprobs"].dtype == np.float16 and out["topk_logprobs"].shape == (T, k)
    assert out["token_ids"][-1] == greedy.tok.eos_token_id
    lp = out["topk_logprobs"].astype(np.float32)
    assert np.all(lp <= 0) and np.all(np.diff(lp, axis=1) <= 0)
    assert np.array_equal(out["topk_ids"][:, 0], out["token_ids"])
    # the stored top-1 is the raw model's log-prob: a teacher-forced forward pass agrees
    ref = reference(PROMPT, out["token_ids"])
    ref_top = ref.gather(1, torch.from_numpy(out["token_ids"]).long()[:, None])[:, 0].numpy()
    np.testing.assert_allclose(lp[:, 0], ref_top, rtol=1e-2, atol=2e-3)
    np.testing.assert_allclose(lp, ref.topk(k, -1).values.numpy(), rtol=1e-2, atol=2e-3)


def test_length_limit_flags_truncation(tiny_llm):
    out = make_node(tiny_llm, max_new_tokens=3).run(items([PROMPT]))[0]
    assert (out["finish_reason"], out["truncated"]) == ("length", True)
    assert out["num_generated_tokens"] == 3 and out["topk_logprobs"].shape == (3, 20)
    assert (out["think"], out["answer"]) == ("light scatters", "")


def test_bfloat16_weights_record_the_same_layout_in_float32_logprobs(tiny_llm, greedy):
    node = make_node(tiny_llm, dtype="bfloat16")
    assert next(node.model.parameters()).dtype == torch.bfloat16
    out, ref = node.run(items([PROMPT]))[0], greedy.run(items([PROMPT]))[0]
    assert out["topk_ids"].dtype == np.int32 and out["topk_logprobs"].dtype == np.float16
    assert out["topk_logprobs"].shape[1] == ref["topk_logprobs"].shape[1] == 20
    assert np.isfinite(out["topk_logprobs"].astype(np.float32)).all()
    assert LLMConfig(model="m", prompt="{request.question}").dtype == "float32"  # the default stays exact


def test_score_gives_the_teachers_top_k_on_a_given_continuation(greedy):
    """On-policy distillation scores the student's own tokens: teacher-forced on the teacher's own
    generation, the scores equal what generation recorded; on another continuation they differ."""
    out = greedy.run(items([PROMPT]))[0]
    (same,) = greedy.score([PROMPT], [out["token_ids"].tolist()])
    np.testing.assert_array_equal(same["topk_ids"][:, 0], out["topk_ids"][:, 0])
    np.testing.assert_allclose(same["topk_logprobs"].astype(np.float32), out["topk_logprobs"].astype(np.float32),
                               atol=2e-2)
    assert same["topk_ids"].dtype == np.int32 and same["topk_logprobs"].dtype == np.float16
    flipped = out["token_ids"][::-1].tolist()
    (other,) = greedy.score([PROMPT], [flipped])
    assert other["token_logprobs"].sum() < same["token_logprobs"].sum()  # the teacher prefers its own answer


def test_stop_string_ends_generation(tiny_llm):
    out = make_node(tiny_llm, stop=["blue"], logprobs_k=5).run(items([PROMPT]))[0]
    assert out["text"].endswith("the answer is blue")
    assert out["answer"] == "the answer is"
    assert (out["finish_reason"], out["truncated"]) == ("stop", False)
    assert out["topk_ids"].shape == (out["num_generated_tokens"], 5)


def test_think_markers_survive_when_registered_as_special_tokens(tiny_llm, tmp_path):
    shutil.copytree(tiny_llm, tmp_path / "m")
    build_tokenizer(additional_special_tokens=["<think>", "</think>"]).save_pretrained(tmp_path / "m")
    out = make_node(str(tmp_path / "m")).run(items([PROMPT]))[0]
    assert out["text"] == "<think> light scatters short waves </think> the answer is blue ."  # no <eos>
    assert (out["think"], out["answer"]) == ("light scatters short waves", "the answer is blue .")


def test_stop_strings_the_tokenizer_cannot_match_fail_at_load(tiny_llm, tmp_path):
    shutil.copytree(tiny_llm, tmp_path / "m")
    build_tokenizer([w for w in WORDS if w != "abcdef"]).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"llm node 'reasoner': stop strings \['blue'\] cannot be matched"):
        make_node(str(tmp_path / "m"), stop=["blue"])


def test_overlong_prompt_is_refused_alone(greedy):
    long_prompt = " ".join(["sky"] * 110)  # 111 tokens + 24 new > 128
    outs = greedy.run(items([PROMPT, long_prompt, "q : sky ?"]))
    assert isinstance(outs[1], ItemError)
    assert str(outs[1]) == "prompt is 111 tokens; model context is 128 (max_position_embeddings) with max_new_tokens=24"
    assert outs[0]["answer"] == "the answer is blue ."
    alone = greedy.run(items([PROMPT]))[0]
    assert np.array_equal(outs[0]["token_ids"], alone["token_ids"])  # left padding changes nothing
    assert outs[2]["num_generated_tokens"] > 0 and outs[2]["prompt"] == "q : sky ?"


def check_majority(out: dict) -> None:
    """The kept draft is the one select_draft's rules pick, recomputed from the drafts."""
    drafts = out["drafts"]
    assert len(drafts) == 5 and sum(x["kept"] for x in drafts) == 1
    kept = next(x for x in drafts if x["kept"])
    assert (out["text"], out["answer"]) == (kept["text"], kept["answer"])
    finished = [x for x in drafts if x["finish_reason"] != "length"]
    voters = [x for x in finished if normalize_answer(x["answer"])] or finished or drafts
    counts = Counter(normalize_answer(x["answer"]) for x in voters)
    assert all(x["votes"] == counts[normalize_answer(x["answer"])] for x in voters)
    assert kept in voters and kept["votes"] == max(counts.values())
    best = max((x for x in voters if x["votes"] == kept["votes"]), key=lambda x: x["mean_logprob"])
    assert kept["mean_logprob"] == best["mean_logprob"]


def test_sampled_drafts_majority_vote_and_seed(tiny_llm, reference):
    kw = dict(do_sample=True, temperature=1.5, num_samples=5, seed=8)
    prompts = items([PROMPT, "q : sky ?"])
    outs = make_node(tiny_llm, **kw).run(prompts)
    for out in outs:
        check_majority(out)
        assert out["token_ids"].shape == (out["num_generated_tokens"],)
    assert any(len({x["text"] for x in o["drafts"]}) > 1 for o in outs)  # sampling does vary drafts
    # soft labels are the raw model's distribution, not the temperature-scaled sampling one
    ref = reference(PROMPT, outs[0]["token_ids"]).topk(20, -1)
    np.testing.assert_allclose(outs[0]["topk_logprobs"].astype(np.float32), ref.values.numpy(), rtol=1e-2, atol=2e-3)
    again = make_node(tiny_llm, **kw).run(prompts)
    assert [[x["text"] for x in o["drafts"]] for o in again] == [[x["text"] for x in o["drafts"]] for o in outs]
    assert all(np.array_equal(a["topk_logprobs"], b["topk_logprobs"]) for a, b in zip(again, outs))


# -- a rag node feeding an llm node through the graph ---------------------------------------------

def test_graph_rag_feeds_llm(tiny_llm, tmp_path):
    from distillery.flows.spec import Spec
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.records import Request, make_input_id

    kb = tmp_path / "kb.jsonl"
    kb.write_text('{"id": "sky", "text": "the sky is blue"}\n{"id": "grass", "text": "grass is green"}\n')
    spec = Spec.model_validate({"name": "t", "teachers": {
        "retriever": {"type": "rag", "documents": str(kb), "top_k": 1, "cache_dir": str(tmp_path / "idx")},
        "reasoner": {"type": "llm", "model": tiny_llm, "max_new_tokens": 24,
                     "prompt": "facts: {retriever.context} question: {request.question}"},
    }})
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    questions = ["what color is the sky ?", "what color is grass ?"]
    reqs = [Request(make_input_id(buf.getvalue(), q), "x.png", buf.getvalue(), q) for q in questions]
    graph = TeacherGraph(spec.teachers)
    assert graph.order == ["retriever", "reasoner"]
    rag = graph.run_node("retriever", reqs, [{}, {}])
    assert [r.error for r in rag] == [None, None]
    assert [r.output["ids"] for r in rag] == [["sky"], ["grass"]]
    llm = graph.run_node("reasoner", reqs, [{"retriever": r.output} for r in rag])
    assert [r.error for r in llm] == [None, None]
    assert llm[0].output["prompt"] == "facts: the sky is blue question: what color is the sky ?"
    assert all(r.output["token_ids"].shape[0] == r.output["num_generated_tokens"] > 0 for r in llm)
