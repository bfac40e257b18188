"""The demo's reasoning LLM: a word-level tokenizer and a small Llama trained from scratch.

Training pairs are (prompt -> reasoning trace + eos). Prompts are rendered exactly like the teacher
graph renders them (``kb.build_prompt``): the detections summary, the *real* retriever's top-k
documents for the question (so the model learns with the retriever's noise), and the question.
Scenes for training are label lists drawn like the world's scenes (no pixels are needed for the
text model), so every step sees fresh examples.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from distillery.demo import kb
from distillery.demo import retrieval

SPECIALS = ["<pad>", "<unk>", "<eos>", "<think>", "</think>"]


class LLMTrainConfig(BaseModel):
    """Model size and training schedule of the reasoning teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(384, ge=16)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    max_positions: int = Field(384, ge=64, description="Longest prompt + trace, in tokens.")
    steps: int = Field(3000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(100, ge=0)
    top_ks: tuple[int, ...] = Field((3, 4, 5), description="Retriever top-k values mixed in training.")
    max_objects: int = Field(8, ge=1, description="Most objects in a training scene.")
    focus: float = Field(0.5, ge=0, le=1, description="Chance a counted class is in a training scene.")
    large: float = Field(0.5, ge=0, le=1, description="Chance an object of a training scene is large.")
    eval_every: int = Field(250, ge=1, description="Log held-out answer accuracy every so many steps.")
    threads: int = Field(1, ge=1, description="torch threads (shares the cores with YOLO training).")
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def world_text() -> list[str]:
    """Every kind of text the model reads or writes, for the tokenizer's vocabulary."""
    texts = [d.text for d in kb.knowledge_base()] + [q.text for q in kb.question_bank()]
    texts += [kb.build_prompt(kb.describe_detections(list(kb.CLASSES), list(kb.CLASSES)), "", "")]
    texts += [" ".join(str(i) for i in range(64)), "nothing neither yes no x", " ".join(kb.PLURAL.values())]
    labels = list(kb.CLASSES)
    texts += [kb.render_trace(labels, q, labels) for q in kb.question_bank()]
    return texts


def build_tokenizer(class_tokens: bool = True):
    """WordLevel tokenizer: lowercase, split on whitespace, punctuation and digits.

    class_tokens: each of the 12 class names ("red triangle") is one token too, so finding a
    class's count in the detections is a one-token lookup (two-token keys did not train in budget)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=False)])
    tok.train_from_iterator(world_text(), trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1))
    if class_tokens:
        tok.add_tokens([AddedToken(c, single_word=True, normalized=True) for c in kb.CLASSES])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", additional_special_tokens=["<think>", "</think>"])
    return fast


# ---------------------------------------------------------------------------------------------
# Training examples
# ---------------------------------------------------------------------------------------------

def sample_labels(rng: np.random.Generator, max_objects: int, question: kb.Question,
                  focus: float, large: float = 0.0) -> tuple[list[str], list[str]]:
    """A scene's labels for training on ``question``, and the labels of its large objects: each
    class the question counts is present (1-3 times) with probability ``focus``, the rest of the
    scene is random classes; each object is large with probability ``large``.

    Scenes drawn like the world's leave most counted classes absent (12 classes, ~4 objects), and
    a model then learns to answer "0" without looking; the focus forces it to look them up."""
    labels = []
    for m in question.meanings:
        for c in kb.MEANINGS[m]:
            if rng.random() < focus:
                labels += [c] * int(rng.integers(1, 4))
    n_other = int(rng.integers(0, max(max_objects - len(labels), 0) + 1))
    labels += [kb.CLASSES[i] for i in rng.integers(len(kb.CLASSES), size=n_other)]
    labels = [labels[i] for i in rng.permutation(len(labels))]
    return labels, [c for c in labels if rng.random() < large]


def example(labels: list[str], question: kb.Question, context: str,
            large: list[str] = ()) -> tuple[str, str]:
    """(prompt, target) for one scene (its labels and its large objects' labels) and question."""
    prompt = kb.build_prompt(kb.describe_detections(labels, list(large)), context, question.text)
    return prompt, " " + kb.render_trace(labels, question, list(large))


def encode_pair(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """ids = prompt + target + eos; labels = -100 on the prompt (loss on the target only)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + t, [-100] * len(p) + t


def make_batch(tok, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each (B, T)."""
    enc = [encode_pair(tok, p, t) for p, t in pairs]
    T = max(len(ids) for ids, _ in enc)
    ids = torch.full((len(enc), T), tok.pad_token_id)
    labels = torch.full((len(enc), T), -100)
    mask = torch.zeros((len(enc), T), dtype=torch.long)
    for i, (x, y) in enumerate(enc):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ExampleStream:
    """Endless seeded (prompt, target) pairs: fresh scenes, uniform question types, real retrieval."""

    def __init__(self, cfg: LLMTrainConfig, stream: int = 0):
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, 7, stream])
        self.contexts = {k: retrieval.question_contexts(k) for k in cfg.top_ks}

    def batch(self, n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            q = kb.sample_questions(self.rng, 1)[0]
            labels, large = sample_labels(self.rng, self.cfg.max_objects, q, self.cfg.focus, self.cfg.large)
            k = self.cfg.top_ks[self.rng.integers(len(self.cfg.top_ks))]
            out.append(example(labels, q, self.contexts[k][q.text][0], large))
        return out


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------

def build_model(cfg: LLMTrainConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config)


def _lr(step: int, cfg: LLMTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train_llm(cfg: LLMTrainConfig, out_dir: Path, log=print) -> Path:
    """Train the reasoning teacher and save it (safetensors + config + tokenizer) in ``out_dir``."""
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    tok = build_tokenizer()
    model = build_model(cfg, tok)
    stream = ExampleStream(cfg)
    held = ExampleStream(cfg, stream=1).batch(64)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    t0 = time.time()
    try:
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg)
            batch = make_batch(tok, stream.batch(cfg.batch_size))
            loss = model(**batch).loss  # mean cross-entropy over target tokens
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 100 == 0 or step == cfg.steps - 1:
                log(f"llm step {step}/{cfg.steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
            if (step + 1) % cfg.eval_every == 0:
                log(f"llm step {step + 1} held-out answer accuracy {held_out_accuracy(tok, model, held):.3f}")
    finally:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Inference (greedy), for evaluation
# ---------------------------------------------------------------------------------------------

def load_llm(llm_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True).eval()
    return tok, model


def held_out_accuracy(tok, model, pairs: list[tuple[str, str]]) -> float:
    """Greedy answers on (prompt, target) pairs the model never trains on."""
    model.eval()
    outs = generate(tok, model, [p for p, _ in pairs])
    model.train()
    return sum(kb.parse_answer(o) == kb.parse_answer(t) for o, (_, t) in zip(outs, pairs)) / len(pairs)


@torch.no_grad()
def generate(tok, model, prompts: list[str], max_new_tokens: int = 96, batch_size: int = 64) -> list[str]:
    """Greedy completions (decoded text after the prompt), batched with left padding."""
    tok.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i: i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]  # (B, new)
        out += tok.batch_decode(new, skip_special_tokens=False)
    return [o.replace(tok.eos_token, "").replace(tok.pad_token, "").strip() for o in out]
