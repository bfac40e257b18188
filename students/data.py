"""From teacher records to student batches.

``build_schema`` reads what the model must know about the graph from the spec and the records
(node types, classes, documents, tokenizer); ``TraceDataset`` turns each record into the image,
the question tokens and one target per node; ``collate`` pads them into a batch where each node
carries a mask (B,), so an input a node did not produce (node error, truncated generation) is
left out of that node's loss only.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from distillery import rle
from distillery.images import open_image
from distillery.students.model.config import StudentConfig
from distillery.students.training.distributed import to_device as batch_to  # noqa: F401  (every tensor of a nested batch on a device)
from distillery.students.model.schema import StudentSchema, build_schema, byte_tokenizer, encode_question, load_tokenizer  # noqa: F401
from distillery.teachers.records import TeacherRecord


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def image_tensor(img: Image.Image, size: int, flip: bool = False, downscale: str = "reduce") -> torch.Tensor:
    """RGB image -> (3, size, size) uint8, resized (aspect ratio not kept, like the boxes);
    ``downscale`` as ``StudentConfig.downscale``."""
    img = img.resize((size, size), Image.BILINEAR, reducing_gap=1.0 if downscale == "reduce" else None)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Targets per node
# ---------------------------------------------------------------------------------------------

def usable_output(record: TeacherRecord, name: str) -> dict | None:
    """The node's output for this record, or None where it failed or is missing."""
    out = record.outputs.get(name)
    return out if isinstance(out, dict) and name not in record.errors else None


def yolo_target(out: dict, node: dict, proto: int, flip: bool) -> dict[str, torch.Tensor]:
    """boxes (N, 4), probs (N, C) (the teacher's per-class scores), masks (N, proto, proto) uint8,
    areas (N,) (each mask's share of the image).
    An empty ``out`` gives N = 0 (the shapes the batch needs for an input without a target)."""
    boxes = torch.as_tensor(np.asarray(out.get("boxes", []), dtype=np.float32)).reshape(-1, 4)  # (N, 4)
    n, C = len(boxes), node["num_classes"]
    probs = np.asarray(out.get("class_probs", []), dtype=np.float32)
    if probs.size == 0 and n:  # no soft label stored: one-hot scaled by the score
        probs = np.zeros((n, C), np.float32)
        probs[np.arange(n), np.asarray(out["classes"], dtype=np.int64)] = np.asarray(out.get("scores", [1.0] * n))
    probs_t = torch.zeros(n, C)
    if n:
        p = probs.reshape(n, -1)[:, :C]
        probs_t[:, : p.shape[1]] = torch.as_tensor(p)
    rles = out.get("masks") or []
    has_masks = node.get("task") == "segment" and len(rles) == n
    masks = torch.zeros(n, proto, proto, dtype=torch.uint8)
    if has_masks and n:
        full = torch.as_tensor(np.stack([rle.decode(r) for r in rles]), dtype=torch.float32)  # (N, H, W)
        masks = (F.interpolate(full[:, None], size=(proto, proto), mode="area")[:, 0] * 255).round().to(torch.uint8)
    areas = torch.zeros(n)  # mask area, fraction of the image (stored, or from the masks)
    if has_masks and n:
        stored = out.get("areas")
        areas = (torch.as_tensor(np.asarray(stored, dtype=np.float32)) if stored is not None and len(stored) == n
                 else full.flatten(1).mean(1))
    if flip:
        boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
        masks = masks.flip(-1)
    return {"boxes": boxes.clamp(0, 1), "probs": probs_t.clamp(0, 1), "masks": masks, "areas": areas,
            "has_masks": torch.tensor(has_masks)}


def rag_target(out: dict, doc_index: dict[str, int]) -> dict[str, torch.Tensor] | None:
    scores = np.asarray(out.get("scores", []), dtype=np.float32).tolist()
    pairs = [(doc_index[str(i)], s) for i, s in zip(out.get("ids", []), scores) if str(i) in doc_index]
    if not pairs:
        return None
    return {"doc_idx": torch.tensor([p[0] for p in pairs]), "scores": torch.tensor([p[1] for p in pairs])}


