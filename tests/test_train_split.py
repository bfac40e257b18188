"""The trainer's data split: every image on one side of train/validation, deterministic, and
replayed or continual records never bring a validation image into training."""

from __future__ import annotations

import pytest

from distillery.students.training.train import make_split, mix_replay, split_by_image
from distillery.teachers.records import TeacherRecord


def rec(image: bytes, question: str) -> TeacherRecord:
    return TeacherRecord(input_id=f"{image.hex()}-{question}", graph_fingerprint="fp", image_path="x.png",
                         question=question, image_bytes=image)


def test_split_keeps_every_image_on_one_side_and_is_deterministic():
    records = [rec(bytes([i]), q) for i in range(40) for q in ("how many?", "any red?", "what shape?")]
    train, val = split_by_image(records, 0.25)
    train_imgs, val_imgs = {r.image_bytes for r in train}, {r.image_bytes for r in val}
    assert not train_imgs & val_imgs and len(train) + len(val) == 120
    assert 3 <= len(val_imgs) <= 18  # ~10 of 40 images
    assert all(len([r for r in val if r.image_bytes == img]) == 3 for img in val_imgs)
    assert split_by_image(list(reversed(records)), 0.25)[1] == list(reversed(val))
    tiny_train, tiny_val = split_by_image(records[:6], 0.01)  # 2 images: still one held out
    assert len(tiny_val) == 3 and len(tiny_train) == 3


def test_replay_and_only_ids_never_put_a_validation_image_in_training():
    new = [rec(bytes([i]), "q") for i in range(20)]
    old = [rec(bytes([i]), "old q") for i in range(40)] + [new[0]]  # a duplicate of a new record
    train, val = split_by_image(new, 0.3)
    val_imgs = {r.image_bytes for r in val}
    mixed, n = mix_replay(train, val, old)
    assert mixed[:len(train)] == train and n == 40 - len(val_imgs)  # all old records but the val images
    assert not any(r.image_bytes in val_imgs for r in mixed)
    assert mix_replay(train, val, None) == (train, 0)
    # a continual run: only the records new since the champion, plus the replayed ones
    only = {r.input_id for r in new[10:]}
    split = make_split(new, 0.3, replay=old[:10], only_ids=only)
    assert {r.input_id for r in split.train[:len(split.train) - split.num_replay]} <= only
    assert {r.input_id for r in split.val} <= only and not {r.image_bytes for r in split.train} & val_imgs
    assert split.num_replay == len([r for r in old[:10] if r.image_bytes not in val_imgs])
    with pytest.raises(ValueError, match="no training records"):
        make_split(new, 0.3, only_ids=set())
