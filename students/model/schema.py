"""What the student must know about the teacher graph, and the tokenizer it reads and writes.

``build_schema`` derives it from the spec and the records: per node its type and what sizes the
head (classes, documents), and for the text side the teacher LLM's tokenizer, its vocabulary
size and eos ids. JSON-serializable: it is saved in the student's config.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distillery.teachers.records import TeacherRecord

NODE_TYPES = ("yolo", "rag", "llm")


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

@dataclass
class StudentSchema:
    """Everything the model needs to know about the graph; JSON (saved in config.json).

    nodes: node name -> {"type": "yolo", "task", "num_classes", "class_names", "conf", "iou",
    "max_det"} | {"type": "rag", "doc_ids", "top_k"} | {"type": "llm", "model", "stop",
    "think_start", "think_end"}. text: {"vocab_size", "pad_id", "eos_ids"}. tokenizer: the folder
    (or hub id) of the tokenizer; None = a built-in byte-level one (graphs without an llm node)."""

    nodes: dict[str, dict[str, Any]]
    text: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    default_question: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentSchema":
        return cls(**d)


def build_schema(spec, records: list[TeacherRecord]) -> StudentSchema:
    """The schema of ``spec``'s teacher graph; class counts and document ids also come from the
    records (the documents file of a rag node, when readable, fixes the document order)."""
    nodes: dict[str, dict[str, Any]] = {}
    for name in spec.topological_order():  # the last llm node is the graph's final answer
        cfg = spec.teachers[name]
        outs = [r.outputs[name] for r in records if isinstance(r.outputs.get(name), dict)]
        if cfg.type == "yolo":
            nodes[name] = _yolo_node(name, cfg, outs)
        elif cfg.type == "rag":
            nodes[name] = _rag_node(name, cfg, outs)
        elif cfg.type == "llm":
            nodes[name] = {"type": "llm", "model": cfg.model, "stop": list(cfg.stop),
                           "think_start": cfg.think_start, "think_end": cfg.think_end}
        else:
            raise KeyError(f"teachers.{name}: the student has no head for node type {cfg.type!r}; "
                           f"known: {', '.join(NODE_TYPES)}")
    llms = [n for n in nodes.values() if n["type"] == "llm"]
    schema = StudentSchema(nodes, tokenizer=llms[0]["model"] if llms else None,
                           default_question=spec.inputs.default_question)
    tok = load_tokenizer(schema)
    _check_same_tokenizer(tok, llms)
    llm_names = [k for k, n in nodes.items() if n["type"] == "llm"]
    schema.text = _text_info(tok, llms[0]["model"] if llms else None, records, llm_names)
    return schema


def _yolo_node(name: str, cfg, outs: list[dict]) -> dict[str, Any]:
    names: dict[int, str] = {}
    num = 0
    for o in outs:
        probs = np.asarray(o.get("class_probs", []))
        if probs.ndim == 2:
            num = max(num, probs.shape[1])
        for c, label in zip(np.asarray(o.get("classes", []), dtype=np.int64).tolist(), o.get("labels", [])):
            names[c] = str(label)
    num = max(num, max(names, default=-1) + 1, 1)
    return {"type": "yolo", "task": cfg.task, "num_classes": num,
            "class_names": [names.get(i, str(i)) for i in range(num)],
            "conf": cfg.conf, "iou": cfg.iou, "max_det": cfg.max_det, "large_area": getattr(cfg, "large_area", None)}


def _rag_node(name: str, cfg, outs: list[dict]) -> dict[str, Any]:
    from distillery.teachers.nodes.rag import read_documents

    ids: list[str] = []
    if Path(cfg.documents).is_file():
        ids = read_documents(cfg.documents)[0]
    known = set(ids)
    extra = sorted({str(i) for o in outs for i in o.get("ids", [])} - known)
    ids += extra
    if not ids:
        raise ValueError(f"teachers.{name}: no documents: {cfg.documents} is not readable and no record holds "
                         "retrieved ids")
    return {"type": "rag", "doc_ids": ids, "top_k": cfg.top_k}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _text_info(tok, model: str | None, records: list[TeacherRecord], llm_names: list[str]) -> dict[str, Any]:
    """Vocabulary size (tokenizer, model config and every stored id must fit) and eos ids."""
    vocab = len(tok)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if model is not None and Path(model).is_dir():
        conf = _read_json(Path(model) / "config.json")
        vocab = max(vocab, int(conf.get("vocab_size") or conf.get("text_config", {}).get("vocab_size") or 0))
        for c in (conf, _read_json(Path(model) / "generation_config.json")):
            e = c.get("eos_token_id")
            eos |= set(e if isinstance(e, list) else [e] if e is not None else [])
    for r in records:
        for name in llm_names:
            o = r.outputs.get(name) or {}
            for key in ("token_ids", "topk_ids"):
                a = np.asarray(o.get(key, []))
                if a.size:
                    vocab = max(vocab, int(a.max()) + 1)
    if not eos:
        raise ValueError(f"tokenizer {model or '(byte-level)'}: no eos token (tokenizer or model config), "
                         "so the student could not learn to stop")
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    return {"vocab_size": vocab, "pad_id": int(pad), "eos_ids": sorted(int(e) for e in eos)}


def _check_same_tokenizer(tok, llms: list[dict]) -> None:
    for n in llms[1:]:
        other = load_tokenizer(StudentSchema({}, tokenizer=n["model"])) if n["model"] != llms[0]["model"] else tok
        if other.get_vocab() != tok.get_vocab():
            raise ValueError(f"llm nodes use different tokenizers ({llms[0]['model']} vs {n['model']}); "
                             "the student's one text decoder needs one vocabulary")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def load_tokenizer(schema: StudentSchema):
    """The teacher LLM's tokenizer (so per-token soft labels line up); a byte-level one when the
    graph has no llm node."""
    if schema.tokenizer is None:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    local = Path(schema.tokenizer).exists()
    tok = AutoTokenizer.from_pretrained(schema.tokenizer, local_files_only=local, trust_remote_code=False)
    if not tok.is_fast:
        raise ValueError(f"tokenizer {schema.tokenizer}: a fast (tokenizers) tokenizer is needed")
    return tok


def byte_tokenizer():
    """258 tokens: <pad>, <eos> and the 256 bytes (GPT-2's byte-to-unicode alphabet); no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def encode_question(tokenizer, question: str, max_tokens: int) -> list[int]:
    return tokenizer(question, add_special_tokens=False)["input_ids"][:max_tokens]
