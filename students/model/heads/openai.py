"""The answer head of the ``openai`` node type (a black-box LLM behind an OpenAI-compatible server).

Its records have the ``llm`` node's keys, so this is the ``llm`` head (``AnswerHead``) with two
differences that come from not holding the teacher's weights:

* the tokenizer: the node's ``tokenizer`` folder when the spec names one (the soft labels'
  token ids are that tokenizer's); without one, the student has no teacher tokenizer to share,
  and the schema falls back to the graph's other LLM's tokenizer or the built-in byte-level one
  (``schema.byte_tokenizer``);
* text-only records (no ``token_ids``: no tokenizer, or a server without log-probs) are
  tokenized here, with the student's own tokenizer, into hard labels. (With
  ``student.tokenizer`` set to another tokenizer than the node's, the ``llm`` head's
  cross-tokenizer targets apply to both kinds of record.)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from distillery.students.model.heads.base import Output, Target, TargetContext, register_head
from distillery.students.model.heads.llm import AnswerHead, llm_target


@register_head("openai")
class OpenAIAnswerHead(AnswerHead):
    """``AnswerHead`` on an ``openai`` node's records (see the module docstring)."""

    @classmethod
    def schema_entry(cls, name: str, config: Any, outputs: list[Output]) -> dict[str, Any]:
        return {"model": config.model, "tokenizer": config.tokenizer, "stop": list(config.stop),
                "think_start": config.think_start, "think_end": config.think_end}

    @classmethod
    def tokenizer_source(cls, node: dict[str, Any]) -> str | None:
        return node.get("tokenizer")  # None: the student picks its own (see the module docstring)

    @classmethod
    def target_builder(cls, name: str, node: dict[str, Any], ctx: TargetContext
                       ) -> Callable[[Output | None], Target | None]:
        if node.get("cross_tokenizer"):  # the student's own tokenizer: re-tokenized text either way
            return super().target_builder(name, node, ctx)

        def build(out: Output | None) -> Target | None:
            if out is None:
                return None
            return llm_target(with_token_ids(out, ctx.tokenizer), ctx.tokenizer, ctx.text, ctx.cfg)
        return build


def with_token_ids(out: Output, tokenizer: Any) -> Output:
    """The output with ``token_ids``: as recorded, or the student tokenizer's ids of its ``text``
    (hard labels only: any stored top-k rows no longer line up, so they are dropped)."""
    if np.asarray(out.get("token_ids", [])).size:
        return out
    ids = tokenizer(str(out.get("text", "")), add_special_tokens=False)["input_ids"]
    rest = {k: v for k, v in out.items() if k not in ("topk_ids", "topk_logprobs")}
    return rest | {"token_ids": np.asarray(ids, dtype=np.int64)}
