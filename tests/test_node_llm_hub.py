"""The `llm` node on the architectures real teams load from the hub: Qwen2 and Llama configs (tiny,
random weights, built offline with the real transformers classes) behind a byte-level BPE tokenizer
trained with `tokenizers` and saved as a hub-style folder with a ChatML chat template.

What a user relies on: `chat: true` applies the template (system + user turn + the assistant's
generation prompt, no second BOS); the EOS ids come from the model's generation_config (a list, as
Qwen and Llama 3 ship it); a stop string spanning several BPE tokens ends generation at its end;
`<think>` as special tokens stays in the decoded text; the records keep the top-k layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distillery.teachers.base import NodeInput
from distillery.teachers.nodes.llm import LLMConfig, LLMNode

CORPUS = ["objects: 2 red boxes, 1 blue box. question: how many boxes are there? answer: three",
          "facts: pumps leak when seals wear. question: why does the pump leak? answer: the seal",
          "<think> count the red boxes then the blue ones </think> the answer is three"] * 20
PROMPT = "objects: 2 red boxes. question: how many red boxes?"


def save_hub_model(path, arch: str, think_special: bool) -> str:
    """A hub-style folder: byte-level BPE tokenizer (+ chat template) and a tiny random model
    (the demo's stand-in writer, on this file's corpus)."""
    from distillery.demo.standins import write_hub_llm

    return write_hub_llm(path, arch, think_special, corpus=CORPUS)


def node(path: str, **kw) -> LLMNode:
    n = LLMNode("reasoner", LLMConfig(**{"model": path, "prompt": "{request.question}", "max_new_tokens": 12,  # sampled, seeded
                                         "chat": True, "system": "You count objects.", "do_sample": True, **kw}))
    n.load()
    return n


def run(n: LLMNode, prompt: str = PROMPT) -> dict:
    return n.run([NodeInput(input_id="in0", image=None, texts={"prompt": prompt})])[0]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def hub_model(request, tmp_path_factory) -> str:
    return save_hub_model(tmp_path_factory.mktemp(request.param), request.param, think_special=True)


def test_chat_template_wraps_the_prompt_and_the_records_keep_the_top_k_layout(hub_model):
    from transformers import AutoTokenizer

    n = node(hub_model)
    out = run(n)
    assert out["prompt"] == ("<|im_start|>system\nYou count objects.<|im_end|>\n<|im_start|>user\n"
                             f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    tok = AutoTokenizer.from_pretrained(hub_model)
    messages = [{"role": "system", "content": "You count objects."}, {"role": "user", "content": PROMPT}]
    assert out["num_prompt_tokens"] == len(tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=True, return_dict=False))
    t = out["num_generated_tokens"]
    assert out["token_ids"].dtype == np.int32 and out["token_ids"].shape == (t,)
    assert out["topk_ids"].dtype == np.int32 and out["topk_ids"].shape == (t, 20)
    assert out["topk_logprobs"].dtype == np.float16 and (np.diff(out["topk_logprobs"].astype(float), axis=1) <= 0).all()
    think = {tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")}
    assert not think & n.hidden_ids and tok.convert_tokens_to_ids("<|im_end|>") in n.hidden_ids


def test_eos_ids_come_from_the_generation_config(hub_model, tmp_path):
    import shutil

    free = run(node(hub_model, max_new_tokens=8))["token_ids"].tolist()
    j = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # first new token after the first
    folder = shutil.copytree(hub_model, tmp_path / "m")
    cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": [free[j]]}))
    out = run(node(str(folder), max_new_tokens=8))
    assert out["finish_reason"] == "eos" and out["token_ids"].tolist() == free[:j + 1]  # the EOS kept


def test_a_stop_string_of_several_bpe_tokens_ends_generation(hub_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hub_model)
    free = run(node(hub_model, max_new_tokens=10))["token_ids"].tolist()
    text = tok.decode(free)
    for a in range(1, len(free) - 2):  # a stop string made of tokens a..a+1, not seen earlier in the text
        stop = tok.decode(free[a:a + 2])
        if stop.strip() and stop.isascii() and stop.isprintable() and len(tok(stop, add_special_tokens=False)["input_ids"]) >= 2 \
                and stop not in tok.decode(free[:a + 1]):
            break
    else:
        pytest.fail(f"no multi-token stop string in {text!r}")
    out = run(node(hub_model, max_new_tokens=10, stop=[stop]))
    assert out["finish_reason"] == "stop"
    assert out["token_ids"].tolist() == free[:a + 2]  # cut at the token that completes the stop string
    assert stop not in out["answer"]


def test_think_markers_as_plain_text_tokenize_to_several_tokens_and_still_split(tmp_path):
    from transformers import AutoTokenizer

    path = save_hub_model(tmp_path / "plain", "qwen2", think_special=False)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok("<think>", add_special_tokens=False)["input_ids"]) > 1  # plain text, not one special token
    n = node(path)
    assert run(n)["num_generated_tokens"] > 0


def test_chat_true_without_a_chat_template_fails_at_load_naming_the_node(tmp_path):
    path = save_hub_model(tmp_path / "no-template", "llama", think_special=False)
    cfg = json.loads((tmp_path / "no-template" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "no-template" / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in (tmp_path / "no-template").glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(ValueError, match="llm node 'reasoner': chat: true, but the tokenizer"):
        node(path)
    with pytest.raises(ValueError, match="system message needs chat: true"):
        LLMConfig(model=path, prompt="{request.question}", system="hi")
