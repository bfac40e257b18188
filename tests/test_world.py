"""The demo world: deterministic per seed, its ground truth agrees with itself and the KB, and
each split carries its labels in the users' formats (COCO annotations.json, labelled requests)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from distillery.demo import kb
from distillery import rle
from distillery.demo.world import SPLITS, WorldConfig, build_world

SMALL = {"n_train": 6, "n_val": 3, "n_test": 3}


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file the world writes (not caches other tools add later)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".cache"
             and p.name != "data.yaml"]  # data.yaml holds the absolute path of the folder
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    base = tmp_path_factory.mktemp("worlds")
    a = build_world(WorldConfig(seed=0, **SMALL), base / "a")
    b = build_world(WorldConfig(seed=0, **SMALL), base / "b")
    c = build_world(WorldConfig(seed=1, **SMALL), base / "c")
    return a, b, c


def test_same_seed_same_bytes_and_other_seed_differs(worlds):
    a, b, c = worlds
    da, db, dc = _digest(a.root), _digest(b.root), _digest(c.root)
    assert len(da) == 2 * 12 + 3 * 3 + 2 and da == db
    images = [k for k in da if k.endswith(".png")]
    assert sum(da[k] != dc[k] for k in images) == len(images)


def test_rebuild_reuses_and_other_config_rebuilds(worlds, tmp_path):
    a = worlds[0]
    before = (a.root / "train" / "annotations.json").stat().st_mtime_ns
    again = build_world(WorldConfig(seed=0, **SMALL), a.root)
    assert (again.root / "train" / "annotations.json").stat().st_mtime_ns == before
    w = build_world(WorldConfig(seed=0, n_train=2, n_val=1, n_test=1), tmp_path / "w")
    w2 = build_world(WorldConfig(seed=0, n_train=3, n_val=1, n_test=1), tmp_path / "w")
    assert len(w2.annotations("train")["images"]) == 3 and w.root == w2.root


def test_refuses_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="no world.json"):
        build_world(WorldConfig(**SMALL), tmp_path)
    assert (tmp_path / "mine.txt").exists()


def test_config_is_validated():
    with pytest.raises(ValueError, match="min_objects"):
        WorldConfig(min_objects=5, max_objects=2)
    with pytest.raises(ValueError, match="unknown world preset"):
        WorldConfig.preset("huge")
    assert WorldConfig.preset("full").n_train >= 600


def test_masks_inside_boxes_and_labels_match(worlds):
    w = worlds[0]
    for split in SPLITS:
        for im in w.annotations(split)["images"]:
            owner = np.zeros((im["height"], im["width"]), dtype=int)
            lines = (w.split_dir(split) / im["file"].replace("images/", "labels/")
                     .replace(".png", ".txt")).read_text().splitlines()
            assert [int(line.split()[0]) for line in lines] == [o["class_id"] for o in im["objects"]]
            assert im["labels"] == [kb.CLASSES[o["class_id"]] for o in im["objects"]]
            for o in im["objects"]:
                m = rle.decode(o["mask"]).astype(bool)
                ys, xs = np.nonzero(m)
                x1, y1, x2, y2 = o["box"]
                assert m.sum() == o["area"] > 0
                assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
                assert np.allclose(o["box_norm"], np.array(o["box"]) / im["width"], atol=1e-5)
                owner += m
            assert owner.max() <= 1  # visible parts never overlap


def test_objects_are_big_enough_and_varied(worlds):
    w = worlds[0]
    objs = [o for im in w.annotations("train")["images"] for o in im["objects"]]
    sides = [max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) for o in objs]
    assert min(sides) * 160 / 256 >= 12  # still detectable at 160 px inference
    assert len({o["class_id"] for o in objs}) >= 6


def _meanings_from_kb(docs: list[dict]) -> dict[str, set[str]]:
    """Which classes mean what, read from the documents' text (not from demo.kb's tables)."""
    out: dict[str, set[str]] = {}
    for d in docs:
        m = re.search(r"An? (\w+) is marked by an? (.+)\.$", d["text"])
        if m:
            out[m.group(1)] = set(m.group(2).split(" or a "))
    return out


def _expected(question: str, n: dict[str, int], n_large: dict[str, int]) -> str:
    """Answers written from the questions' wording and the rule documents, independently."""
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(n[m.group(1)])
    if m := re.fullmatch(r"How many large (\w+)s are there\?", question):
        return str(n_large[m.group(1)])
    if m := re.fullmatch(r"How many (\w+)s and (\w+)s are there in total\?", question):
        return str(n[m.group(1)] + n[m.group(2)])
    if m := re.fullmatch(r"Are there more (\w+)s than (\w+)s\?", question):
        return "yes" if n[m.group(1)] > n[m.group(2)] else "no"
    if m := re.fullmatch(r"Which are there more of, (\w+)s or (\w+)s\?", question):
        a, b = m.group(1), m.group(2)
        return "neither" if n[a] == n[b] else (a if n[a] > n[b] else b) + "s"
    rules = {"Is the area safe?": n["exit"] >= n["hazard"],
             "Does the hazard alarm sound?": n["hazard"] >= 2,
             "Is the site monitored?": n["sensor"] + n["beacon"] >= 2,
             "Is the water system balanced?": n["valve"] == n["pump"]}
    return "yes" if rules[question] else "no"


