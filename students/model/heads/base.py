"""The student head interface: everything the student knows about one teacher node type.

A head class is registered under the teacher node type's key (``yolo``, ``rag``, ``llm``; the
modules beside this one) and holds the whole student side of that type, so a new node type is one
new module here (and one in ``distillery.teachers.nodes``):

* its **schema entry** (``schema_entry``): what sizes the head (classes, documents) and what
  inference needs, read from the teacher node's config and its recorded outputs;
* its **targets** (``target_builder``, ``flip_target``) and their **collation** (``collate``):
  from a record's teacher output to the padded tensors of a batch;
* the **model part**: it gets the shared features of one forward pass (``Features``: the conv
  pyramid and the text decoder's hidden states) and returns its raw outputs; heads that read the
  text decoder ask for their own tokens in its sequence through ``segments``;
* its **loss** against those targets and its **postprocess** to the teacher node's output format
  (JSON-ready);
* its **metrics** (``metrics``): how its outputs are compared with the teacher's or the truth's.

Lookups (``distillery.students.model.heads.head_class``) fail with the list of known keys; configs
never name code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from distillery.students.model.config import StudentConfig


@dataclass
class Segment:
    """Tokens a head appends to the decoder's sequence after [image tokens + question]: they see
    the prefix and (causally) each other, never another segment."""

    name: str
    embeds: Tensor  # (B, L, d)
    valid: Tensor  # (B, L) bool


@dataclass
class Features:
    maps: dict[str, Tensor]  # "p4" (B, C4, S/4, S/4) (segmentation only), "p8", "p16"
    text: dict[str, Tensor] = field(default_factory=dict)  # segment name -> hidden (B, L, d)
    lm_head: Callable[[Tensor], Tensor] | None = None  # hidden (..., d) -> logits (..., V)


HEADS: dict[str, type["Head"]] = {}


def register_head(key: str):
    def wrap(cls):
        if key in HEADS and HEADS[key] is not cls:
            raise ValueError(f"head type {key!r} is already registered by {HEADS[key]}")
        HEADS[key] = cls
        return cls
    return wrap


@dataclass
class TargetContext:
    """What a head's targets may read besides the record: the student config, the tokenizer and
    the schema's text info (vocab_size, pad_id, eos_ids)."""

    cfg: StudentConfig
    tokenizer: Any
    text: dict[str, Any]


Target = dict[str, Tensor]
Output = dict[str, Any]


