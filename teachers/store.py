"""The trace store: a versioned Lance table with one row per TeacherRecord.

Every ``append`` is one Lance commit, and Lance commits are atomic (the data files are written
first, then one manifest per version names them): a writer killed at any moment leaves either
the previous version or the new one, never half a record. Files written by a killed commit are
orphans no manifest names; the next commit ignores them. Versions are kept, so a training run can
name the exact version it read (``traces.lance@3``) and read it again later.

A row (all strings are UTF-8; JSON columns are JSON text):

    input_id, graph_fingerprint, status, reason, detail, image_path, question   strings
    image       the original image bytes (a store version fully determines the training data)
    outputs     JSON: every node's output with its numpy arrays removed
    arrays      safetensors: {"<node>/<key>": array} for every top-level numpy array of a node's
                output, dtypes kept exactly (int32 token ids, float16 log-probs, ...)
    timings, errors   JSON;  created_at   ISO 8601 UTC

Read it without this module::

    lance.dataset("traces.lance", version=3).to_table().to_pandas()

Dedup: a (input_id, graph_fingerprint) is stored once; ``append`` reads the key columns only and
skips keys already in the table (or repeated in the batch). One writer at a time per store: on a
local path, appends hold an exclusive lock file (``_writer.lock``, released by the kernel if the
writer dies); on object stores, run one record flow per store at a time.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from distillery.teachers.records import TeacherRecord

SCHEMA = pa.schema([
    ("input_id", pa.string()),
    ("graph_fingerprint", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("image_path", pa.string()),
    ("question", pa.string()),
    ("image", pa.large_binary()),
    ("outputs", pa.string()),
    ("arrays", pa.large_binary()),
    ("timings", pa.string()),
    ("errors", pa.string()),
    ("created_at", pa.string()),
])
RETRY = "retry"  # the status of a record a later run replaces
KEY = ("input_id", "graph_fingerprint")
_SAFETENSORS_KINDS = "biuf"  # bool, signed/unsigned int, float: what safetensors stores


def parse_traces_ref(ref: str) -> tuple[str, int | None]:
    """``"path/traces.lance@3"`` -> ``("path/traces.lance", 3)``; no ``@VERSION`` -> version None.

    An ``@`` followed by a path separator belongs to the path (``/home/a@b/traces.lance``)."""
    ref = str(ref)
    path, sep, tail = ref.rpartition("@")
    if not sep or "/" in tail or "\\" in tail:
        return ref, None
    if not path or not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"traces reference {ref!r}: expected PATH or PATH@VERSION with VERSION an "
                         "integer >= 1 (e.g. traces.lance@3)")
    return path, int(tail)


# -- encoding: records <-> Arrow rows (pure functions) -------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _dumps(value: Any, where: str) -> str:
    try:
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: cannot store value: {e}") from None


def split_output(node: str, output: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A node's output -> (JSON-able part, {"node/key": array}) for its numeric numpy arrays.

    Non-numeric arrays (strings, objects) stay in the JSON part as lists."""
    plain, arrays = {}, {}
    for key, value in output.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in _SAFETENSORS_KINDS:
            # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
            arrays[f"{node}/{key}"] = value if value.flags.c_contiguous else value.copy(order="C")
        else:
            plain[key] = value
    return plain, arrays


def encode_records(records: list[TeacherRecord]) -> pa.Table:
    """TeacherRecords -> an Arrow table with ``SCHEMA`` (one row per record)."""
    now = datetime.now(timezone.utc).isoformat()
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    for rec in records:
        where = f"record {rec.input_id}"
        plain, arrays = {}, {}
        for node, output in rec.outputs.items():
            plain[node], node_arrays = split_output(node, output)
            arrays.update(node_arrays)
        rows["input_id"].append(rec.input_id)
        rows["graph_fingerprint"].append(rec.graph_fingerprint)
        rows["status"].append(rec.status)
        rows["reason"].append(rec.reason)
        rows["detail"].append(rec.detail)
        rows["image_path"].append(rec.image_path)
        rows["question"].append(rec.question)
        rows["image"].append(bytes(rec.image_bytes or b""))
        rows["outputs"].append(_dumps(plain, f"{where} outputs"))
        rows["arrays"].append(save_arrays(arrays) if arrays else b"")
        rows["timings"].append(_dumps(rec.timings, f"{where} timings"))
        rows["errors"].append(_dumps(rec.errors, f"{where} errors"))
        rows["created_at"].append(rec.created_at or now)
    return pa.table(rows, schema=SCHEMA)