def test_answers_agree_with_scene_and_kb(worlds):
    w = worlds[0]
    docs = w.documents()
    ids = {d["id"] for d in docs}
    meanings = _meanings_from_kb(docs)
    assert len(docs) >= 40 and len(meanings) >= 5
    seen_types = Counter()
    for split in SPLITS:
        ann = w.annotations(split)
        labels = {im["file"]: im["labels"] for im in ann["images"]}
        # large: the visible mask covers at least 3% of the image, read from the masks themselves
        large = {im["file"]: [o["label"] for o in im["objects"]
                              if rle.decode(o["mask"]).astype(bool).mean() >= 0.03] for im in ann["images"]}
        lines = [json.loads(x) for x in w.requests_path(split).read_text().splitlines()]
        assert lines == [{"image": r["image"], "question": r["question"], "answer": r["answer"], "type": r["type"],
                          "documents": r["needed_docs"]} for r in ann["requests"]]  # the labels users give
        for r in ann["requests"]:
            counts, big = Counter(labels[r["image"]]), Counter(large[r["image"]])
            n = {m: sum(counts[c] for c in classes) for m, classes in meanings.items()}
            n_large = {m: sum(big[c] for c in classes) for m, classes in meanings.items()}
            assert r["answer"] == _expected(r["question"], n, n_large), r
            assert r["needed_docs"] and set(r["needed_docs"]) <= ids
            assert (w.split_dir(split) / r["image"]).exists()
            seen_types[r["type"]] += 1
    assert set(seen_types) == set(kb.QUESTION_TYPES)


def test_large_questions_need_the_masks_not_the_boxes(worlds):
    """Whether an object is large depends on its mask: objects of the same box area differ (a
    triangle fills about half its box), so a box-area rule would get some large answers wrong."""
    images = [im for split in SPLITS for im in worlds[0].annotations(split)["images"]]
    objs = [o for im in images for o in im["objects"]]
    size = images[0]["width"] ** 2
    large = [o["area"] >= kb.LARGE_AREA * size for o in objs]
    assert 0.2 < np.mean(large) < 0.8
    fill = {s: np.mean([o["area"] / ((o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]))
                        for o in objs if o["label"].endswith(s)]) for s in kb.SHAPES}
    assert fill["triangle"] < 0.6 < fill["square"]
    for im in images:
        assert sorted(im["large"]) == sorted(o["label"] for o in im["objects"] if o["area"] >= kb.LARGE_AREA * size)


def test_each_split_has_a_coco_file_that_pycocotools_reads(worlds):
    """annotations.json is plain COCO: boxes [x, y, w, h] and RLE masks of the scenes' objects,
    categories named as the detector's classes, read by pycocotools itself."""
    from pycocotools.coco import COCO

    w = worlds[0]
    for split in SPLITS:
        coco = COCO(str(w.split_dir(split) / "annotations.json"))
        scenes = w.annotations(split)["images"]
        assert [im["file_name"] for im in coco.loadImgs(coco.getImgIds())] == [im["file"] for im in scenes]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(kb.CLASSES)
        for image_id, scene in zip(coco.getImgIds(), scenes):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert [coco.cats[a["category_id"]]["name"] for a in anns] == scene["labels"]
            for a, o in zip(anns, scene["objects"]):
                x1, y1, x2, y2 = o["box"]
                assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1] and a["area"] == o["area"]
                assert np.array_equal(coco.annToMask(a), rle.decode(o["mask"]))


def test_yolo_dataset_yaml(worlds):
    w = worlds[0]
    data = yaml.safe_load(w.data_yaml.read_text())
    assert list(data["names"].values()) == list(kb.CLASSES)
    for split in ("train", "val", "test"):
        assert (Path(data["path"]) / data[split]).is_dir()


def test_prompt_and_trace():
    prompt = kb.build_prompt("red triangle x2", "fact one\nfact two", "How many hazards are there?")
    assert prompt == ("objects: red triangle x2\nfacts: fact one\nfact two\n"
                      "question: How many hazards are there?\nanswer:")
    assert kb.describe_detections(["red circle", "blue square", "red circle"]) == "blue square x1, red circle x2"
    assert kb.describe_detections([]) == "nothing"
    trace = kb.render_trace(["red triangle", "red triangle", "green square"], "Is the area safe?")
    assert trace.startswith("<think> ") and " </think> " in trace
    assert "= 2" in trace and kb.parse_answer(trace) == "no"
    assert (kb.render_trace(["red triangle", "red triangle"], "How many large hazards are there?", ["red triangle"])
            == "<think> hazard is red triangle , yellow triangle ; large hazards = red triangle 1 + yellow triangle 0"
               " = 1 </think> 1")
    assert kb.describe_detections(["red circle", "red circle"], ["red circle"]) == "red circle x2 (1 large)"
    with pytest.raises(KeyError, match="not one of the demo world's templates"):
        kb.render_trace([], "What is the meaning of life?")


def test_processes_draw_the_same_split_as_one(tmp_path):
    """Scenes are seeded by their index, so a split drawn by two processes (chunks of 50 scenes)
    is byte for byte the split one process draws, annotations in the same order."""
    from distillery.demo.world import _write_split

    cfg = WorldConfig(seed=3, n_train=101, n_val=1, n_test=1, questions_per_image=1)
    _write_split(cfg, tmp_path / "one", "train", workers=1)
    _write_split(cfg, tmp_path / "two", "train", workers=2)
    one, two = _digest(tmp_path / "one"), _digest(tmp_path / "two")
    assert len(one) == 2 * 101 + 3 and one == two
