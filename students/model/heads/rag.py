"""The retrieval head (teacher node type ``rag``): scores over the knowledge base's documents, so
the student answers with no retriever at run time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from distillery.students.model import losses
from distillery.students.model.config import StudentConfig
from distillery.students.model.heads.base import (Features, Head, Output, Segment, Target, TargetContext, pad,
                                                  present_mask, register_head)
from distillery.students.model.arrays import documents
from distillery.students.model.scores import retrieval_agreement
from distillery.teachers.nodes.rag import read_documents


@register_head("rag")
class RetrievalHead(Head):
    """Scores over the knowledge base's documents from a query token that reads the image and
    the question in the decoder."""

    OUTPUT_KEY = "ids"

    @classmethod
    def schema_entry(cls, name: str, config: Any, outputs: list[Output]) -> dict[str, Any]:
        """doc_ids: the knowledge base's documents (the documents file's order, when readable,
        then any other id a record holds); top_k as the teacher's."""
        ids: list[str] = []
        if Path(config.documents).is_file():
            ids = read_documents(config.documents)[0]
        known = set(ids)
        ids += sorted({str(i) for o in outputs for i in o.get("ids", [])} - known)
        if not ids:
            raise ValueError(f"teachers.{name}: no documents: {config.documents} is not readable and no record "
                             "holds retrieved ids")
        return {"doc_ids": ids, "top_k": config.top_k}

    @classmethod
    def target_builder(cls, name: str, node: dict[str, Any], ctx: TargetContext
                       ) -> Callable[[Output | None], Target | None]:
        """doc_idx (n,) and scores (n,): the teacher's retrieved documents (known ones only)."""
        doc_index = {d: i for i, d in enumerate(node["doc_ids"])}

        def target(out: Output | None) -> Target | None:
            if out is None:
                return None
            scores = np.asarray(out.get("scores", []), dtype=np.float32).tolist()
            pairs = [(doc_index[str(i)], s) for i, s in zip(out.get("ids", []), scores) if str(i) in doc_index]
            if not pairs:
                return None
            return {"doc_idx": torch.tensor([p[0] for p in pairs]), "scores": torch.tensor([p[1] for p in pairs])}

        return target

    @classmethod
    def collate(cls, entries: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        empty = {"doc_idx": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
        ts = [e["target"] if e["present"] else empty for e in entries]
        return {"mask": present_mask(entries), "doc_idx": pad([t["doc_idx"] for t in ts], -1),
                "scores": pad([t["scores"] for t in ts], 0.0)}

    @classmethod
    def metrics(cls, preds: Sequence[Output], refs: Sequence[Output], *, k: int = 5,
                truth: bool = False) -> dict[str, float]:
        """Top-1 and recall@k of the ranked ids (against truth: of the relevant documents)."""
        return retrieval_agreement([p.get("ids", []) for p in preds], [r.get("ids", []) for r in refs], k,
                                   relevant_set=truth)

    def __init__(self, name: str, node: dict[str, Any], cfg: StudentConfig):
        super().__init__(name, node, cfg)
        self.query = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, len(node["doc_ids"]))

    def segments(self, batch: dict, embed: nn.Embedding, echo: bool = False) -> list[Segment]:
        B = batch["question_ids"].shape[0]
        valid = torch.ones(B, 1, dtype=torch.bool, device=self.query.device)
        return [Segment(f"{self.name}/query", self.query.expand(B, 1, -1), valid)]

    def forward(self, feats: Features) -> dict[str, Tensor]:
        h = feats.text[f"{self.name}/query"][:, 0]  # (B, d)
        return {"logits": self.out(self.norm(h))}  # (B, D)

    def loss(self, out: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        return losses.retrieval_loss(out["logits"], target["doc_idx"], target["scores"], target["mask"],
                                     self.cfg.retrieval_temperature, self.cfg.retrieval_ce_weight)

    def postprocess(self, out: dict[str, Any], i: int, image_size: tuple[int, int]) -> dict[str, Any]:
        """Top-k documents (k as the teacher's) and the student's probability for each
        (``students.model.arrays.documents``, which the torch-free runtime runs too)."""
        return documents(out["logits"][i].float().cpu().numpy(), self.node)
