"""The data that flows between the rooms: a validated request and the record kept per input.

A ``TeacherRecord`` is what the trace store keeps for one (input, graph fingerprint):

* ``outputs[node]`` — the node's output dict. Scalars, strings and lists are JSON; numpy arrays
  (boxes, class scores, token ids, top-k log-probs) are stored as binary tensors (safetensors),
  so a soft label costs bytes, not JSON digits.
* ``timings[node]`` — seconds spent on this input by the node (its batch time / batch size).
* ``errors[node]`` — why the node failed on this input; any error quarantines the input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from distillery.images import open_image

Status = Literal["ok", "quarantined", "retry"]  # retry: a node failed for now; the next run tries again


def make_input_id(image_bytes: bytes, question: str) -> str:
    """Content address of an input: sha256 over the image bytes and the question text."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(image_bytes).digest())
    h.update(question.encode("utf-8"))
    return h.hexdigest()[:32]


@dataclass
class Request:
    """One input after validation. ``image()`` decodes it (RGB, EXIF orientation applied)."""

    input_id: str
    image_path: str
    image_bytes: bytes
    question: str

    def image(self) -> Image.Image:
        return open_image(self.image_bytes, self.image_path)

    def context(self) -> dict[str, Any]:
        """What templates may cite as ``{request.<field>}``."""
        return {"question": self.question, "image_path": self.image_path, "input_id": self.input_id}


@dataclass
class Quarantined:
    """An input refused before any teacher saw it."""

    input_id: str
    image_path: str
    question: str
    reason: str  # short machine-readable kind, e.g. "not_an_image"
    detail: str  # a sentence naming the input and the reason


@dataclass
class TeacherRecord:
    input_id: str
    graph_fingerprint: str
    image_path: str
    question: str
    status: Status = "ok"
    reason: str | None = None  # kind of failure when quarantined or retry ("node_error:<node>", "too_many_pixels", ...)
    detail: str | None = None
    image_bytes: bytes = b""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    created_at: str = ""


def answer_hash(token_ids) -> str:
    """Content address of a continuation (a student's answer): sha256 of its token ids."""
    return hashlib.sha256(",".join(str(int(t)) for t in token_ids).encode()).hexdigest()[:16]


@dataclass
class ScoreRecord:
    """The teacher's view of one continuation it did not generate (on-policy distillation: the
    student's answer to a training input, scored token by token by the teacher LLM node).

    Keyed by (round, input_id, answer_hash, graph_fingerprint, node): a rerun or a resumed run
    that meets the same student answer in the same round reads it back instead of paying for
    the teacher call again. ``scores`` holds the node's ``score`` output (``topk_ids`` (T, k)
    int32, ``topk_logprobs`` (T, k) fp16, ``token_logprobs`` (T,) float32) over ``token_ids``
    (T,), the whole continuation the teacher was given after the prompt."""

    round: int
    input_id: str
    answer_hash: str
    graph_fingerprint: str
    node: str
    prompt: str
    token_ids: Any  # (T,) int32: the continuation scored (the teacher's recorded prefix + the answer)
    scores: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # the teacher's time on this continuation
    created_at: str = ""

    @property
    def key(self) -> tuple[int, str, str, str, str]:
        return (self.round, self.input_id, self.answer_hash, self.graph_fingerprint, self.node)
