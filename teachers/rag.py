"""`rag` node: a sentence-transformers embedder + a FAISS index over a JSONL documents file."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from teachers.base import ItemError, NodeConfig, NodeInput, TeacherNode, register_node


class RagConfig(NodeConfig):
    """Retriever teacher: top-k documents per query (ids, scores, texts)."""

    type: Literal["rag"] = "rag"
    documents: str = Field(description='JSONL file, one {"id": ..., "text": ...} per line.')
    embedder: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model path or id.")
    query: str = Field("{request.question}", description="Template for the query text.")
    top_k: int = Field(3, ge=1, le=100)
    index: Literal["flat", "hnsw"] = Field("flat", description="flat inner product, or HNSW.")
    hnsw_m: int = Field(32, ge=4, description="HNSW neighbours per node (index: hnsw).")
    cache_dir: str | None = Field(None, description="Where built indexes are cached; None = data dir.")
    device: str | None = None

    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = ("query",)
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"query", "ids", "scores", "texts", "context"})
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("documents", "embedder")


@register_node("rag")
class RagNode(TeacherNode):
    config_cls = RagConfig
    config: RagConfig

    def load(self) -> None:
        raise NotImplementedError

    def run(self, batch: list[NodeInput]) -> list[dict[str, Any] | ItemError]:
        raise NotImplementedError
