"""The demo teachers: tiny ones built end to end and cached; the shipped full ones checked."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from distillery.demo import kb
from distillery.demo import retrieval
from distillery.demo.teachers import (ASSETS, FLOOR, LLM_DIR, YOLO_FILE, AssetError, ensure_teachers, fingerprint,
                           fingerprints, stale_teachers, verify_assets)
from distillery.demo.world import WorldConfig, build_world, world_digest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo-teachers")
    world = build_world(WorldConfig.preset("tiny"), base / "world")
    t = time.time()
    art = ensure_teachers(world, "tiny", base / "teachers")
    return world, art, time.time() - t, base


def test_tiny_teachers_build_end_to_end(tiny):
    world, art, seconds, _ = tiny
    assert seconds < 60
    assert art.yolo_weights.is_file() and (art.llm_dir / "model.safetensors").is_file()
    for key in ("box_map50", "mask_map50", "llm_acc_gt", "llm_acc_yolo", "retrieval_recall", "seconds"):
        assert 0 <= art.metrics[key] <= (1 if key != "seconds" else 600), key
    assert art.metrics["requests"] == len(world.annotations("test")["requests"])


def test_tiny_teachers_load_with_the_real_libraries(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ultralytics import YOLO

    world, art, _, _ = tiny
    tok = AutoTokenizer.from_pretrained(art.llm_dir, local_files_only=True)
    trace = kb.render_trace(["red triangle", "green circle"], "Is the area safe?")
    ids = tok(trace, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == trace  # one token per word or number
    tokens = tok.convert_ids_to_tokens(tok("Yellow square x12, red triangles")["input_ids"])
    assert tokens == ["yellow square", "x", "12", ",", "red", "triangles"]  # a class name is one token
    model = AutoModelForCausalLM.from_pretrained(art.llm_dir, local_files_only=True)
    assert model.config.vocab_size == len(tok)
    result = YOLO(str(art.yolo_weights)).predict(str(world.split_dir("test") / "images" / "00000.png"),
                                                 imgsz=96, verbose=False)[0]
    assert list(result.names.values()) == list(kb.CLASSES)


def test_second_call_reuses_cached_teachers(tiny):
    world, art, _, base = tiny
    mtime = art.yolo_weights.stat().st_mtime_ns
    t = time.time()
    again = ensure_teachers(world, "tiny", base / "teachers")
    assert time.time() - t < 5
    assert again.yolo_weights == art.yolo_weights and again.yolo_weights.stat().st_mtime_ns == mtime
    assert again.metrics == art.metrics


def test_cached_teachers_are_checked_before_use(tiny):
    world, art, _, base = tiny
    shutil.copytree(art.yolo_weights.parent, base / "copy")
    with open(base / "copy" / YOLO_FILE, "r+b") as f:  # flip one byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(AssetError, match=r"yolo_seg\.pt is corrupted.*sha256"):
        verify_assets(base / "copy")


def test_shipped_full_assets_pass_their_checksums_and_meet_the_floor():
    verify_assets(ASSETS)
    record = json.loads((ASSETS / "metrics.json").read_text())
    m = record["metrics"]
    assert m["box_map50"] >= FLOOR["box_map50"] and m["llm_acc_gt"] >= FLOOR["llm_acc_gt"]
    assert m["split"] == "test" and m["requests"] >= 300
    # the assets were trained on the world this code draws for the full preset
    full = WorldConfig.preset("full")
    assert record["fingerprint"] == fingerprint(full, "full")
    assert record["fingerprints"] == fingerprints(full, "full")
    assert record["world_digest"] == world_digest(full)


def test_each_teacher_has_its_own_fingerprint(monkeypatch):
    """A new question changes what the LLM reads and writes, not what the segmenter sees: only the
    LLM's fingerprint moves, so only the LLM is retrained."""
    full = WorldConfig.preset("full")
    before = fingerprints(full, "full")
    record = {"fingerprints": before}
    assert stale_teachers(record, full, "full") == []
    assert stale_teachers(record, full.model_copy(update={"n_train": 10}), "full") == ["yolo"]  # other scenes
    bank = kb.question_bank()
    monkeypatch.setattr(kb, "question_bank", lambda: bank + [kb.Question("How many beacons?", "count", ("beacon",))])
    after = fingerprints(full, "full")
    assert after["yolo"] == before["yolo"] and after["llm"] != before["llm"]
    assert stale_teachers(record, full, "full") == ["llm"]


def test_a_corrupted_or_missing_asset_fails_with_a_clear_message(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(ASSETS, copy)
    weights = copy / LLM_DIR / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(AssetError, match=r"model\.safetensors is corrupted or was changed"):
        verify_assets(copy)
    weights.unlink()
    with pytest.raises(AssetError, match="is missing"):
        verify_assets(copy)
    (copy / "SHA256SUMS").unlink()
    with pytest.raises(AssetError, match="SHA256SUMS is missing"):
        verify_assets(copy)


def test_unknown_preset_is_refused(tiny):
    world, _, _, base = tiny
    with pytest.raises(ValueError, match="unknown teacher preset 'huge'"):
        ensure_teachers(world, "huge", base)


def test_real_retriever_finds_the_documents_questions_need():
    bank = kb.question_bank()
    requests = [{"question": q.text, "needed_docs": q.needed_docs} for q in bank]
    rec = retrieval.recall(requests, retrieval.question_contexts(4))
    assert rec["doc_recall"] >= 0.9 and rec["all_docs_recall"] >= 0.85