def answer_start(ids: np.ndarray, answer: str, tok, eos_ids: list[int]) -> int | None:
    """Where the answer's tokens start when they are the tail of the generation (before its
    eos), so the teacher's soft labels for them can be used; None when they are not."""
    body = ids[:-1] if int(ids[-1]) in eos_ids else ids
    for text in (answer, " " + answer):
        cand = tok(text, add_special_tokens=False)["input_ids"]
        if cand and len(body) >= len(cand) and body[-len(cand):].tolist() == list(cand):
            return len(body) - len(cand)
    return None


def llm_target(out: dict, tok, text: dict, cfg: StudentConfig) -> dict[str, torch.Tensor] | None:
    """Rationale = the teacher's generated tokens with their top-k soft labels; answer = the
    tail of those tokens that spells the answer (+ eos), with soft labels where they line up.
    None (no target) for a truncated generation or an empty answer."""
    answer = str(out.get("answer", "")).strip()
    ids = np.asarray(out.get("token_ids", []), dtype=np.int64).reshape(-1)  # (T,)
    if out.get("truncated") or not answer or ids.size == 0:
        return None
    topk_ids = np.asarray(out.get("topk_ids", np.zeros((0, 1))), dtype=np.int64)  # (T, k)
    topk_lp = np.asarray(out.get("topk_logprobs", np.zeros((0, 1))), dtype=np.float16)  # (T, k)
    has_kd = topk_ids.ndim == 2 and len(topk_ids) == len(ids) and topk_lp.shape == topk_ids.shape
    if not has_kd:
        topk_ids, topk_lp = _no_soft_labels(len(ids), 1)
    r = slice(0, cfg.max_rationale_tokens)
    rationale = _seq("rationale", ids[r], topk_ids[r], topk_lp[r], np.full(len(ids[r]), has_kd))
    eos_ids, k = text["eos_ids"], topk_ids.shape[1]
    start = answer_start(ids, answer, tok, eos_ids)
    if start is None:  # the answer's tokens are not the generation's tail: hard labels only
        a_ids = np.asarray(tok(answer, add_special_tokens=False)["input_ids"], np.int64)
        (a_tk, a_lp), kd = _no_soft_labels(len(a_ids), k), np.zeros(len(a_ids), bool)
    else:
        a_ids, a_tk, a_lp, kd = ids[start:], topk_ids[start:], topk_lp[start:], np.full(len(ids) - start, has_kd)
    if not len(a_ids) or int(a_ids[-1]) not in eos_ids:  # the student must learn to stop: eos, no soft label
        a_ids, kd = np.append(a_ids, eos_ids[0]), np.append(kd, False)
        pad_tk, pad_lp = _no_soft_labels(1, k)
        a_tk, a_lp = np.concatenate([a_tk, pad_tk]), np.concatenate([a_lp, pad_lp])
    m = slice(0, cfg.max_answer_tokens)
    return rationale | _seq("answer", a_ids[m], a_tk[m], a_lp[m], kd[m])


def _no_soft_labels(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, k), np.int64), np.zeros((n, k), np.float16)  # top-k ids, log-probs (masked out)


def _seq(key: str, ids, topk_ids, topk_lp, kd) -> dict[str, torch.Tensor]:
    return {f"{key}_ids": torch.as_tensor(ids, dtype=torch.long), f"{key}_topk_ids": torch.as_tensor(topk_ids),
            f"{key}_topk_logprobs": torch.as_tensor(topk_lp), f"{key}_kd_mask": torch.as_tensor(kd, dtype=torch.bool)}


# ---------------------------------------------------------------------------------------------
# Dataset, collate, device transfer
# ---------------------------------------------------------------------------------------------

