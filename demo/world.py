"""The synthetic demo world: seeded scenes of coloured shapes, their ground truth, and questions.

``build_world(WorldConfig.preset("full"), out_dir)`` writes, in a few seconds::

    out_dir/world.json                  the config it was built from (reused when it matches)
    out_dir/kb.jsonl                    the knowledge base (demo/kb.py)
    out_dir/{train,val,test}/
        images/00000.png ...            RGB scenes
        labels/00000.txt ...            YOLO polygon labels (next to images/, as Ultralytics expects)
        requests.jsonl                  {"image": "images/x.png", "question": ..., "answer": ...,
                                         "type": ..., "documents": [needed doc ids]}: record's
                                        input, with its labels
        annotations.json                COCO: images, annotations (bbox [x, y, w, h], RLE masks),
                                        categories named as the detector's classes
        scenes.json                     the demo's own richer truth (demo-private): per image
                                        objects (pixel and normalized boxes, masks, classes,
                                        areas), labels and the labels of the large objects
                                        (kb.LARGE_AREA); per request question, answer, type,
                                        needed doc ids
    out_dir/yolo/data.yaml              the Ultralytics segmentation dataset

``requests.jsonl`` and ``annotations.json`` are the formats any user's labelled inputs come in
(``students/evaluation/truth.py``): the demo's evaluation reads its world the way it reads theirs.

Every random draw comes from ``numpy.random.default_rng([seed, split, index])``, so the same config
writes the same bytes, and one image never depends on how many others were drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import yaml
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillery import rle
from distillery.demo import kb

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 3  # 2: large objects and the questions about them; 3: COCO + labelled requests
SCENES_FILE = "scenes.json"  # the demo's own truth (the COCO file and request labels are the users' formats)
RGB = {"red": (215, 35, 35), "green": (35, 165, 60), "blue": (35, 75, 215), "yellow": (235, 205, 30)}


class WorldConfig(BaseModel):
    """How a world is drawn. Meanings and rules are fixed (demo/kb.py); everything here is seeded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = Field(0, description="Generator seed: scenes and questions (not meanings).")
    n_train: int = Field(800, ge=1, description="Training images.")
    n_val: int = Field(100, ge=1, description="Validation images.")
    n_test: int = Field(200, ge=1, description="Test images.")
    image_size: int = Field(256, ge=64, description="Square image side in pixels.")
    min_objects: int = Field(2, ge=0, description="Fewest objects drawn per scene.")
    max_objects: int = Field(7, ge=1, description="Most objects drawn per scene.")
    min_size: float = Field(0.15, gt=0, le=1, description="Smallest object side, fraction of image.")
    max_size: float = Field(0.30, gt=0, le=1, description="Largest object side, fraction of image.")
    overlap_prob: float = Field(0.3, ge=0, le=1, description="Chance that an object may overlap others.")
    min_visible: float = Field(0.6, gt=0, le=1, description="Occluded objects keep at least this fraction.")
    questions_per_image: int = Field(3, ge=1, le=20, description="Requests (questions) per image.")

    @model_validator(mode="after")
    def _ranges(self) -> WorldConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects {self.min_objects} > max_objects {self.max_objects}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} > max_size {self.max_size}")
        return self

    @classmethod
    def preset(cls, name: Literal["tiny", "full"], **overrides) -> WorldConfig:
        """``full``: the world the shipped teachers were trained on; ``tiny``: a CI-sized world."""
        presets = {"full": {}, "tiny": {"n_train": 24, "n_val": 8, "n_test": 8}}
        if name not in presets:
            raise ValueError(f"unknown world preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


# ---------------------------------------------------------------------------------------------
# Drawing one scene
# ---------------------------------------------------------------------------------------------

@dataclass
class SceneObject:
    class_id: int
    mask: np.ndarray  # (H, W) bool, the visible part
    colour: tuple[int, int, int]

    @property
    def label(self) -> str:
        return kb.CLASSES[self.class_id]

    @cached_property
    def box(self) -> list[int]:
        """Tight xyxy box of the visible mask, in pixels (x2, y2 exclusive)."""
        ys, xs = np.nonzero(self.mask)
        return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A desaturated two-colour gradient with low-frequency texture: (H, W, 3) float32."""
    grey = rng.uniform(80, 200, size=2)[:, None] + rng.uniform(-12, 12, size=(2, 3))  # (2, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = ((np.cos(angle) * xx + np.sin(angle) * yy) + 1.5) / 3  # (H, W) in [0, 1]
    img = grey[0] * (1 - t[..., None]) + grey[1] * t[..., None]
    coarse = rng.normal(0, 10, size=(8, 8)).astype(np.float32)
    texture = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return (img + texture[..., None]).astype(np.float32)


def _shape_mask(rng: np.random.Generator, shape: str, side: float, cx: float, cy: float,
                size: int) -> np.ndarray:
    """Filled shape of about ``side`` pixels centred at (cx, cy): (H, W) bool."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    r = side / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        n, rot = (4, rng.uniform(-0.3, 0.3)) if shape == "square" else (3, rng.uniform(-0.4, 0.4))
        radius = r * (np.sqrt(2) if n == 4 else 1.15)
        start = np.pi / 4 if n == 4 else -np.pi / 2
        ang = start + rot + np.arange(n) * 2 * np.pi / n
        pts = [(cx + radius * np.cos(a), cy + radius * np.sin(a) + (r * 0.2 if n == 3 else 0)) for a in ang]
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def _place(rng: np.random.Generator, cfg: WorldConfig, ids: np.ndarray, areas: list[int],
           class_id: int) -> np.ndarray | None:
    """Try positions until one keeps every object visible enough; the new object's mask or None."""
    size = cfg.image_size
    shape = kb.CLASSES[class_id].split()[1]
    may_overlap = rng.random() < cfg.overlap_prob
    for _ in range(30):
        side = rng.uniform(cfg.min_size, cfg.max_size) * size
        cx, cy = rng.uniform(side * 0.6, size - side * 0.6, size=2)
        m = _shape_mask(rng, shape, side, cx, cy, size)
        covered = ids[m]
        covered = covered[covered >= 0]
        if covered.size and not may_overlap:
            continue
        # objects already drawn must keep min_visible of their full area once this one is on top
        hidden = np.bincount(covered, minlength=len(areas))
        visible = np.array([(ids == k).sum() for k in range(len(areas))]) - hidden
        if all(visible[k] >= cfg.min_visible * areas[k] for k in range(len(areas))):
            return m
    return None


def draw_scene(cfg: WorldConfig, split: str, index: int) -> tuple[np.ndarray, list[SceneObject]]:
    """One seeded scene: the (H, W, 3) uint8 image and its objects (visible masks)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    size = cfg.image_size
    img = _background(rng, size)
    ids = np.full((size, size), -1, dtype=np.int32)  # which object owns each pixel
    classes: list[int] = []
    areas: list[int] = []
    colours: list[tuple[int, int, int]] = []
    for _ in range(rng.integers(cfg.min_objects, cfg.max_objects + 1)):
        class_id = int(rng.integers(len(kb.CLASSES)))
        m = _place(rng, cfg, ids, areas, class_id)
        if m is None:
            continue
        base = np.array(RGB[kb.CLASSES[class_id].split()[0]])
        colour = tuple(int(v) for v in np.clip(base + rng.integers(-20, 21, size=3), 0, 255))
        ids[m] = len(classes)
        img[m] = colour
        classes.append(class_id)
        areas.append(int(m.sum()))
        colours.append(colour)
    img += rng.normal(0, 5, size=img.shape).astype(np.float32)
    objects = [SceneObject(c, ids == k, colours[k]) for k, c in enumerate(classes)]
    return np.clip(img, 0, 255).astype(np.uint8), objects


# ---------------------------------------------------------------------------------------------
# Ground truth encodings
# ---------------------------------------------------------------------------------------------

def yolo_polygon(mask: np.ndarray) -> list[float]:
    """Largest outer contour of a mask as normalized x y pairs (YOLO segmentation label)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    pts = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)  # (N, 2)
    h, w = mask.shape
    pts /= (w, h)
    return [round(float(v), 5) for v in pts.reshape(-1)]


