"""The trace store on real Lance: round trips, versions, dedup, and SIGKILL at random moments.

Run as a script (``python tests/test_store.py URI``) this file is the writer that the crash test
kills: 40 one-record commits, then one big commit that overlaps them and repeats a record."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pytest

from distillery.teachers.records import TeacherRecord
from distillery.teachers.store import TraceStore, decode_row, encode_records, parse_traces_ref

ROOT = Path(__file__).resolve().parents[1]
N_SMALL, N_TOTAL, FP = 40, 400, "fp-crash"


def make_record(i: int, fingerprint: str = FP, status: str = "ok") -> TeacherRecord:
    """A deterministic record for input i, with the array dtypes real teachers produce."""
    rng = np.random.default_rng(i)
    tokens = int(rng.integers(3, 30))
    return TeacherRecord(
        input_id=f"in{i:04d}", graph_fingerprint=fingerprint, image_path=f"images/{i}.png",
        question=f"How many shapes in image {i}? ünïcödé", status=status,
        reason=None if status == "ok" else "node_error:llm", detail=None if status == "ok" else "boom",
        image_bytes=rng.bytes(3000),
        outputs={
            "det": {"boxes": rng.random((5, 4), dtype=np.float32),
                    "classes": rng.integers(0, 3, 5).astype(np.int64), "keep": rng.random(5) > 0.5,
                    "empty": np.zeros((0, 4), np.float32), "zero_d": np.array(7, np.int16),
                    "count": np.int64(5), "labels": ["a", "b"], "summary": "5 shapes"},
            "llm": {"token_ids": rng.integers(0, 1000, tokens).astype(np.int32),
                    "topk_ids": rng.integers(0, 1000, (tokens, 20)).astype(np.int32),
                    "topk_logprobs": (-rng.random((tokens, 20)) * 5).astype(np.float16),
                    "answer": f"{i}", "score": np.float32(0.25), "ok": np.bool_(True)},
        },
        timings={"det": 0.01 * i, "llm": np.float64(0.5)}, errors={} if status == "ok" else {"llm": "boom"},
        created_at="2026-01-01T00:00:00+00:00",
    )


def assert_same(got: TeacherRecord, want: TeacherRecord) -> None:
    for name in ("input_id", "graph_fingerprint", "image_path", "question", "status", "reason",
                 "detail", "image_bytes", "errors", "created_at"):
        assert getattr(got, name) == getattr(want, name), name
    assert got.timings == pytest.approx({k: float(v) for k, v in want.timings.items()})
    assert set(got.outputs) == set(want.outputs)
    for node, out in want.outputs.items():
        assert set(got.outputs[node]) == set(out), node
        for key, value in out.items():
            back = got.outputs[node][key]
            if isinstance(value, np.ndarray):
                assert isinstance(back, np.ndarray)
                assert back.dtype == value.dtype and back.shape == value.shape, (node, key)
                np.testing.assert_array_equal(back, value)
            else:
                assert back == value and not isinstance(back, np.generic), (node, key)


# -- pure encoding -------------------------------------------------------------------------------
def test_encode_decode_round_trip_keeps_dtypes_and_converts_scalars():
    recs = [make_record(1), make_record(2, status="quarantined")]
    table = encode_records(recs)
    assert table.num_rows == 2
    rows = table.to_pylist()
    assert json.loads(rows[0]["outputs"])["det"] == {"count": 5, "labels": ["a", "b"], "summary": "5 shapes"}
    for row, rec in zip(rows, recs):
        back = decode_row(row)
        assert_same(back, rec)
    back = decode_row(rows[0])
    assert type(back.outputs["llm"]["score"]) is float and type(back.outputs["llm"]["ok"]) is bool
    assert type(back.outputs["det"]["count"]) is int


def test_encode_fills_created_at_and_names_unstorable_values():
    rec = make_record(3)
    rec.created_at = ""
    assert encode_records([rec]).column("created_at")[0].as_py().endswith("+00:00")
    rec.outputs["det"]["bad"] = object()
    with pytest.raises(TypeError, match="in0003 outputs"):
        encode_records([rec])


def test_parse_traces_ref():
    assert parse_traces_ref("runs/traces.lance@3") == ("runs/traces.lance", 3)
    assert parse_traces_ref("runs/traces.lance") == ("runs/traces.lance", None)
    assert parse_traces_ref("/home/a@b/traces.lance") == ("/home/a@b/traces.lance", None)
    for bad in ("traces.lance@latest", "traces.lance@0", "traces.lance@", "@2"):
        with pytest.raises(ValueError, match="traces reference"):
            parse_traces_ref(bad)


# -- the store -----------------------------------------------------------------------------------
def test_append_read_versions_and_old_views(tmp_path):
    uri = tmp_path / "traces.lance"
    store = TraceStore(uri)
    assert store.version is None and store.count() == 0 and store.read() == [] and store.versions() == []
    assert store.recorded_ids("fp") == set()

    assert store.append([make_record(0, "fp"), make_record(1, "fp")]) == 1
    assert store.append([make_record(2, "fp", status="quarantined")]) == 2
    assert store.version == 2
    assert [v["rows"] for v in store.versions()] == [2, 3]
    assert [v["version"] for v in store.versions()] == [1, 2]

    latest = store.read()
    assert [r.input_id for r in latest] == ["in0000", "in0001", "in0002"]
    for got, i in zip(latest, range(3)):
        assert_same(got, make_record(i, "fp", status="quarantined" if i == 2 else "ok"))
    assert [r.input_id for r in store.read(version=1)] == ["in0000", "in0001"]  # the old view stays
    assert store.count(version=1) == 2 and store.count() == 3
    assert [r.input_id for r in store.read(status="quarantined")] == ["in0002"]
    assert store.count(status="ok") == 2
    no_images = store.read(with_images=False)
    assert all(r.image_bytes == b"" and r.outputs for r in no_images)
    assert [r.input_id for r in store.take([2, 0])] == ["in0002", "in0000"]
    assert store.take([1], version=1)[0].input_id == "in0001"
    with pytest.raises(IndexError, match="out of range"):
        store.take([3])
    with pytest.raises(ValueError, match="no version 7"):
        store.read(version=7)


def test_plain_lance_and_pandas_can_read_it(tmp_path):
    uri = tmp_path / "traces.lance"
    TraceStore(uri).append([make_record(0), make_record(1)])
    TraceStore(uri).append([make_record(2)])
    df = lance.dataset(uri, version=1).to_table().to_pandas()
    assert list(df["input_id"]) == ["in0000", "in0001"]
    assert json.loads(df["outputs"][0])["llm"]["answer"] == "0"
    assert df["image"][1] == make_record(1).image_bytes
    small = TraceStore(uri).to_pandas(columns=["input_id", "status"])
    assert list(small.columns) == ["input_id", "status"] and len(small) == 3
    assert TraceStore(uri).to_table(version=1).num_rows == 2


def test_dedup_across_commits_inside_a_batch_and_per_fingerprint(tmp_path):
    store = TraceStore(tmp_path / "traces.lance")
    assert store.append([make_record(0, "A"), make_record(1, "A"), make_record(0, "A")]) == 1
    assert store.count() == 2  # the repeat inside the batch is written once
    assert store.append([make_record(1, "A"), make_record(0, "A")]) == 1  # nothing new: no commit
    assert store.version == 1 and len(store.versions()) == 1
    assert store.append([make_record(0, "B"), make_record(2, "A")]) == 2  # same input, other graph
    assert store.recorded_ids("A") == {"in0000", "in0001", "in0002"}
    assert store.recorded_ids("B") == {"in0000"}
    assert [r.graph_fingerprint for r in store.read(fingerprint="B")] == ["B"]
    assert store.count(fingerprint="A") == 3 and store.count(fingerprint="A", status="ok") == 3


def test_concurrent_writers_never_store_a_key_twice(tmp_path):
    """Two writers appending overlapping batches at once (the writer lock serializes them)."""
    from concurrent.futures import ThreadPoolExecutor

    uri = tmp_path / "traces.lance"
    records = [make_record(i) for i in range(30)]

    def write(offset: int) -> None:
        store = TraceStore(uri)
        for start in range(offset, 30, 3):
            store.append(records[start:start + 4])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, [0, 1]))
    ids = [r.input_id for r in TraceStore(uri).read(with_images=False)]
    assert sorted(ids) == sorted({r.input_id for r in records})


# -- crashes -------------------------------------------------------------------------------------
def die_inside_commits() -> None:
    """Make later Lance writes SIGKILL their own process midway: files of 100 rows, and death as
    the second file begins, after the first is written and before any manifest names it."""
    from lance.progress import FragmentWriteProgress

    class DieAtSecondFile(FragmentWriteProgress):
        files = 0

        def begin(self, fragment, **kwargs) -> None:
            self.files += 1
            if self.files == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        def complete(self, fragment, **kwargs) -> None:
            pass

    real = lance.write_dataset
    lance.write_dataset = lambda *a, **kw: real(*a, progress=DieAtSecondFile(), max_rows_per_file=100, **kw)


def writer(uri: str, die_in_big_commit: bool = False) -> None:
    """Append N_SMALL one-record commits, then one big commit (overlapping, with a repeat)."""
    store = TraceStore(uri)
    for i in range(N_SMALL):
        version = store.append([make_record(i)])
        print(f"commit {i} {version}", flush=True)
    big = [make_record(i) for i in range(N_SMALL - 5, N_TOTAL)] + [make_record(N_TOTAL - 1)]
    if die_in_big_commit:
        die_inside_commits()
    print("big", flush=True)
    store.append(big)
    print("done", flush=True)


def _start(uri: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, __file__, str(uri), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _kill_after(proc: subprocess.Popen, marker: str, delay: float = 0.0) -> None:
    for line in proc.stdout:
        if line.startswith(marker):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _check_consistent(uri: Path) -> set[int]:
    """The table opens, every row decodes intact, no key twice, commits all-or-nothing."""
    lance.dataset(uri).validate()
    records = TraceStore(uri).read()
    ids = [int(r.input_id[2:]) for r in records]
    assert len(ids) == len(set(ids)), "a (input_id, fingerprint) is stored twice"
    for rec in records:
        assert_same(rec, make_record(int(rec.input_id[2:])))
    small = sorted(i for i in ids if i < N_SMALL)
    assert small == list(range(len(small))), "one-record commits are visible in order"
    big = {i for i in ids if i >= N_SMALL}
    assert big in (set(), set(range(N_SMALL, N_TOTAL))), "the big commit is all or nothing"
    return set(ids)


def _data_files(uri: Path) -> set[str]:
    return set(os.listdir(uri / "data"))


def test_sigkill_at_any_moment_leaves_whole_records_and_a_rerun_completes(tmp_path):
    uri = tmp_path / "traces.lance"
    _kill_after(_start(uri), "commit 4")  # between (or inside) small commits
    assert len(_check_consistent(uri)) >= 5

    # Inside the big commit, after its data file is written and before its manifest.
    proc = _start(uri, "die-in-big-commit")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "done" not in out
    before = _data_files(uri)
    assert _check_consistent(uri) == set(range(N_SMALL)), "a killed commit must not be visible"
    referenced = {Path(f.path).name for frag in lance.dataset(uri).get_fragments() for f in frag.data_files()}
    assert before - referenced, "the killed commit had written a data file (an orphan now)"

    _kill_after(_start(uri), "big", delay=random.Random(7).uniform(0.0, 0.15))  # at a random moment
    _check_consistent(uri)

    proc = _start(uri)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.rstrip().endswith("done")
    assert _check_consistent(uri) == set(range(N_TOTAL))
    assert TraceStore(uri).count() == N_TOTAL  # each input exactly once


if __name__ == "__main__":
    writer(sys.argv[1], die_in_big_commit="die-in-big-commit" in sys.argv[2:])
