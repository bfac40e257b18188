"""From teacher records to student batches.

``TraceDataset`` turns each record into the image, the question tokens and one target per node;
``collate`` pads them into a batch where each node carries a mask (B,), so an input a node did not
produce (node error, truncated generation) is left out of that node's loss only. What a node's
target is, how it flips and how it pads belong to its head (``students.model.heads``); this module
only walks the nodes. (``build_schema`` reads what the model must know about the graph from the
spec and the records: ``students.model.schema``.)
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from distillery.images import open_image, read_image
from distillery.students.model.config import StudentConfig
from distillery.students.model.heads import TargetContext, head_class
from distillery.students.model.heads.base import lengths_mask, pad
from distillery.students.model.schema import (StudentSchema, build_schema, byte_tokenizer,  # noqa: F401  (the data API)
                                              encode_question, load_tokenizer)
from distillery.teachers.records import TeacherRecord


# ---------------------------------------------------------------------------------------------
# Images and records
# ---------------------------------------------------------------------------------------------

def image_tensor(img: Image.Image, size: int, flip: bool = False, downscale: str = "reduce") -> torch.Tensor:
    """RGB image -> (3, size, size) uint8, resized (aspect ratio not kept, like the boxes);
    ``downscale`` as ``StudentConfig.downscale``."""
    img = img.resize((size, size), Image.BILINEAR, reducing_gap=1.0 if downscale == "reduce" else None)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def usable_output(record: TeacherRecord, name: str) -> dict | None:
    """The node's output for this record, or None where it failed or is missing."""
    out = record.outputs.get(name)
    return out if isinstance(out, dict) and name not in record.errors else None


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
        ctx = TargetContext(cfg, tokenizer, schema.text)
        self.heads = {name: head_class(node["type"]) for name, node in schema.nodes.items()}
        self.targets = {name: self.heads[name].target_builder(name, node, ctx) for name, node in schema.nodes.items()}
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
            t = self.targets[name](out)  # (a head may give an empty target where out is None)
            item["targets"][name] = {"type": node["type"], "present": out is not None and t is not None, "target": t}
        return item


def flip_item(item: dict[str, Any]) -> dict[str, Any]:
    """A horizontally flipped copy of a decoded item: the image, and each present target as its
    head flips it; the item itself is left as it is."""
    targets = {name: {**e, "target": head_class(e["type"]).flip_target(e["target"])} if e["target"] is not None
               else e for name, e in item["targets"].items()}
    return {**item, "image": item["image"].flip(-1), "targets": targets}


def collate(items: list[dict]) -> dict[str, Any]:
    """A batch: images (B, 3, S, S) uint8, question_ids / question_mask (B, Lq), input_ids (list)
    and targets[node]: padded tensors + "mask" (B,) (False: this node has no target for the input)."""
    q = [torch.tensor(i["question_ids"], dtype=torch.long) for i in items]
    q_ids = pad(q, 0, torch.long)
    batch = {"images": torch.stack([i["image"] for i in items]), "question_ids": q_ids,
             "question_mask": lengths_mask(q, q_ids.shape[1]), "input_ids": [i["input_id"] for i in items],
             "targets": {}}
    for name, first in items[0]["targets"].items():
        batch["targets"][name] = head_class(first["type"]).collate([i["targets"][name] for i in items])
    return batch


def prepare_requests(requests: list[dict], cfg: StudentConfig, schema: StudentSchema, tokenizer,
                     device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Inference requests (``{"image": path | bytes | base64 | PIL image, "question": str}``; a
    missing question is the spec's default) -> a model batch (no targets) on ``device`` and each
    image's original (height, width). Errors name the request."""
    images, questions, sizes = [], [], []
    for i, req in enumerate(requests):
        where = f"request {i}"
        if not isinstance(req, dict) or "image" not in req:
            raise ValueError(f"{where}: expected {{'image': ..., 'question': ...}}, got {type(req).__name__}")
        question = req.get("question") or schema.default_question
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string (and the spec has no default_question)")
        img = read_image(req["image"], where)
        sizes.append((img.height, img.width))
        images.append(image_tensor(img, cfg.image_size, downscale=cfg.downscale))
        questions.append(torch.tensor(encode_question(tokenizer, question, cfg.max_question_tokens), dtype=torch.long))
    q_ids = pad(questions, 0, torch.long)
    batch = {"images": torch.stack(images), "question_ids": q_ids, "question_mask": lengths_mask(questions, q_ids.shape[1])}
    return batch_to(batch, device), sizes


def batch_to(batch: Any, device: torch.device | str) -> Any:
    """Every tensor of a (nested dict/list) batch on ``device``; python values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch
