"""The on-policy phase's scores in the trace store: the teacher's view of continuations it did not
generate (``teachers.records.ScoreRecord``: the student's answers, teacher-forced top-k log-probs),
in their own Lance table inside the store (``traces.lance/_scores.lance``), so the records table,
and the versions a training run pins, never change because of them. ``TraceStore.scores`` opens it.
"""

from __future__ import annotations

from datetime import datetime, timezone

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from distillery.teachers.records import ScoreRecord

SCORE_SCHEMA = pa.schema([("round", pa.int64()), ("input_id", pa.string()), ("answer_hash", pa.string()),
                          ("graph_fingerprint", pa.string()), ("node", pa.string()), ("prompt", pa.string()),
                          ("arrays", pa.large_binary()), ("seconds", pa.float64()), ("created_at", pa.string())])
SCORE_KEY = ("round", "input_id", "answer_hash", "graph_fingerprint", "node")


class ScoreTable:
    """Append-only ScoreRecords in a Lance dataset (atomic commits, deduplicated by key under the
    trace store's writer lock); ``TraceStore.scores`` opens it."""

    def __init__(self, uri: str, lock):
        self.uri, self._lock = uri, lock

    def _dataset(self) -> lance.LanceDataset | None:
        try:
            return lance.dataset(self.uri)
        except ValueError as e:
            if "not found" in str(e).lower():
                return None
            raise

    def read(self, fingerprint: str, node: str, rounds: list[int] | None = None) -> dict[tuple, ScoreRecord]:
        """Stored scores of this graph's node (optionally of some rounds only), by key."""
        ds = self._dataset()
        if ds is None:
            return {}
        expr = (pc.field("graph_fingerprint") == fingerprint) & (pc.field("node") == node)
        if rounds is not None:
            expr = expr & pc.field("round").isin(list(rounds))
        out = {}
        for row in ds.to_table(filter=expr).to_pylist():
            arrays = load_arrays(row["arrays"])
            rec = ScoreRecord(round=int(row["round"]), input_id=row["input_id"], answer_hash=row["answer_hash"],
                              graph_fingerprint=row["graph_fingerprint"], node=row["node"], prompt=row["prompt"],
                              token_ids=arrays.pop("token_ids"), scores=arrays, seconds=float(row["seconds"]),
                              created_at=row["created_at"])
            out[rec.key] = rec
        return out

    def append(self, records: list[ScoreRecord]) -> int:
        """Commit the records whose key is not stored yet (one atomic commit); returns how many."""
        with self._lock():
            stored = self.read_keys()
            fresh, seen = [], set()
            for r in records:
                if r.key not in stored and r.key not in seen:
                    seen.add(r.key)
                    fresh.append(r)
            if not fresh:
                return 0
            now = datetime.now(timezone.utc).isoformat()
            rows = {name: [] for name in SCORE_SCHEMA.names}
            for r in fresh:
                arrays = {k: np.ascontiguousarray(v) for k, v in r.scores.items()}
                arrays["token_ids"] = np.ascontiguousarray(np.asarray(r.token_ids, dtype=np.int32))
                for name, value in zip(SCORE_KEY, r.key):
                    rows[name].append(value)
                rows["prompt"].append(r.prompt)
                rows["arrays"].append(save_arrays(arrays))
                rows["seconds"].append(float(r.seconds))
                rows["created_at"].append(r.created_at or now)
            table = pa.Table.from_pydict(rows, schema=SCORE_SCHEMA)
            lance.write_dataset(table, self.uri, mode="create" if self._dataset() is None else "append")
            return len(fresh)

    def read_keys(self) -> set[tuple]:
        ds = self._dataset()
        if ds is None:
            return set()
        t = ds.to_table(columns=list(SCORE_KEY))
        return set(zip(*(t[c].to_pylist() for c in SCORE_KEY)))

    def count(self) -> int:
        ds = self._dataset()
        return 0 if ds is None else ds.count_rows()