def image_record(file: str, objects: list[SceneObject], size: int) -> dict:
    return {
        "file": file, "width": size, "height": size,
        "labels": [o.label for o in objects],
        # objects whose visible mask covers at least kb.LARGE_AREA of the image
        "large": [o.label for o in objects if o.mask.sum() >= kb.LARGE_AREA * size * size],
        "objects": [{"class_id": o.class_id, "label": o.label, "box": o.box,
                     "box_norm": [round(v / size, 6) for v in o.box],
                     "area": int(o.mask.sum()), "mask": rle.encode(o.mask)} for o in objects],
    }


# ---------------------------------------------------------------------------------------------
# Writing a world
# ---------------------------------------------------------------------------------------------

@dataclass
class World:
    """A built world on disk: its config, paths, and loaders for its ground truth."""

    config: WorldConfig
    root: Path
    kb_path: Path = field(init=False)
    data_yaml: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.kb_path = self.root / "kb.jsonl"
        self.data_yaml = self.root / "yolo" / "data.yaml"

    def split_dir(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return self.root / split

    def requests_path(self, split: str) -> Path:
        return self.split_dir(split) / "requests.jsonl"

    def annotations(self, split: str) -> dict:
        """The demo's own truth of a split (``scenes.json``): ``{"images": [...], "requests": [...]}``."""
        return json.loads((self.split_dir(split) / SCENES_FILE).read_text())

    def documents(self) -> list[dict]:
        return [json.loads(line) for line in self.kb_path.read_text().splitlines() if line]


def coco_annotations(images: list[dict]) -> dict:
    """A split's objects as a COCO detection / segmentation file (categories named as the
    detector's classes; ids start at 1, matching is by name)."""
    coco_images, annotations = [], []
    for image_id, im in enumerate(images, start=1):
        coco_images.append({"id": image_id, "file_name": im["file"], "width": im["width"], "height": im["height"]})
        for o in im["objects"]:
            x1, y1, x2, y2 = o["box"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": o["class_id"] + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": o["area"], "segmentation": o["mask"],
                                "iscrowd": 0})
    return {"info": {"description": "distillery demo world"}, "images": coco_images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(kb.CLASSES)]}


