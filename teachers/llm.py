"""`llm` node: a transformers causal LM that reasons (``<think>…</think>``) and answers."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from teachers.base import ItemError, NodeConfig, NodeInput, TeacherNode, path_identity, register_node


class LLMConfig(NodeConfig):
    """Reasoning LLM teacher; records text, trace, answer, token ids and top-k log-probs."""

    type: Literal["llm"] = "llm"
    model: str = Field(description="transformers model: local folder or hub id.")
    revision: str | None = Field(None, description="Hub revision (commit) for hub ids.")
    prompt: str = Field(description="Template citing {request.question} and {node.field}.")
    max_new_tokens: int = Field(256, ge=1, description="Length limit; hitting it flags truncation.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (end generation).")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    num_samples: int = Field(1, ge=1, le=64, description="Drafts per input (rejection sampling).")
    selection: Literal["majority", "logprob"] = Field(
        "majority", description="How the kept draft is chosen when num_samples > 1."
    )
    logprobs_k: int = Field(20, ge=1, le=1000, description="Top-k log-probs stored per token.")
    think_start: str = "<think>"
    think_end: str = "</think>"
    seed: int = 0
    device: str | None = None

    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = ("prompt",)
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"prompt", "text", "think", "answer"})
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("model",)

    def identity(self) -> dict[str, str]:
        out = {"model": path_identity(self.model)}
        if self.revision:
            out["revision"] = self.revision
        return out


@register_node("llm")
class LLMNode(TeacherNode):
    config_cls = LLMConfig
    config: LLMConfig

    def load(self) -> None:
        raise NotImplementedError

    def run(self, batch: list[NodeInput]) -> list[dict[str, Any] | ItemError]:
        raise NotImplementedError