class TraceDataset(torch.utils.data.Dataset):
    """One item per record: image (3, S, S) uint8, question ids, and per node a target or None.

    With ``train`` and ``cfg.hflip`` > 0, images are flipped by a draw that depends only on
    (epoch, record), so any number of loader workers and any resume see the same flips; call
    ``set_epoch`` each epoch for fresh draws."""

    def __init__(self, records: list[TeacherRecord], schema: StudentSchema, cfg: StudentConfig, tokenizer,
                 train: bool = True):
        self.records = [r for r in records if r.image_bytes]
        self.schema, self.cfg, self.tok, self.train, self.epoch = schema, cfg, tokenizer, train, 0
        self.doc_index = {name: {d: i for i, d in enumerate(n["doc_ids"])}
                          for name, n in schema.nodes.items() if n["type"] == "rag"}
        self._cache: dict[int, dict[str, Any]] = {}  # index -> decoded, unflipped item

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def flipped(self, index: int) -> bool:
        if not self.train or self.cfg.hflip <= 0:
            return False
        rng = np.random.default_rng([self.epoch, index, zlib.crc32(self.records[index].input_id.encode())])
        return bool(rng.random() < self.cfg.hflip)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The record's item, flipped when this epoch's draw says so. Decoding (PNG, RLE masks,
        tokenizing) is done once per record and kept: a flip of the kept item is exactly the item
        decoded flipped, and later epochs cost no decoding."""
        item = self._cache.get(index)
        if item is None:
            item = self._decode(index)
            self._cache[index] = item
        return flip_item(item) if self.flipped(index) else item

    def _decode(self, index: int) -> dict[str, Any]:
        rec, cfg = self.records[index], self.cfg
        img = open_image(rec.image_bytes, f"record {rec.input_id}")
        item = {"input_id": rec.input_id, "image": image_tensor(img, cfg.image_size, downscale=cfg.downscale),
                "question_ids": encode_question(self.tok, rec.question, cfg.max_question_tokens), "targets": {}}
        for name, node in self.schema.nodes.items():
            out = usable_output(rec, name)
            t = None
            if out is not None and node["type"] == "rag":
                t = rag_target(out, self.doc_index[name])
            elif out is not None and node["type"] == "llm":
                t = llm_target(out, self.tok, self.schema.text, cfg)
            elif node["type"] == "yolo":  # an empty target even when missing: the batch needs C and mask size
                t = yolo_target(out or {}, node, cfg.image_size // 4, flip=False)
            present = out is not None and t is not None
            item["targets"][name] = {"type": node["type"], "present": present, "target": t}
        return item


def flip_item(item: dict[str, Any]) -> dict[str, Any]:
    """A horizontally flipped copy of a decoded item: the image, and every yolo target's boxes
    (x -> 1 - x) and masks; the item itself is left as it is."""
    targets = {}
    for name, entry in item["targets"].items():
        t = entry["target"]
        if entry["type"] == "yolo" and t is not None:
            b = t["boxes"]  # (N, 4) xyxy normalized
            t = {**t, "boxes": torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1).clamp(0, 1),
                 "masks": t["masks"].flip(-1)}
        targets[name] = {**entry, "target": t}
    return {**item, "image": item["image"].flip(-1), "targets": targets}


def _pad(seqs: list[torch.Tensor], value, dtype=None) -> torch.Tensor:
    """Right-pad along dim 0 to (n, L_max, *rest); L_max >= 1."""
    L = max([len(s) for s in seqs] + [1])
    rest = next((s.shape[1:] for s in seqs if s.ndim > 1), ())
    out = torch.full((len(seqs), L, *rest), value, dtype=dtype or seqs[0].dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = s
    return out


def _lengths_mask(seqs: list, L: int) -> torch.Tensor:
    return torch.arange(L)[None] < torch.tensor([len(s) for s in seqs])[:, None]  # (n, L)


def collate(items: list[dict]) -> dict[str, Any]:
    """A batch: images (B, 3, S, S) uint8, question_ids / question_mask (B, Lq), input_ids (list)
    and targets[node]: padded tensors + "mask" (B,) (False: this node has no target for the input)."""
    q = [torch.tensor(i["question_ids"], dtype=torch.long) for i in items]
    q_ids = _pad(q, 0, torch.long)
    batch = {"images": torch.stack([i["image"] for i in items]), "question_ids": q_ids,
             "question_mask": _lengths_mask(q, q_ids.shape[1]), "input_ids": [i["input_id"] for i in items],
             "targets": {}}
    for name, first in items[0]["targets"].items():
        entries = [i["targets"][name] for i in items]
        targets = [e["target"] if e["present"] else None for e in entries]
        if first["type"] == "yolo":
            batch["targets"][name] = _collate_yolo([e["target"] for e in entries], targets)
        else:
            batch["targets"][name] = {"rag": _collate_rag, "llm": _collate_llm}[first["type"]](targets)
    return batch


def _collate_yolo(all_ts: list[dict], ts: list[dict | None]) -> dict[str, torch.Tensor]:
    boxes = _pad([t["boxes"] for t in all_ts], 0.0)
    return {"mask": torch.tensor([t is not None for t in ts]), "boxes": boxes,
            "valid": _lengths_mask([t["boxes"] for t in all_ts], boxes.shape[1]),
            "probs": _pad([t["probs"] for t in all_ts], 0.0), "masks": _pad([t["masks"] for t in all_ts], 0),
            "areas": _pad([t["areas"] for t in all_ts], 0.0),
            "has_masks": torch.stack([t["has_masks"] for t in all_ts])}


def _collate_rag(ts: list[dict | None]) -> dict[str, torch.Tensor]:
    empty = {"doc_idx": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    ts_ = [t if t is not None else empty for t in ts]
    return {"mask": torch.tensor([t is not None for t in ts]), "doc_idx": _pad([t["doc_idx"] for t in ts_], -1),
            "scores": _pad([t["scores"] for t in ts_], 0.0)}


def _fit_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k') -> (T, k): the first k columns, zero-padded on the right (padding = no soft label)."""
    return F.pad(x[:, :k], (0, max(0, k - x.shape[1])))


