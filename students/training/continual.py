"""Continual distillation: new data -> new student, without forgetting the old.

A recurring run trains on the records added since the champion's trace-store version plus a
replay sample of the older ones, warm-started from the champion, and measures forgetting as the
change of the student's fidelity on the OLD held-out set relative to the champion's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from distillery.teachers.records import TeacherRecord
from distillery.teachers.store import TraceStore


@dataclass
class Increment:
    """Records of the current version split into what the champion saw and what is new."""

    version: int
    since_version: int | None
    new: list[TeacherRecord]
    old: list[TeacherRecord]


def split_increment(uri: str, fingerprint: str, version: int | None, since_version: int | None) -> Increment:
    """Old = recorded by ``since_version`` (what the champion was trained on); new = the rest."""
    store = TraceStore(uri)
    version = store.version if version is None else version
    if version is None:
        raise ValueError(f"trace store {uri} holds no commit yet")
    current = store.read(version=version, fingerprint=fingerprint, status="ok")
    if since_version is None:
        return Increment(version, None, current, [])
    seen = {r.input_id for r in store.read(version=since_version, fingerprint=fingerprint, with_images=False)}
    new = [r for r in current if r.input_id not in seen]
    old = [r for r in current if r.input_id in seen]
    return Increment(version, since_version, new, old)


def replay_sample(old: list[TeacherRecord], n_new: int, fraction: float, seed: int = 0) -> list[TeacherRecord]:
    """``fraction`` of the training mix drawn from old records: n_old = fraction/(1-fraction) * n_new."""
    if not old or fraction <= 0:
        return []
    want = len(old) if fraction >= 1 else int(round(n_new * fraction / (1 - fraction)))
    return random.Random(seed).sample(old, min(len(old), max(1, want)))