def request_line(request: dict) -> dict:
    """A request as ``requests.jsonl`` holds it: the input and its labels."""
    return {"image": request["image"], "question": request["question"], "answer": request["answer"],
            "type": request["type"], "documents": request["needed_docs"]}


def _write_images(cfg: WorldConfig, d: Path, split: str, indices: range) -> tuple[list, list]:
    """Draw and write scenes ``indices`` of a split; their image records and requests."""
    images, requests = [], []
    for i in indices:
        img, objects = draw_scene(cfg, split, i)
        name = f"{i:05d}"
        cv2.imwrite(str(d / "images" / f"{name}.png"), img[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
        lines = [" ".join([str(o.class_id), *map(str, yolo_polygon(o.mask))]) for o in objects]
        (d / "labels" / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
        rec = image_record(f"images/{name}.png", objects, cfg.image_size)
        images.append(rec)
        rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i, 1])
        for q in kb.sample_questions(rng, cfg.questions_per_image):
            requests.append({"image": rec["file"], "question": q.text, "answer": kb.answer(q, rec["labels"], rec["large"]),
                             "type": q.type, "needed_docs": q.needed_docs})
    return images, requests


def _write_split(cfg: WorldConfig, root: Path, split: str, workers: int = 1) -> None:
    """One split's images, labels, requests and annotations; ``workers`` processes draw disjoint
    ranges of its scenes (each scene is seeded by its index, so the bytes do not depend on them)."""
    d = root / split
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    n = cfg.split_size(split)
    chunks = [range(i, min(i + 50, n)) for i in range(0, n, 50)]
    if workers > 1 and len(chunks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold threads (Prefect's server, torch) a fork would copy mid-lock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_write_images, *zip(*[(cfg, d, split, c) for c in chunks])))
    else:
        parts = [_write_images(cfg, d, split, c) for c in chunks]
    images = [im for part in parts for im in part[0]]
    requests = [r for part in parts for r in part[1]]
    (d / "requests.jsonl").write_text("".join(json.dumps(request_line(r)) + "\n" for r in requests))
    (d / "annotations.json").write_text(json.dumps(coco_annotations(images)))
    (d / SCENES_FILE).write_text(json.dumps({"images": images, "requests": requests}))


def _write_data_yaml(root: Path) -> None:
    (root / "yolo").mkdir(exist_ok=True)
    data = {"path": str(root.resolve()), "train": "train/images", "val": "val/images",
            "test": "test/images", "names": dict(enumerate(kb.CLASSES))}
    (root / "yolo" / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _stamp(cfg: WorldConfig) -> dict:
    """What a built world is: its config, and the knowledge and questions the code defines."""
    text = json.dumps([[d.text for d in kb.knowledge_base()], [q.text for q in kb.question_bank()]])
    return {"format": FORMAT_VERSION, "config": cfg.model_dump(),
            "kb": hashlib.sha256(text.encode()).hexdigest()[:16]}


def world_digest(cfg: WorldConfig, n: int = 4) -> str:
    """Hash of the first ``n`` scenes of every split (pixels and classes): a cheap check that this
    code still draws the world that a set of teachers was trained on."""
    h = hashlib.sha256()
    for split in SPLITS:
        for i in range(min(n, cfg.split_size(split))):
            img, objects = draw_scene(cfg, split, i)
            h.update(img.tobytes())
            h.update(bytes(o.class_id for o in objects))
    return h.hexdigest()[:16]


def build_world(cfg: WorldConfig, out_dir: str | Path) -> World:
    """Draw and write the world for ``cfg`` under ``out_dir`` (reused if already built there).

    The world is written into a temporary sibling folder and moved into place at the end, so an
    interrupted build never leaves a half world that a later call would reuse."""
    out = Path(out_dir)
    stamp_file = out / "world.json"
    if stamp_file.exists():
        if json.loads(stamp_file.read_text()) == _stamp(cfg):
            _write_data_yaml(out)  # its absolute path follows the folder if it was moved
            return World(cfg, out)
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty and holds no world.json: refusing to overwrite it")
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kb.write_kb(tmp / "kb.jsonl")
    workers = min(2, os.cpu_count() or 1)  # drawing is single-threaded numpy and PIL work
    for split in SPLITS:
        _write_split(cfg, tmp, split, workers)
    (tmp / "world.json").write_text(json.dumps(_stamp(cfg), indent=1))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    _write_data_yaml(out)  # holds an absolute path: written once the world sits at its place
    return World(cfg, out)
