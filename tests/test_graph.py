"""TeacherGraph logic (batching, per-input failure isolation, fingerprints) with stand-in nodes.

The real node types are exercised in test_node_*.py and test_record_flow.py."""

from __future__ import annotations

import io

from PIL import Image

from distillery.flows.spec import Spec
from distillery.teachers.base import ItemError, TeacherNode
from distillery.teachers.graph import TeacherGraph
from distillery.teachers.records import Request, make_input_id


class EchoNode(TeacherNode):
    """Returns the rendered query; raises on a poisoned input; refuses 'too long' ones."""

    def __init__(self, name, config):
        super().__init__(name, config)
        self.calls: list[int] = []

    def load(self):
        pass

    def run(self, batch):
        self.calls.append(len(batch))
        if any("poison" in item.texts["query"] for item in batch):
            raise ValueError("poisoned query")
        return [ItemError("query too long") if len(i.texts["query"]) > 40 else {"context": i.texts["query"].upper()}
                for i in batch]


def _spec(batch_size=4) -> Spec:
    return Spec.model_validate({"name": "g", "teachers": {
        "a": {"type": "rag", "documents": "d.jsonl", "query": "{request.question}", "batch_size": batch_size},
        "b": {"type": "rag", "documents": "d.jsonl", "query": "ctx={a.context}", "batch_size": batch_size},
    }})


def _requests(questions):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return [Request(make_input_id(buf.getvalue(), q), f"{i}.png", buf.getvalue(), q) for i, q in enumerate(questions)]


def _graph(spec):
    g = TeacherGraph(spec.teachers)
    g.nodes = {n: EchoNode(n, spec.teachers[n]) for n in spec.teachers}
    return g


def test_templates_render_upstream_outputs_in_order():
    g = _graph(_spec())
    reqs = _requests(["one", "two"])
    a = g.run_node("a", reqs, [{}, {}])
    b = g.run_node("b", reqs, [{"a": r.output} for r in a])
    assert [r.output["context"] for r in b] == ["CTX=ONE", "CTX=TWO"]
    assert g.order == ["a", "b"]


def test_batch_failure_is_isolated_to_the_bad_input():
    g = _graph(_spec(batch_size=8))
    reqs = _requests(["fine", "poison pill", "also fine", "x" * 60])
    results = g.run_node("a", reqs, [{}] * 4)
    assert [r.error is None for r in results] == [True, False, True, False]
    assert "poisoned query" in results[1].error and reqs[1].input_id in results[1].error
    assert results[3].error == "a: query too long"
    assert g.nodes["a"].calls[0] == 4  # one batched call first, then one per input
    assert all(r.seconds >= 0 for r in results)


def test_batches_follow_batch_size():
    g = _graph(_spec(batch_size=3))
    g.run_node("a", _requests([f"q{i}" for i in range(7)]), [{}] * 7)
    assert g.nodes["a"].calls == [3, 3, 1]


def test_fingerprint_changes_with_config_and_weights(tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"id": "1", "text": "a"}\n')
    spec = _spec()
    for node in spec.teachers.values():
        node.documents = str(docs)
    fp = TeacherGraph(spec.teachers).fingerprint
    assert TeacherGraph(spec.teachers).fingerprint == fp  # stable
    changed = spec.model_copy(deep=True)
    changed.teachers["b"].top_k = 5
    assert TeacherGraph(changed.teachers).fingerprint != fp
    docs.write_text('{"id": "1", "text": "b"}\n')  # same config, different file content
    assert TeacherGraph(spec.teachers).fingerprint != fp


def test_file_hashes_are_reused_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """The fingerprint's file hashes are kept per (size, mtime, inode), as git's index keeps them:
    an unchanged file is not read again, a rewritten one is, and a file changed moments before it
    was hashed (coarse timestamps could hide a second change) is read every time."""
    import hashlib
    import os
    import time

    import pytest

    import distillery.teachers.base as base

    f = tmp_path / "weights.bin"
    f.write_bytes(b"x" * 1000)
    old = time.time() - 60
    os.utime(f, (old, old))
    assert base.sha256_file(f) == hashlib.sha256(b"x" * 1000).hexdigest()
    with monkeypatch.context() as m:
        m.setattr(base, "open", lambda *a, **k: pytest.fail("an unchanged file was read again"), raising=False)
        assert base.sha256_file(f) == hashlib.sha256(b"x" * 1000).hexdigest()
    f.write_bytes(b"y" * 1000)  # the same size, a new mtime
    assert base.sha256_file(f) == hashlib.sha256(b"y" * 1000).hexdigest()
    reads = []
    real_open = open
    monkeypatch.setattr(base, "open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k), raising=False)
    base.sha256_file(f), base.sha256_file(f)
    assert len(reads) == 2  # changed just now: never taken from memory
