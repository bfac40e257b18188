"""Ground truth from a user's own labelled inputs, aligned to the teacher records of those inputs.

An inputs folder (what ``distillery record`` reads) may carry labels in the formats the field
uses. Any of them may be missing: a node is compared with the truth only where its labels are.

* ``requests.jsonl``: optional fields on a request line::

      {"image": "images/a.png", "question": "How many pumps?",
       "answer": "2",                  # the final llm node's truth (a number is read as text)
       "type": "count",                # groups the answers per question type
       "documents": ["doc-7", 12]}     # each rag node's truth: the relevant document ids

* ``annotations.json``: COCO detection / segmentation: ``images`` (id, file_name relative to
  the folder, width, height), ``annotations`` (id, image_id, category_id, bbox [x, y, w, h] in
  pixels, optional segmentation as polygons or RLE, iscrowd), ``categories`` (id, name).

Categories are matched BY NAME (case and spacing ignored) to each yolo node's class names; an
object of a category the detector does not know is left out (and counted in ``Truth.summary``),
and so are ``iscrowd`` regions. An image in the COCO file with no annotation is labelled "no
objects"; an image not in it is unlabelled. Masks are compared only when every object has one.

    labels = read_labels("held-out/")          # ValueError naming the file and line / entry
    truth = align(labels, spec, records)       # per record {node: teacher-shaped truth} or None
    evaluate_model(student, spec, records, truth.outputs, types=truth.types)

A record is matched to its request line on the image path (relative to the inputs folder) and
the question, else on its input id (the hash of the image bytes and the question), so traces
recorded from a copy of the folder elsewhere still match.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from distillery import rle
from distillery.teachers.inputs import IMAGE_SUFFIXES, REQUESTS_FILE
from distillery.teachers.records import make_input_id

ANNOTATIONS_FILE = "annotations.json"


def path_key(path: str | Path) -> str:
    """An image path as labels and records are matched on: absolute and normalized."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def class_key(name: Any) -> str:
    """A class / category name as it is matched: lower case, single spaces."""
    return " ".join(str(name).lower().split())


def node_types(graph: Any) -> dict[str, str]:
    """Node name -> type (``yolo`` | ``rag`` | ``llm``) in topological order, from a spec (its
    teachers) or a student's schema (its nodes, saved in that order)."""
    if hasattr(graph, "teachers"):
        return {n: graph.teachers[n].type for n in graph.topological_order()}
    return {n: str(node["type"]) for n, node in graph.nodes.items()}


# ---------------------------------------------------------------------------------------------
# Reading and checking the label files
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestLabels:
    """One request of the inputs folder and its labels (None: not labelled)."""

    where: str  # "requests.jsonl line 3" (or the image file of an image-only folder)
    image: str  # path_key of the image
    question: str | None  # None: an image-only folder (asked the spec's default question)
    answer: str | None = None
    type: str | None = None
    documents: tuple[str, ...] | None = None


def _label_fields(entry: dict, where: str) -> dict[str, Any]:
    """The answer, type and documents of a request line, checked (None where absent or null)."""
    answer, qtype, docs = entry.get("answer"), entry.get("type"), entry.get("documents")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise ValueError(f"{where}: 'answer' must be a string (or a number), got {type(answer).__name__}")
    if qtype is not None and (not isinstance(qtype, str) or not qtype.strip()):
        raise ValueError(f"{where}: 'type' must be a non-empty string, got {qtype!r}")
    if docs is not None:
        if not isinstance(docs, list) or any(isinstance(d, bool) or not isinstance(d, (str, int)) or str(d) == ""
                                             for d in docs):
            raise ValueError(f"{where}: 'documents' must be a list of document ids (strings or integers), "
                             f"got {docs!r}")
        docs = tuple(str(d) for d in docs)
    return {"answer": None if answer is None else str(answer), "type": qtype, "documents": docs}


