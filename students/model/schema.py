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

from distillery.students.model.heads import head_class
from distillery.teachers.records import TeacherRecord


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

@dataclass
class StudentSchema:
    """Everything the model needs to know about the graph; JSON (saved in config.json).

    nodes: node name -> {"type": the node type, **its head's ``schema_entry``} (for example a
    ``yolo`` node's classes, a ``rag`` node's document ids, an ``llm`` node's stop strings). text: {"vocab_size", "pad_id", "eos_ids"}. tokenizer: the folder
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
    """The schema of ``spec``'s teacher graph: per node its type and its head's schema entry
    (class counts and document ids come from the records too), the tokenizer the student shares
    with the graph's LLM, and the text side's vocabulary and eos ids."""
    nodes: dict[str, dict[str, Any]] = {}
    for name in spec.topological_order():  # the last generative node is the graph's final answer
        cfg = spec.teachers[name]
        try:
            head = head_class(cfg.type)
        except KeyError as e:
            raise KeyError(f"teachers.{name}: {e.args[0]}") from None
        outs = [r.outputs[name] for r in records if isinstance(r.outputs.get(name), dict)]
        nodes[name] = {"type": cfg.type, **head.schema_entry(name, cfg, outs)}
    sources = [src for n in nodes.values() if (src := head_class(n["type"]).tokenizer_source(n)) is not None]
    # the student's own tokenizer: named, or its text base's (a pretrained LM keeps its vocabulary)
    own = getattr(spec.student, "tokenizer", None) or getattr(spec.student, "text_base", None)
    schema = StudentSchema(nodes, tokenizer=own or (sources[0] if sources else None),
                           default_question=spec.inputs.default_question)
    tok = load_tokenizer(schema)
    cross = own is not None and any(_vocab(src) != tok.get_vocab() for src in sources)
    if cross:  # the teacher's token ids are not the student's: re-tokenized text, sorted soft labels
        for n in nodes.values():
            if head_class(n["type"]).generative:
                n["cross_tokenizer"] = True
        ids: list = []
    else:
        _check_same_tokenizer(tok, sources)
        ids = [a for r in records for name, n in nodes.items() if isinstance(r.outputs.get(name), dict)
               for a in head_class(n["type"]).token_ids(r.outputs[name])]
    schema.text = _text_info(tok, schema.tokenizer, ids)
    return schema


def _vocab(source: str) -> dict[str, int]:
    return load_tokenizer(StudentSchema({}, tokenizer=source)).get_vocab()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _text_info(tok, model: str | None, stored_ids: list) -> dict[str, Any]:
    """Vocabulary size (tokenizer, model config and every stored id must fit) and eos ids."""
    vocab = len(tok)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if model is not None and Path(model).is_dir():
        conf = _read_json(Path(model) / "config.json")
        vocab = max(vocab, int(conf.get("vocab_size") or conf.get("text_config", {}).get("vocab_size") or 0))
        for c in (conf, _read_json(Path(model) / "generation_config.json")):
            e = c.get("eos_token_id")
            eos |= set(e if isinstance(e, list) else [e] if e is not None else [])
    for ids in stored_ids:
        a = np.asarray(ids)
        if a.size:
            vocab = max(vocab, int(a.max()) + 1)
    if not eos:
        raise ValueError(f"tokenizer {model or '(byte-level)'}: no eos token (tokenizer or model config), "
                         "so the student could not learn to stop")
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    return {"vocab_size": vocab, "pad_id": int(pad), "eos_ids": sorted(int(e) for e in eos)}


def _check_same_tokenizer(tok, sources: list[str]) -> None:
    for src in sources[1:]:
        other = load_tokenizer(StudentSchema({}, tokenizer=src)) if src != sources[0] else tok
        if other.get_vocab() != tok.get_vocab():
            raise ValueError(f"llm nodes use different tokenizers ({sources[0]} vs {src}); "
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
