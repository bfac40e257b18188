"""Input discovery and validation: every bad input is quarantined with the right reason and a
message naming it; good ones reach the teachers as Requests (real PIL decoding throughout)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillery.teachers.inputs import REASONS, InputsConfig, check_input, scan_inputs
from distillery.teachers.records import Quarantined, Request, make_input_id


def load_inputs(inputs, cfg):
    scan = scan_inputs(inputs, cfg)
    return scan.requests, scan.quarantined


def _png(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, followed by a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + _chunk(b"IEND", b""))


def _exif_rotated_jpeg(w: int, h: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    img = root / "images"
    img.mkdir()
    lines: list[bytes] = []

    def req(image: str, question: str = "What is here?") -> None:
        lines.append(json.dumps({"image": image, "question": question}).encode())

    for i in range(5):
        (img / f"good{i}.png").write_bytes(_png(32, 24, seed=i))
        req(f"images/good{i}.png")
    (img / "rotated.jpg").write_bytes(_exif_rotated_jpeg(40, 20))
    req("images/rotated.jpg")
    (root / "absolute.png").write_bytes(_png(16, 16, seed=99))
    req(str((root / "absolute.png").resolve()), "Absolute path?")
    req("images/good0.png")  # duplicate of line 1: kept once
    (img / "zero.png").write_bytes(b"")
    req("images/zero.png")
    (img / "text.png").write_text("this is a text file, not a png\n")
    req("images/text.png")
    (img / "half.png").write_bytes(_png(64, 64, seed=7)[: len(_png(64, 64, seed=7)) // 2])
    req("images/half.png")
    (img / "big.png").write_bytes(_png(300, 300, seed=3))  # 90,000 px > max_pixels below
    req("images/big.png")
    (img / "bomb.png").write_bytes(_png_claiming(60_000, 60_000))  # PIL's own bomb limit
    req("images/bomb.png")
    req("images/missing.png")
    req("images/good1.png", "   ")
    req("images/good2.png", "x" * 201)
    lines.append(b'{"image": "images/good3.png", "question": "caf\xe9?"}')  # latin-1, not UTF-8
    lines.append(b'{"image": "images/good4.png", "question": ')  # broken JSON
    lines.append(b'{"image": "images/good4.png"}')  # no question
    lines.append(b"")  # blank lines are skipped
    (root / "requests.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


CFG = InputsConfig(max_pixels=50_000, max_question_chars=200)
EXPECTED = {  # image file (or line) -> reason
    "zero.png": "empty_file", "text.png": "not_an_image", "half.png": "truncated_image",
    "big.png": "too_many_pixels", "bomb.png": "too_many_pixels", "missing.png": "missing_file",
}


def test_every_bad_input_is_quarantined_with_its_reason_and_named(folder):
    requests, bad = load_inputs(folder, CFG)

    assert [Path(r.image_path).name for r in requests] == [
        "good0.png", "good1.png", "good2.png", "good3.png", "good4.png", "rotated.jpg", "absolute.png"]
    assert all(isinstance(r, Request) and r.image_bytes for r in requests)
    assert requests[0].image_bytes == (folder / "images" / "good0.png").read_bytes()
    assert requests[0].input_id == make_input_id(requests[0].image_bytes, "What is here?")
    assert requests[0].image().size == (32, 24)

    assert all(isinstance(q, Quarantined) and q.reason in REASONS for q in bad)
    by_file = {Path(q.image_path).name: q for q in bad if q.image_path}
    for name, reason in EXPECTED.items():
        assert by_file[name].reason == reason, by_file[name]
        assert name in by_file[name].detail
    assert "line 14" in by_file["missing.png"].detail  # the line in requests.jsonl is named
    assert "50000" in by_file["big.png"].detail

    by_reason = {q.reason: q for q in bad}
    assert by_reason["empty_question"].detail.startswith("requests.jsonl line 15")
    assert by_reason["question_too_long"].detail.startswith("requests.jsonl line 16")
    assert "201" in by_reason["question_too_long"].detail
    assert by_reason["question_not_utf8"].detail.startswith("requests.jsonl line 17")
    assert "0xe9" in by_reason["question_not_utf8"].detail
    broken = sorted(q.detail for q in bad if q.reason == "bad_request_line")
    assert len(broken) == 2
    assert "line 18" in broken[0] and "not valid JSON" in broken[0]
    assert "line 19" in broken[1] and "question" in broken[1]
    assert len(bad) == len(EXPECTED) + 5  # nothing else refused, the duplicate not counted


def test_ids_are_stable_across_runs(folder):
    first_ok, first_bad = load_inputs(folder, CFG)
    again_ok, again_bad = load_inputs(folder, CFG)
    assert [r.input_id for r in first_ok] == [r.input_id for r in again_ok]
    assert [q.input_id for q in first_bad] == [q.input_id for q in again_bad]
    assert len({q.input_id for q in first_bad}) == len(first_bad)


def test_exif_rotation_is_applied(folder):
    item = check_input(folder / "images" / "rotated.jpg", "Which way up?", CFG)
    assert isinstance(item, Request)
    assert Image.open(io.BytesIO(item.image_bytes)).size == (40, 20)  # raw bytes kept as they were
    assert item.image().size == (20, 40)  # decoded upright


def test_header_is_checked_before_decoding(folder):
    """A header claiming 8000x8000 with no pixel data is too big, not truncated: nothing decoded."""
    path = folder / "claims.png"
    path.write_bytes(_png_claiming(8000, 8000))
    item = check_input(path, "q", InputsConfig(max_pixels=1_000_000))
    assert item.reason == "too_many_pixels" and "8000x8000" in item.detail


def test_truncated_images_fail_even_if_pil_was_told_to_load_them(folder, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    item = check_input(folder / "images" / "half.png", "q", CFG)
    assert item.reason == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_folder_of_images_uses_the_default_question(tmp_path):
    for name, data in [("b.jpg", _exif_rotated_jpeg(8, 8)), ("a.png", _png(8, 8)), ("c.PNG", _png(9, 9))]:
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("ignored")
    requests, bad = load_inputs(tmp_path, InputsConfig(default_question="How many shapes?"))
    assert [Path(r.image_path).name for r in requests] == ["a.png", "b.jpg", "c.PNG"]
    assert {r.question for r in requests} == {"How many shapes?"} and bad == []


def test_folder_without_requests_needs_a_default_question(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(8, 8))
    with pytest.raises(ValueError, match="no requests.jsonl.*default_question"):
        load_inputs(tmp_path, InputsConfig())


def test_missing_inputs_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        load_inputs(tmp_path / "nowhere", InputsConfig(default_question="q"))


def test_recorded_inputs_are_counted_not_checked_again(folder, monkeypatch):
    """A rerun: the ids already in the store are skipped after a read and a hash, no decode."""
    import distillery.teachers.inputs as inputs

    requests, bad = load_inputs(folder, CFG)
    done = {r.input_id for r in requests[:4]}  # good0..good3 with "What is here?"
    checked = []
    real = inputs.check_input
    monkeypatch.setattr(inputs, "check_input",
                        lambda path, question, *a, **k: checked.append((Path(path).name, question)) or real(path, question, *a, **k))
    scan = inputs.scan_inputs(folder, CFG, skip=done)
    assert scan.skipped == 4
    assert [r.input_id for r in scan.requests] == [r.input_id for r in requests[4:]]
    assert [q.input_id for q in scan.quarantined] == [q.input_id for q in bad]
    assert not {(f"good{i}.png", "What is here?") for i in range(4)} & set(checked)


def test_an_image_asked_about_several_times_is_decoded_once_and_its_requests_share_its_bytes(tmp_path, monkeypatch):
    import distillery.teachers.inputs as inputs

    (tmp_path / "a.png").write_bytes(_png(16, 12, seed=1))
    (tmp_path / "b.png").write_bytes(_png(8, 8, seed=2))
    (tmp_path / "bad.png").write_bytes(_png(16, 16)[:60])  # truncated: each question on it says so itself
    lines = [("a.png", "How many?"), ("b.png", "How many?"), ("a.png", "Which colour?"), ("bad.png", "One?"),
             ("a.png", ""), ("a.png", "Is it safe?"), ("bad.png", "Two?")]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps({"image": i, "question": q}) + "\n" for i, q in lines))
    decoded = []
    real = inputs.check_image
    monkeypatch.setattr(inputs, "check_image", lambda data, cfg, label: decoded.append(label) or real(data, cfg, label))
    requests, bad = load_inputs(tmp_path, CFG)
    assert [(Path(r.image_path).name, r.question) for r in requests] == [
        ("a.png", "How many?"), ("b.png", "How many?"), ("a.png", "Which colour?"), ("a.png", "Is it safe?")]
    a = [r for r in requests if r.image_path.endswith("a.png")]
    assert all(r.image_bytes is a[0].image_bytes for r in a)  # one copy in memory (and in a pickled shard)
    assert a[0].image_bytes == (tmp_path / "a.png").read_bytes()
    assert len([x for x in decoded if "a.png" in x]) == 1 and len([x for x in decoded if "b.png" in x]) == 1
    assert [(q.reason, q.question) for q in bad] == [("truncated_image", "One?"), ("empty_question", ""),
                                                    ("truncated_image", "Two?")]
    assert "line 4" in bad[0].detail and "line 7" in bad[2].detail  # each bad input named by its own line


def test_images_outside_the_inputs_folder_are_refused_before_they_are_opened(tmp_path, monkeypatch):
    """``..``, an absolute path elsewhere and a symlink that points out are ``outside_inputs``;
    a symlink inside the folder to a file inside it is an ordinary input. The outside files are
    valid images (so only the place refuses them), and none of them is ever read."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(8, 8, seed=1))
    root = tmp_path / "inputs"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(_png(8, 8, seed=2))
    (root / "images" / "link-in.png").symlink_to(root / "images" / "a.png")
    (root / "images" / "link-out.png").symlink_to(outside / "secret.png")
    lines = [{"image": "../elsewhere/secret.png", "question": "q1"},
             {"image": str(outside / "secret.png"), "question": "q2"},
             {"image": "images/link-out.png", "question": "q3"},
             {"image": "images/link-in.png", "question": "q4"},
             {"image": str(root / "images" / "a.png"), "question": "q5"}]
    (root / "requests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    real_read = Path.read_bytes

    def guarded(self):
        assert os.path.realpath(self).startswith(os.path.realpath(root)), f"read outside the folder: {self}"
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", guarded)
    requests, bad = load_inputs(root, CFG)
    assert sorted(r.question for r in requests) == ["q4", "q5"]
    assert {q.question: q.reason for q in bad} == {"q1": "outside_inputs", "q2": "outside_inputs",
                                                  "q3": "outside_inputs"}
    assert all("requests.jsonl line" in q.detail and "outside the inputs folder" in q.detail for q in bad)
    # the same rule for a folder of images with no requests file, and for a rerun's quick skip
    (root / "requests.jsonl").unlink()
    requests, bad = load_inputs(root / "images", InputsConfig(default_question="q"))
    assert [q.reason for q in bad] == ["outside_inputs"] and len(requests) == 1  # a.png and its link: one input
    scan = scan_inputs(root / "images", InputsConfig(default_question="q"), skip={r.input_id for r in requests})
    assert scan.skipped == 1 and [q.reason for q in scan.quarantined] == ["outside_inputs"]


@pytest.mark.parametrize("question, ok", [("How many?\tcount\nplease\r\n", True), ("How\x00 many?", False),
                                          ("\x1b[31mred\x1b[0m", False), ("del\x7f", False),
                                          ("c1 \x85 control", False), ("café, naïve, 数", True)])
def test_control_characters_in_a_question_are_refused_not_cleaned(tmp_path, question, ok):
    (tmp_path / "a.png").write_bytes(_png(8, 8))
    (tmp_path / "requests.jsonl").write_text(json.dumps({"image": "a.png", "question": question}) + "\n")
    requests, bad = load_inputs(tmp_path, CFG)
    if ok:
        assert [r.question for r in requests] == [question] and not bad
    else:
        assert not requests and [q.reason for q in bad] == ["question_control_chars"]
        assert "control character U+" in bad[0].detail and "requests.jsonl line 1" in bad[0].detail


def test_a_run_checks_its_inputs_shard_by_shard_and_commits_the_refused_with_the_next(tmp_path, monkeypatch):
    """``record`` checks the inputs as the shards are needed: the first shard runs once its own
    inputs (and the refused ones before them) are checked, not all of them; a refused input is
    committed with the next commit; a rerun skips everything and reports it all done."""
    from types import SimpleNamespace

    from distillery.teachers import inputs as inputs_mod
    from distillery.teachers.record import RecordConfig, record
    from distillery.teachers.records import TeacherRecord
    from distillery.teachers.store import TraceStore

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(7):
        (folder / f"{i}.png").write_bytes(_png(8, 8, seed=i) if i != 2 else b"not an image")
    spec = SimpleNamespace(teachers={}, inputs=InputsConfig(default_question="q"), record=RecordConfig(shard_size=2))
    checked, at_shard, progress = [], [], []
    real_check = inputs_mod.check_input
    monkeypatch.setattr(inputs_mod, "check_input", lambda path, *a, **k: checked.append(path) or real_check(path, *a, **k))

    def remote(graph, no, requests):
        at_shard.append((no, len(checked)))
        return [TeacherRecord(r.input_id, graph.fingerprint, r.image_path, r.question, image_bytes=r.image_bytes)
                for r in requests]

    graph = SimpleNamespace(fingerprint="fp")
    summary = record(spec, str(folder), str(tmp_path / "t.lance"), graph=graph, remote=remote,
                     on_progress=lambda done, total: progress.append((done, total)))
    assert at_shard == [(0, 2), (1, 5), (2, 7)]  # shard 1 = inputs 3 and 4: 2 was refused on the way
    assert (summary.written, summary.quarantined, summary.skipped) == (6, 1, 0)
    assert progress[0] == (0, 7) and progress[-1] == (7, 7) and progress == sorted(progress)
    rows = list(TraceStore(tmp_path / "t.lance").read(fingerprint="fp"))
    assert sorted(r.image_path.rsplit("/", 1)[-1] for r in rows) == [f"{i}.png" for i in range(7)]
    assert [r.status for r in rows if r.image_path.endswith("2.png")] == ["quarantined"]
    progress.clear()
    again = record(spec, str(folder), str(tmp_path / "t.lance"), graph=graph, remote=remote,
                   on_progress=lambda done, total: progress.append((done, total)))
    assert (again.written, again.quarantined, again.skipped) == (0, 0, 7) and progress[-1] == (7, 7)


def test_recent_images_keep_a_bounded_number_of_files():
    from distillery.teachers.inputs import RecentImages

    recent = RecentImages(size=2)
    recent["a"], recent["b"] = b"1", b"2"
    assert recent.get("a") == b"1"  # a is now the most recent
    recent["c"] = b"3"
    assert list(recent) == ["a", "c"] and recent.get("b") is None