def _batch_k(ts: list[dict | None]) -> int:
    """The batch's top-k: the smallest k among the sequences that carry soft labels (kd_mask.any()).
    Sequences without any (no stored log-probs: k = 1) are padded to it, never cut it."""
    ks = [t[f"{key}_topk_ids"].shape[-1] for t in ts if t is not None for key in ("answer", "rationale")
          if t[f"{key}_kd_mask"].any()]
    return min(ks or [1])


def _collate_llm(ts: list[dict | None]) -> dict[str, torch.Tensor]:
    k = _batch_k(ts)
    out = {"mask": torch.tensor([t is not None for t in ts])}
    for key in ("answer", "rationale"):
        ids = [t[f"{key}_ids"] if t is not None else torch.zeros(0, dtype=torch.long) for t in ts]
        tk = [_fit_k(t[f"{key}_topk_ids"], k) if t is not None else torch.zeros(0, k, dtype=torch.long) for t in ts]
        lp = [_fit_k(t[f"{key}_topk_logprobs"], k) if t is not None else torch.zeros(0, k, dtype=torch.float16)
              for t in ts]
        kd = [t[f"{key}_kd_mask"] if t is not None else torch.zeros(0, dtype=torch.bool) for t in ts]
        out[f"{key}_ids"] = _pad(ids, 0, torch.long)
        out[f"{key}_mask"] = _lengths_mask(ids, out[f"{key}_ids"].shape[1])
        out[f"{key}_topk_ids"] = _pad(tk, 0, torch.long)
        out[f"{key}_topk_logprobs"] = _pad(lp, 0.0, torch.float16)
        out[f"{key}_kd_mask"] = _pad(kd, False, torch.bool)
    return out