def decode_row(row: dict[str, Any]) -> TeacherRecord:
    """One row (a dict from ``Table.to_pylist()``) -> a TeacherRecord; arrays come back as numpy.

    Columns left out of the read (``image``, say) get the record's defaults."""
    outputs: dict[str, dict[str, Any]] = json.loads(row.get("outputs") or "{}")
    if row.get("arrays"):
        for name, array in load_arrays(row["arrays"]).items():
            node, key = name.split("/", 1)
            outputs.setdefault(node, {})[key] = array
    return TeacherRecord(
        input_id=row["input_id"], graph_fingerprint=row["graph_fingerprint"],
        image_path=row.get("image_path") or "", question=row.get("question") or "",
        status=row.get("status") or "ok", reason=row.get("reason"), detail=row.get("detail"),
        image_bytes=row.get("image") or b"", outputs=outputs,
        timings=json.loads(row.get("timings") or "{}"), errors=json.loads(row.get("errors") or "{}"),
        created_at=row.get("created_at") or "",
    )


def _decode_table(table: pa.Table) -> list[TeacherRecord]:
    return [decode_row(row) for row in table.to_pylist()]


# -- the store -------------------------------------------------------------------------------------
class TraceStore:
    """Append-only, versioned TeacherRecords in a Lance dataset at ``uri``."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)

    def __repr__(self) -> str:
        return f"TraceStore({self.uri!r})"

    # -- opening -----------------------------------------------------------------------------
    def _dataset(self, version: int | None = None) -> lance.LanceDataset | None:
        """The dataset at ``version`` (latest if None); None when no version was ever committed."""
        try:
            ds = lance.dataset(self.uri)
        except ValueError as e:
            if "not found" in str(e).lower():
                return None
            raise
        if version is None or version == ds.version:
            return ds
        if not 1 <= version <= ds.latest_version:
            raise ValueError(f"trace store {self.uri} has no version {version} "
                             f"(versions 1..{ds.latest_version})")
        return lance.dataset(self.uri, version=version)

    def _required(self, version: int | None) -> lance.LanceDataset | None:
        ds = self._dataset(version)
        if ds is None and version is not None:
            raise ValueError(f"trace store {self.uri} has no version {version} (it holds no commit yet)")
        return ds

    @property
    def version(self) -> int | None:
        """The latest committed version; None if nothing was ever committed."""
        ds = self._dataset()
        return None if ds is None else ds.version

    @staticmethod
    def _filter(fingerprint: str | None, status: str | None) -> pc.Expression | None:
        expr = None
        for column, value in (("graph_fingerprint", fingerprint), ("status", status)):
            if value is not None:
                term = pc.field(column) == value
                expr = term if expr is None else expr & term
        return expr

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """Exclusive lock for one local writer (read keys + commit); a no-op on object stores."""
        if "://" in self.uri and not self.uri.startswith("file://"):
            yield
            return
        folder = Path(self.uri.removeprefix("file://"))
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "_writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock (so does the kernel if the process dies)

    @staticmethod
    def _existing_keys(ds: lance.LanceDataset | None, fingerprints: set[str]) -> dict[tuple[str, str], str]:
        """The stored (input_id, fingerprint) keys for these fingerprints, with their status."""
        if ds is None:
            return {}
        in_batch = pc.field("graph_fingerprint").isin(sorted(fingerprints))
        table = ds.to_table(columns=[*KEY, "status"], filter=in_batch)
        keys = zip(table["input_id"].to_pylist(), table["graph_fingerprint"].to_pylist())
        return dict(zip(keys, table["status"].to_pylist()))

    def append(self, records: list[TeacherRecord]) -> int | None:
        """Commit the records not yet in the store, atomically; return the version after it.

        Records whose (input_id, graph_fingerprint) is already stored, or repeated earlier in
        ``records``, are skipped, but one stored with status ``retry`` is replaced (in the same
        commit, by a merge on the key); with nothing new, no commit is made and the version is
        unchanged."""
        with self._writer_lock():
            ds = self._dataset()
            stored = self._existing_keys(ds, {r.graph_fingerprint for r in records})
            fresh, seen, replaces = [], set(), False
            for rec in records:
                key = (rec.input_id, rec.graph_fingerprint)
                if key not in seen and stored.get(key, RETRY) == RETRY:
                    seen.add(key)
                    fresh.append(rec)
                    replaces |= key in stored
            if not fresh:
                return None if ds is None else ds.version
            table = encode_records(fresh)
            if replaces:  # one commit: the retry records updated, the others inserted
                ds.merge_insert(list(KEY)).when_matched_update_all(f"target.status = '{RETRY}'") \
                    .when_not_matched_insert_all().execute(table)
                return lance.dataset(self.uri).version
            # "create" also succeeds over the orphan files of a first commit that was killed.
            ds = lance.write_dataset(table, self.uri, mode="create" if ds is None else "append")
            return ds.version

    # -- reading -----------------------------------------------------------------------------
    def recorded_ids(self, fingerprint: str) -> set[str]:
        """Input ids recorded for good (ok or quarantined) for this graph fingerprint; those with
        status ``retry`` are not: a run tries them again."""
        ds = self._dataset()
        if ds is None:
            return set()
        done = (pc.field("graph_fingerprint") == fingerprint) & (pc.field("status") != RETRY)
        table = ds.to_table(columns=["input_id"], filter=done)
        return set(table["input_id"].to_pylist())

    def read(self, version: int | None = None, *, fingerprint: str | None = None,
             status: str | None = None, with_images: bool = True) -> list[TeacherRecord]:
        """The records at ``version`` (latest if None), in commit order, optionally filtered."""
        ds = self._required(version)
        if ds is None:
            return []
        columns = [c for c in SCHEMA.names if with_images or c != "image"]
        return _decode_table(ds.to_table(columns=columns, filter=self._filter(fingerprint, status)))

    def take(self, indices: list[int], version: int | None = None) -> list[TeacherRecord]:
        """Records by row number (0 .. count-1 at that version), in the order asked."""
        ds = self._required(version)
        n = 0 if ds is None else ds.count_rows()
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"trace store {self.uri} version {version or self.version}: rows {bad[:5]} "
                             f"out of range (it has {n} rows)")
        if not indices:
            return []
        return _decode_table(ds.take(list(indices)))

    def count(self, version: int | None = None, *, fingerprint: str | None = None,
              status: str | None = None) -> int:
        ds = self._required(version)
        if ds is None:
            return 0
        expr = self._filter(fingerprint, status)
        return ds.count_rows() if expr is None else ds.count_rows(filter=expr)

    def to_table(self, version: int | None = None) -> pa.Table:
        """The raw Arrow table (``SCHEMA``); empty if nothing was committed."""
        ds = self._required(version)
        return SCHEMA.empty_table() if ds is None else ds.to_table()

    def to_pandas(self, version: int | None = None, columns: list[str] | None = None):
        """The raw table as a pandas DataFrame (JSON columns as text, arrays as safetensors bytes)."""
        ds = self._required(version)
        if ds is None:
            return SCHEMA.empty_table().select(columns or SCHEMA.names).to_pandas()
        return ds.to_table(columns=columns).to_pandas()

    @property
    def scores(self):  # -> teachers.scores.ScoreTable
        """The teacher's scores of continuations it did not generate (on-policy distillation),
        their own kind of record in their own table inside the store (``_scores.lance``): the
        records table, and so the versions a training run pins, never change because of them."""
        from distillery.teachers.scores import ScoreTable

        return ScoreTable(f"{self.uri.rstrip('/')}/_scores.lance", self._writer_lock)

    def versions(self) -> list[dict[str, Any]]:
        """Every committed version: ``{"version", "timestamp" (datetime), "rows"}``, oldest first."""
        ds = self._dataset()
        if ds is None:
            return []
        out = []
        for v in ds.versions():
            rows = (v.get("metadata") or {}).get("total_rows")
            if rows is None:
                rows = lance.dataset(self.uri, version=v["version"]).count_rows()
            out.append({"version": v["version"], "timestamp": v["timestamp"], "rows": int(rows)})
        return out