def read_request_labels(path: Path) -> list[RequestLabels]:
    """The requests of a requests.jsonl and their labels. A line that is no request at all is
    left to the record step (which quarantines it); a label of the wrong type is a ValueError."""
    out = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
        try:
            entry = json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("question"), str):
            continue
        where = f"{path} line {number}"
        out.append(RequestLabels(where, path_key(path.parent / entry["image"]), entry["question"],
                                 **_label_fields(entry, where)))
    return out


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_images(images: Any, where: str) -> dict[int, dict]:
    if not isinstance(images, list):
        raise ValueError(f"{where}: 'images' must be a list")
    out, names = {}, set()
    for i, im in enumerate(images):
        at = f"{where} images[{i}]"
        if not isinstance(im, dict) or not _int(im.get("id")):
            raise ValueError(f"{at}: expected an object with an integer 'id'")
        at += f" (id {im['id']})"
        if not isinstance(im.get("file_name"), str) or not im["file_name"].strip():
            raise ValueError(f"{at}: 'file_name' must be a non-empty path string")
        if not all(_int(im.get(k)) and im[k] > 0 for k in ("width", "height")):
            raise ValueError(f"{at}: 'width' and 'height' must be positive integers (pixels)")
        if im["id"] in out or im["file_name"] in names:
            raise ValueError(f"{at}: duplicate image id or file_name {im['file_name']!r}")
        out[im["id"]] = im
        names.add(im["file_name"])
    return out


def _check_categories(categories: Any, where: str) -> dict[int, dict]:
    if not isinstance(categories, list):
        raise ValueError(f"{where}: 'categories' must be a list")
    out = {}
    for i, cat in enumerate(categories):
        at = f"{where} categories[{i}]"
        if not isinstance(cat, dict) or not _int(cat.get("id")) or not isinstance(cat.get("name"), str) \
                or not cat["name"].strip():
            raise ValueError(f"{at}: expected an object with an integer 'id' and a non-empty 'name'")
        if cat["id"] in out:
            raise ValueError(f"{at}: duplicate category id {cat['id']}")
        out[cat["id"]] = cat
    return out


def _check_segmentation(seg: Any, image: dict, at: str) -> None:
    """Polygons ``[[x1, y1, x2, y2, x3, y3, ...], ...]`` or an RLE at the image's size."""
    h, w = image["height"], image["width"]
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(map(_number, poly)):
                raise ValueError(f"{at}: a segmentation polygon is a list of at least 3 x, y pairs (pixels)")
        return
    if not isinstance(seg, dict) or seg.get("size") != [h, w]:
        raise ValueError(f"{at}: 'segmentation' must be polygons or an RLE {{'size': [{h}, {w}], 'counts': ...}} "
                         "at the image's size")
    counts = seg.get("counts")
    if isinstance(counts, list):
        if not all(_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise ValueError(f"{at}: uncompressed RLE counts must be non-negative integers summing to {h * w}")
    elif not isinstance(counts, str) or not counts:
        raise ValueError(f"{at}: RLE 'counts' must be a string (compressed) or a list of integers")


def _check_annotation(ann: Any, i: int, images: dict, categories: dict, where: str) -> bool:
    """Check one annotation; whether it carries a mask."""
    at = f"{where} annotations[{i}]"
    if not isinstance(ann, dict) or not _int(ann.get("id")):
        raise ValueError(f"{at}: expected an object with an integer 'id'")
    at += f" (id {ann['id']})"
    if ann.get("image_id") not in images or isinstance(ann.get("image_id"), bool):
        raise ValueError(f"{at}: image_id {ann.get('image_id')!r} is not an image of the file")
    if ann.get("category_id") not in categories or isinstance(ann.get("category_id"), bool):
        raise ValueError(f"{at}: category_id {ann.get('category_id')!r} is not a category of the file")
    box = ann.get("bbox")
    if not isinstance(box, list) or len(box) != 4 or not all(map(_number, box)) or box[2] < 0 or box[3] < 0:
        raise ValueError(f"{at}: 'bbox' must be [x, y, width, height] in pixels (width, height >= 0)")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise ValueError(f"{at}: 'iscrowd' must be 0 or 1")
    seg = ann.get("segmentation")
    if seg is None or seg == []:
        return False
    _check_segmentation(seg, images[ann["image_id"]], at)
    return True


def read_coco(path: Path) -> tuple[COCO, bool]:
    """A COCO annotations file, checked entry by entry, indexed by pycocotools; and whether
    every (non-crowd) object has a mask."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path}: expected a COCO object with 'images', 'annotations' and 'categories'")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    images = _check_images(data["images"], str(path))
    categories = _check_categories(data["categories"], str(path))
    if not isinstance(data["annotations"], list):
        raise ValueError(f"{path}: 'annotations' must be a list")
    ids: set[int] = set()
    with_mask = []
    for i, ann in enumerate(data["annotations"]):
        has_mask = _check_annotation(ann, i, images, categories, str(path))
        if ann["id"] in ids:
            raise ValueError(f"{path} annotations[{i}]: duplicate annotation id {ann['id']}")
        ids.add(ann["id"])
        if not ann.get("iscrowd"):
            with_mask.append(has_mask)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco, bool(with_mask) and all(with_mask)


# ---------------------------------------------------------------------------------------------
# Labels of an inputs folder
# ---------------------------------------------------------------------------------------------

@dataclass
class Labels:
    """The labels of one inputs folder (``read_labels``)."""

    root: Path
    requests: list[RequestLabels]
    coco: COCO | None = None
    coco_path: Path | None = None
    has_masks: bool = False
    _by_path: dict = field(default_factory=dict, repr=False)
    _by_id: dict | None = field(default=None, repr=False)
    _images: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_path = {(r.image, r.question): r for r in self.requests}
        if self.coco is None:
            return
        self._images = {path_key(self.root / im["file_name"]): i for i, im in self.coco.imgs.items()}
        bare = Counter(Path(im["file_name"]).name for im in self.coco.imgs.values())
        self._images |= {("name", im["file_name"]): i for i, im in self.coco.imgs.items()
                         if "/" not in im["file_name"] and bare[im["file_name"]] == 1}

    def image_id(self, image: str) -> int | None:
        """The COCO image of an image (its path_key): by file_name relative to the folder, or by
        a bare file_name that names one image of the file."""
        found = self._images.get(image)
        return found if found is not None else self._images.get(("name", Path(image).name))

    def match(self, record: Any) -> RequestLabels | None:
        """The request a record is of: same image path and question, else same input id."""
        key = path_key(record.image_path)
        hit = self._by_path.get((key, record.question)) or self._by_path.get((key, None))
        if hit is None:
            if self._by_id is None:
                self._by_id = self._input_ids()
            hit = self._by_id.get(record.input_id)
        return hit

    def _input_ids(self) -> dict[str, RequestLabels]:
        out = {}
        for r in self.requests:
            if r.question is not None and os.path.isfile(r.image):
                out[make_input_id(Path(r.image).read_bytes(), r.question)] = r
        return out

    def select(self, records: Sequence[Any]) -> tuple[list[Any], list[RequestLabels]]:
        """(the records of this folder's requests, the requests no record is of)."""
        mine, seen = [], set()
        for rec in records:
            hit = self.match(rec)
            if hit is not None:
                mine.append(rec)
                seen.add((hit.image, hit.question))
        return mine, [r for r in self.requests if (r.image, r.question) not in seen]


def read_labels(inputs: str | Path) -> Labels:
    """Read and check the labels of an inputs folder (none is fine). Raises ValueError naming
    the file and line / entry for a bad label, before any model loads."""
    root = Path(inputs)
    if not root.is_dir():
        raise ValueError(f"inputs {str(root)!r}: not a folder")
    if (root / REQUESTS_FILE).is_file():
        requests = read_request_labels(root / REQUESTS_FILE)
    else:
        requests = [RequestLabels(p.name, path_key(p), None) for p in sorted(root.iterdir())
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    path = root / ANNOTATIONS_FILE
    if not path.is_file():
        return Labels(root, requests)
    coco, has_masks = read_coco(path)
    return Labels(root, requests, coco, path, has_masks)


# ---------------------------------------------------------------------------------------------
# Aligning labels to records: teacher-shaped truth
# ---------------------------------------------------------------------------------------------

@dataclass
class Truth:
    """Per record (aligned with the records): its truth ``{node: output}`` or None, and its
    question type or None; plus what was left out of the truth."""

    outputs: list[dict | None]
    types: list[str | None]
    unknown_categories: Counter = field(default_factory=Counter)
    crowd: int = 0
    masks: bool = False

    def summary(self) -> dict[str, Any]:
        """How much truth there is, per node, and what was left out of it (JSON)."""
        nodes = Counter(n for o in self.outputs if o for n in o)
        return {"records": len(self.outputs), "labelled": sum(o is not None for o in self.outputs),
                "nodes": dict(nodes), "types": sum(t is not None for t in self.types),
                "masks": self.masks, "crowd_left_out": self.crowd,
                "unknown_categories": dict(self.unknown_categories)}


def detector_classes(graph: Any, records: Sequence[Any],
                     class_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, int]]:
    """Per yolo node: class name (``class_key``) -> class id, from ``class_names`` (node -> names
    by id, e.g. a student schema's), the graph's own (a schema's ``class_names``) and the pairs
    of class ids and labels in the teacher's outputs."""
    out: dict[str, dict[str, int]] = {}
    schema = getattr(graph, "nodes", None)
    for node, kind in node_types(graph).items():
        if kind != "yolo":
            continue
        names: dict[str, int] = {}
        known = list((class_names or {}).get(node) or []) + list((schema or {}).get(node, {}).get("class_names") or [])
        for i, name in enumerate(known[:len((class_names or {}).get(node) or known)]):
            names.setdefault(class_key(name), i)
        for rec in records:
            o = rec.outputs.get(node) or {}
            for c, label in zip(np.asarray(o.get("classes", []), dtype=np.int64).tolist(), o.get("labels") or []):
                names[class_key(label)] = int(c)
        out[node] = names
    return out


def _mask(coco: COCO, ann: dict) -> dict:
    """An annotation's mask (polygons or RLE) as a stored RLE at its image's size."""
    seg, im = ann["segmentation"], coco.imgs[ann["image_id"]]
    if isinstance(seg, list):
        return rle.from_polygons(seg, im["height"], im["width"])
    if isinstance(seg["counts"], list):
        seg = mask_utils.frPyObjects(seg, im["height"], im["width"])  # uncompressed -> compressed
    counts = seg["counts"]
    return {"size": [int(s) for s in seg["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes)
            else counts}


def _detection(labels: Labels, image_id: int, classes: Mapping[str, int], truth: Truth) -> dict[str, Any]:
    """One image's objects of known classes: normalized xyxy boxes, class ids, labels, masks."""
    coco = labels.coco
    im = coco.imgs[image_id]
    w, h = im["width"], im["height"]
    out: dict[str, Any] = {"boxes": [], "classes": [], "labels": []}
    masks = []
    for ann in coco.imgToAnns.get(image_id, []):
        name = coco.cats[ann["category_id"]]["name"]
        if ann.get("iscrowd"):
            truth.crowd += 1
            continue
        if class_key(name) not in classes:
            truth.unknown_categories[name] += 1
            continue
        x, y, bw, bh = ann["bbox"]
        out["boxes"].append([x / w, y / h, (x + bw) / w, (y + bh) / h])
        out["classes"].append(classes[class_key(name)])
        out["labels"].append(name)
        if labels.has_masks:
            masks.append(_mask(coco, ann))
    if labels.has_masks:
        out["masks"] = masks
    return out


def _check_size(labels: Labels, image_id: int, record: Any, node: str) -> None:
    """The labels' image size must be the recorded image's (masks and boxes are at that size)."""
    im = labels.coco.imgs[image_id]
    size = (record.outputs.get(node) or {}).get("image_size")
    if size is not None and [int(s) for s in size] != [im["height"], im["width"]]:
        raise ValueError(f"{labels.coco_path}: image {im['file_name']!r} (id {im['id']}) is {im['width']}x"
                         f"{im['height']} in the labels, but {record.image_path} is {size[1]}x{size[0]}")


def align(labels: Labels, graph: Any, records: Sequence[Any],
          class_names: Mapping[str, Sequence[str]] | None = None) -> Truth:
    """Per record, the teacher-shaped truth of the nodes that have labels: for each yolo node
    ``boxes`` (normalized xyxy), ``classes`` (the detector's ids, matched by name), ``labels``
    and ``masks`` (RLE); for each rag node ``{"ids": relevant documents}``; for the final llm
    node ``{"answer": ...}``. ``graph``: a spec or a student schema (see ``node_types``)."""
    kinds = node_types(graph)
    yolo = [n for n, k in kinds.items() if k == "yolo"]
    rag = [n for n, k in kinds.items() if k == "rag"]
    final = [n for n, k in kinds.items() if k == "llm"][-1:]
    classes = detector_classes(graph, records, class_names) if labels.coco is not None else {}
    truth = Truth([], [], masks=labels.has_masks)
    for rec in records:
        req = labels.match(rec)
        out: dict[str, dict] = {}
        image_id = labels.image_id(req.image if req else path_key(rec.image_path)) if labels.coco else None
        if image_id is not None:
            for node in yolo:
                _check_size(labels, image_id, rec, node)
                out[node] = _detection(labels, image_id, classes[node], truth)
        if req is not None and req.documents is not None:
            out |= {node: {"ids": list(req.documents)} for node in rag}
        if req is not None and req.answer is not None:
            out |= {node: {"answer": req.answer} for node in final}
        truth.outputs.append(out or None)
        truth.types.append(req.type if req else None)
    return truth


def ground_truth(inputs: str | Path, graph: Any, records: Sequence[Any],
                 class_names: Mapping[str, Sequence[str]] | None = None) -> Truth:
    """``align(read_labels(inputs), graph, records, class_names)``."""
    return align(read_labels(inputs), graph, records, class_names)