class Head(nn.Module):
    """Base: ``name`` is the teacher node's name, ``node`` its schema entry."""

    generative = False  # True: the model decodes text for this head at inference
    reads_text = True  # False: runs on the conv features alone, before the text decoder
    OUTPUT_KEY: ClassVar[str] = ""  # a key only this type's outputs carry (tells outputs apart)

    def __init__(self, name: str, node: dict[str, Any], cfg: StudentConfig):
        super().__init__()
        self.name, self.node, self.cfg = name, node, cfg

    # -- the node type's data side: class methods, no model needed ----------------------------------
    @classmethod
    def schema_entry(cls, name: str, config: Any, outputs: list[Output]) -> dict[str, Any]:
        """The head's schema entry (JSON, saved in the student's config.json) from the teacher
        node's config and the outputs recorded for it; ``type`` is added by the schema."""
        return {}

    @classmethod
    def tokenizer_source(cls, node: dict[str, Any]) -> str | None:
        """The folder or hub id of the tokenizer the student must share with this node (an LLM's)."""
        return None

    @classmethod
    def token_ids(cls, output: Output) -> list[Any]:
        """Arrays of token ids in one recorded output (the student's vocabulary must hold them)."""
        return []

    @classmethod
    def feature_maps(cls, node: dict[str, Any]) -> set[str]:
        """Extra vision feature maps the head reads besides ``p8``/``p16`` (``{"p4"}``)."""
        return set()

    @classmethod
    def target_builder(cls, name: str, node: dict[str, Any], ctx: TargetContext
                       ) -> Callable[[Output | None], Target | None]:
        """A function from one record's teacher output (None where the node failed or is
        missing) to the head's target (None: no target for this input)."""
        raise NotImplementedError(f"{cls.__name__} has no targets")

    @classmethod
    def flip_target(cls, target: Target) -> Target:
        """The target of the horizontally flipped image (only heads that see geometry change it)."""
        return target

    @classmethod
    def collate(cls, entries: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        """A batch's targets: ``entries[i]`` = {"present": bool, "target": Target | None}; the
        result carries "mask" (B,) bool: False where input i has no target for this node."""
        raise NotImplementedError(f"{cls.__name__} cannot collate targets")

    @classmethod
    def metrics(cls, preds: Sequence[Output], refs: Sequence[Output], *, k: int = 5,
                truth: bool = False) -> dict[str, float]:
        """Agreement of ``preds`` with ``refs`` (the teacher's outputs, or with ``truth`` the
        ground truth), one figure per metric name."""
        return {}

    # -- the model part ---------------------------------------------------------------------------------

    def segments(self, batch: dict, embed: nn.Embedding, echo: bool = False) -> list[Segment]:
        """``echo``: a text-only echo step (see ``MultimodalStudent.forward``), which may skip
        auxiliary tasks."""
        return []

    def prefix_len(self) -> int:
        """Most tokens ``prefix_embeds`` adds (sizes the decoder's position table)."""
        return 0

    def prefix_embeds(self, out: dict[str, Tensor], target: dict | None, tokenizer,
                      embed: nn.Embedding) -> tuple[Tensor, Tensor] | None:
        """Embeddings (B, L, d) and validity (B, L) this head puts before the question, or None."""
        return None

    def prefix_input_keys(self) -> tuple[str, ...]:
        """The keys of ``prefix_inputs``."""
        return ()

    def prefix_inputs(self, out: dict[str, Tensor], target: dict | None) -> dict[str, Tensor]:
        """The small tensors ``prefix_embeds`` is made from (a conv head's: computed from its
        outputs; taken as they are where ``out`` has them). The ONNX text graph takes these as its
        inputs, and the runtime computes them on numpy (``students/model/arrays.py``)."""
        return {}

    def prefix_numpy(self) -> dict[str, Any] | None:
        """How the runtime computes ``prefix_inputs`` on numpy: a kind it knows
        (``runtime.PREFIX_KINDS``) and its arguments."""
        return None

    def forward(self, feats: Features) -> dict[str, Tensor]:
        raise NotImplementedError

    def empty_outputs(self, B: int, device: torch.device) -> dict[str, Tensor]:
        """A conv head's outputs for a text-only (echo) step, which runs no vision: nothing seen."""
        raise NotImplementedError(f"{type(self).__name__} has no empty outputs for text-only steps")

    def loss(self, out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        raise NotImplementedError


def padded(rows: list[list[int]], device) -> Tensor:
    """Ragged token-id lists -> (N, L) long, padded with -1."""
    L = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def mean_embed(embed: nn.Embedding, ids: Tensor) -> Tensor:
    """(N, L) ids padded with -1 -> (N, d): the mean of each row's token embeddings."""
    valid = (ids >= 0).to(embed.weight.dtype)[..., None]  # (N, L, 1)
    return (embed(ids.clamp(min=0)) * valid).sum(1) / valid.sum(1).clamp(min=1)


ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}


def conv_bn_act(c1: int, c2: int, k: int = 3, s: int = 1, act: str = "silu") -> nn.Sequential:
    """Conv, batch norm, activation (``StudentConfig.vision_act``)."""
    return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), ACTIVATIONS[act](inplace=True))


def pad(seqs: Sequence[Tensor], value, dtype=None) -> Tensor:
    """Right-pad along dim 0 to (n, L_max, *rest); L_max >= 1."""
    L = max([len(s) for s in seqs] + [1])
    rest = next((s.shape[1:] for s in seqs if s.ndim > 1), ())
    out = torch.full((len(seqs), L, *rest), value, dtype=dtype or seqs[0].dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = s
    return out


def lengths_mask(seqs: Sequence, L: int) -> Tensor:
    return torch.arange(L)[None] < torch.tensor([len(s) for s in seqs])[:, None]  # (n, L)


def present_mask(entries: Sequence[dict[str, Any]]) -> Tensor:
    """(B,) bool: which inputs of a batch have a target for the node."""
    return torch.tensor([bool(e["present"]) for e in entries])
