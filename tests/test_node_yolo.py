"""The `yolo` teacher node through real Ultralytics, on tiny models built here from model YAMLs.

A random-init YOLO is degenerate (activations vanish through the untrained BatchNorms, so every
anchor gets the same score), so the fixture calibrates the BatchNorm statistics on noise and
rescales the head: the weights stay random, but boxes, scores and masks vary like a real model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillery.teachers.base import ItemError, NodeInput
from distillery.rle import decode as rle_to_mask
from distillery.rle import encode as mask_to_rle
from distillery.teachers.nodes.yolo import YoloConfig, YoloNode, describe_detections

NAMES = {0: "red circle", 1: "blue square", 2: "green triangle"}
KEYS = {"boxes", "classes", "scores", "class_probs", "labels", "masks", "areas", "summary", "count", "image_size"}
SIZES = [(70, 100), (64, 64), (90, 50)]  # (H, W): non-square on purpose, to catch H/W mix-ups


def _tiny_yolo(task: str, folder: Path) -> Path:
    """Build yolo11n(-seg) with 3 named classes from its YAML and save it as a .pt weights file."""
    import torch
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolo11n-seg.yaml" if task == "segment" else "yolo11n.yaml")
    cfg["nc"] = 3
    cfg_path = folder / f"yolo11n-{task}-3cls.yaml"  # 'yolo11n' in the name selects the n scale
    cfg_path.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = YOLO(str(cfg_path))
    net = model.model
    for m in net.modules():  # BatchNorm statistics from one batch of noise
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 96, 96))
    net.eval()
    head = net.model[-1]
    for seq in head.cv3:  # class logits spread around 0 instead of the prior's -7
        seq[-1].weight.data.mul_(0.05)
        torch.nn.init.zeros_(seq[-1].bias)
    for seq in head.cv2:  # box distances: DFL bins tilted towards small boxes
        seq[-1].weight.data.mul_(0.3)
        seq[-1].bias.data = (-0.7 * torch.arange(head.reg_max, dtype=torch.float32)).repeat(4)
    net.names = dict(NAMES)
    out = folder / f"{task}.pt"
    model.save(str(out))
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("yolo")
    return {task: _tiny_yolo(task, folder) for task in ("detect", "segment")}


@pytest.fixture(scope="module")
def nodes(weights) -> dict[str, YoloNode]:
    out = {}
    for task, path in weights.items():
        node = YoloNode(task, YoloConfig(weights=str(path), task=task, imgsz=96, conf=0.3, max_det=8))
        node.load()
        out[task] = node
    return out


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _inputs(images) -> list[NodeInput]:
    return [NodeInput(input_id=f"img{i}", image=im) for i, im in enumerate(images)]


# -- helpers ----------------------------------------------------------------------------------
def test_describe_detections_counts_sorted_by_label():
    assert describe_detections(["red circle", "blue square", "red circle"]) == "blue square x1, red circle x2"
    assert describe_detections(["b", "a", "c", "a"]) == "a x2, b x1, c x1"
    assert describe_detections([]) == "nothing"
    assert (describe_detections(["red circle", "blue square", "red circle"], ["red circle"])
            == "blue square x1, red circle x2 (1 large)")
    assert describe_detections(["a"], []) == "a x1"


def test_large_area_needs_masks():
    with pytest.raises(ValueError, match="large_area is measured on the masks"):
        YoloConfig(weights="m.pt", task="detect", large_area=0.03)


def test_rle_round_trip_is_json_and_keeps_hw():
    mask = np.zeros((70, 100), dtype=np.uint8)
    mask[10:30, 60:95] = 1
    rle = mask_to_rle(mask)
    assert rle["size"] == [70, 100]
    assert isinstance(rle["counts"], str)
    back = rle_to_mask(json.loads(json.dumps(rle)))
    assert back.shape == (70, 100) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


# -- outputs ----------------------------------------------------------------------------------
def _check_common(out: dict, hw: tuple[int, int], nc: int = 3) -> None:
    assert set(out) == KEYS
    n = out["count"]
    assert n > 0, "the tiny model should detect something at conf 0.3"
    assert out["boxes"].dtype == np.float32 and out["boxes"].shape == (n, 4)
    assert out["classes"].dtype == np.int32 and out["classes"].shape == (n,)
    assert out["scores"].dtype == np.float32 and out["scores"].shape == (n,)
    assert out["class_probs"].dtype == np.float32 and out["class_probs"].shape == (n, nc)
    assert out["image_size"] == list(hw)
    b = out["boxes"]
    assert (b >= 0).all() and (b <= 1).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    assert (out["scores"] >= 0.3).all()
    # the soft label is the kept box's class-score row: its argmax is the class, its max the score
    rows = np.arange(n)
    np.testing.assert_allclose(out["class_probs"][rows, out["classes"]], out["scores"], atol=1e-5)
    np.testing.assert_array_equal(out["class_probs"].argmax(1), out["classes"])
    assert out["labels"] == [NAMES[int(c)] for c in out["classes"]]
    assert out["summary"] == describe_detections(out["labels"])


def test_detect_outputs(nodes, images):
    outs = nodes["detect"].run(_inputs(images))
    assert len(outs) == 3
    for out, hw in zip(outs, SIZES):
        _check_common(out, hw)
        assert out["masks"] == [] and out["areas"] == []


def test_segment_outputs_masks_at_original_size_inside_boxes(nodes, images):
    outs = nodes["segment"].run(_inputs(images))
    for out, (h, w) in zip(outs, SIZES):
        _check_common(out, (h, w))
        assert len(out["masks"]) == out["count"]
        json.dumps(out["masks"])  # stored as JSON
        for rle, (x1, y1, x2, y2) in zip(out["masks"], out["boxes"]):
            assert rle["size"] == [h, w]
            m = rle_to_mask(rle)
            assert m.shape == (h, w) and m.any()
            ys, xs = np.nonzero(m)
            slack = 2  # bilinear resize from inference size may spill a pixel
            assert xs.min() >= x1 * w - slack and xs.max() <= x2 * w + slack
            assert ys.min() >= y1 * h - slack and ys.max() <= y2 * h + slack
        assert out["areas"] == pytest.approx([rle_to_mask(r).sum() / (h * w) for r in out["masks"]], abs=1e-6)


def test_large_area_counts_large_masks_in_the_summary(weights, images):
    """With ``large_area``, the summary says how many of each class have a mask that large."""
    outs = YoloNode("segment", YoloConfig(weights=str(weights["segment"]), task="segment", imgsz=96,
                                          conf=0.3, max_det=8)).run(_inputs(images))
    areas = sorted(a for o in outs for a in o["areas"])
    threshold = areas[len(areas) // 2]  # about half the masks are large
    node = YoloNode("segment", YoloConfig(weights=str(weights["segment"]), task="segment", imgsz=96,
                                          conf=0.3, max_det=8, large_area=threshold))
    outs = node.run(_inputs(images))
    for out in outs:
        large = [lab for lab, a in zip(out["labels"], out["areas"]) if a >= threshold]
        assert out["summary"] == describe_detections(out["labels"], large)
    assert any("large)" in o["summary"] for o in outs)


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_batch_gives_same_outputs_as_singles(nodes, images, task):
    node = nodes[task]
    batched = node.run(_inputs(images))
    singles = [node.run(_inputs([im]))[0] for im in images]
    for b, s in zip(batched, singles):
        assert b["count"] == s["count"] and b["labels"] == s["labels"]
        np.testing.assert_array_equal(b["classes"], s["classes"])
        np.testing.assert_allclose(b["boxes"], s["boxes"], atol=1e-4)
        np.testing.assert_allclose(b["scores"], s["scores"], atol=1e-4)
        np.testing.assert_allclose(b["class_probs"], s["class_probs"], atol=1e-4)
        for mb, ms in zip(b["masks"], s["masks"]):
            assert (rle_to_mask(mb) != rle_to_mask(ms)).mean() < 0.01


def test_input_without_image_fails_alone(nodes, images):
    items = _inputs(images[:2])
    items.insert(1, NodeInput(input_id="noimg", image=None))
    outs = nodes["detect"].run(items)
    assert isinstance(outs[1], ItemError) and "noimg" in str(outs[1])
    assert isinstance(outs[0], dict) and isinstance(outs[2], dict)


# -- loading ----------------------------------------------------------------------------------
def test_model_yaml_builds_a_random_model():
    node = YoloNode("yaml", YoloConfig(weights="yolo11n.yaml", imgsz=64, conf=0.0, max_det=5))
    node.load()
    (out,) = node.run(_inputs([Image.new("RGB", (80, 60), (128, 30, 200))]))
    assert set(out) == KEYS
    assert out["class_probs"].shape == (out["count"], 80)  # the YAML's 80 classes
    assert out["image_size"] == [60, 80]


def test_weights_identity_follows_file_contents(weights, tmp_path):
    path = tmp_path / "teacher.pt"
    shutil.copyfile(weights["detect"], path)
    first = YoloConfig(weights=str(path)).identity()
    assert first == YoloConfig(weights=str(path), conf=0.9).identity()
    assert first["weights"].startswith("sha256:")
    shutil.copyfile(weights["segment"], path)
    assert YoloConfig(weights=str(path)).identity() != first
    assert YoloConfig(weights="yolo11n.yaml").identity() == {"weights": "id:yolo11n.yaml"}


def test_task_mismatch_and_missing_file_are_clear_errors(weights, tmp_path):
    node = YoloNode("seg", YoloConfig(weights=str(weights["detect"]), task="segment"))
    with pytest.raises(ValueError, match="'detect' model.*task: segment"):
        node.load()
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        YoloNode("gone", YoloConfig(weights=str(missing))).load()


# -- through the graph ------------------------------------------------------------------------
def test_graph_runs_a_single_yolo_node(weights, nodes, images, tmp_path):
    from distillery.flows.spec import Spec
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.records import Request, make_input_id

    spec = Spec.model_validate({
        "name": "yolo-only",
        "teachers": {"seg": {"type": "yolo", "weights": str(weights["segment"]), "task": "segment",
                             "imgsz": 96, "conf": 0.3, "max_det": 8, "batch_size": 2}},
    })
    requests = []
    for i, im in enumerate(images):
        path = tmp_path / f"{i}.png"
        im.save(path)
        data = path.read_bytes()
        requests.append(Request(make_input_id(data, "what?"), str(path), data, "what?"))
    graph = TeacherGraph(spec.teachers)
    decoded = [r.image() for r in requests]
    results = graph.run_node("seg", requests, [{} for _ in requests], decoded[:2] + [None])
    assert [r.error is None for r in results] == [True, True, False]
    assert requests[2].input_id in results[2].error
    direct = nodes["segment"].run(_inputs(images[:2]))
    for res, want in zip(results, direct):
        assert res.output["summary"] == want["summary"]
        np.testing.assert_allclose(res.output["boxes"], want["boxes"], atol=1e-4)


def test_predicting_leaves_torch_thread_count_alone(nodes, images):
    """Ultralytics' select_device sets torch to cpu_count - 1 threads; the node undoes it, so the
    student trained later in the same process keeps every core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        nodes["detect"].run(_inputs(images))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _Payload:
    """A pickle that would create a folder when unpickled in full."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_weights_that_would_run_code_are_refused_unrun(tmp_path):
    """Weights come from specs (the Prefect UI edits them): a .pt naming anything but Ultralytics'
    own classes is refused by a weights-only load before any of it runs."""
    import torch

    marker, bad = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, bad)
    with pytest.raises(ValueError, match="yolo node 'x': weights .*evil.pt.* refused by a weights-only load"):
        YoloNode("x", YoloConfig(weights=str(bad))).load()
    assert not marker.exists()
