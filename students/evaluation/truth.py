"""Ground truth from a user's own labelled inputs, aligned to the teacher records of those inputs.

An inputs folder may carry labels in the formats the field uses; any may be missing, and a node
is compared with the truth only where its labels are:

* ``requests.jsonl`` lines: optional ``answer`` (the final llm node's; a number is read as text),
  ``type`` (groups answers per question type), ``documents`` (each rag node's relevant ids);
* ``annotations.json`` beside it: COCO ``images`` (file_name relative to the folder, width,
  height), ``annotations`` (bbox [x, y, w, h] in pixels, optional polygons or RLE, iscrowd) and
  ``categories``, matched BY NAME (case and spacing ignored) to each yolo node's class names.

An object of a category the detector does not know is left out, as are ``iscrowd`` regions
(both counted in ``Truth.summary``); an image in the COCO file without annotations has no
objects, one not in it is unlabelled; masks are compared only when every object has one.

    labels = read_labels("held-out/")          # ValueError naming the file and line / entry
    truth = align(labels, spec, records)       # per record {node: teacher-shaped truth} or None
    evaluate_model(student, spec, records, truth.outputs, types=truth.types)

A record matches its request line on the image path and question, else on its input id (the
hash of the image bytes and question: traces recorded from a copy of the folder still match).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO

from distillery.students.evaluation.coco import read_coco
from distillery.students.model.heads import head_class
from distillery.teachers.inputs import IMAGE_SUFFIXES, REQUESTS_FILE
from distillery.teachers.nodes.yolo import checkpoint_class_names
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
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
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
    _bare: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_path = {(r.image, r.question): r for r in self.requests}
        if self.coco is None:
            return
        self._images = {path_key(self.root / im["file_name"]): i for i, im in self.coco.imgs.items()}
        bare = Counter(im["file_name"] for im in self.coco.imgs.values() if "/" not in im["file_name"])
        self._bare = {im["file_name"]: i for i, im in self.coco.imgs.items() if bare[im["file_name"]] == 1}

    def image_id(self, image: str) -> int | None:
        """The COCO image of an image (its path_key): by file_name relative to the folder, else
        by a bare file_name (no folder part) that names one image of the file."""
        found = self._images.get(image)
        return found if found is not None else self._bare.get(Path(image).name)

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
    """Read and check the labels of an inputs folder (or of a requests ``.jsonl`` file, with the
    annotations beside it); none at all is fine. Raises ValueError naming the file and line /
    entry of a bad label, before any model loads."""
    path = Path(inputs)
    requests_file = path if path.is_file() and path.suffix == ".jsonl" else path / REQUESTS_FILE
    root = requests_file.parent
    if not root.is_dir():
        raise ValueError(f"inputs {str(path)!r}: not a folder")
    if requests_file.is_file():
        requests = read_request_labels(requests_file)
    else:
        requests = [RequestLabels(str(p), path_key(p), None) for p in sorted(root.iterdir())
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    coco_file = root / ANNOTATIONS_FILE
    if not coco_file.is_file():
        return Labels(root, requests)
    coco, has_masks = read_coco(coco_file)
    return Labels(root, requests, coco, coco_file, has_masks)


# ---------------------------------------------------------------------------------------------
# Aligning labels to records: teacher-shaped truth
# ---------------------------------------------------------------------------------------------

@dataclass
class Truth:
    """Per record (aligned with the records): its truth ``{node: output}`` or None, and its
    question type or None; and per yolo node the objects left out of the truth, by category
    (``(crowd)`` for iscrowd regions)."""

    outputs: list[dict | None]
    types: list[str | None]
    left_out: dict[str, Counter] = field(default_factory=dict)
    masks: bool = False

    def summary(self) -> dict[str, Any]:
        """How much truth there is, per node, and what was left out of it (JSON)."""
        nodes = Counter(n for o in self.outputs if o for n in o)
        return {"records": len(self.outputs), "labelled": sum(o is not None for o in self.outputs),
                "nodes": dict(nodes), "types": sum(t is not None for t in self.types), "masks": self.masks,
                "left_out": {n: dict(c) for n, c in self.left_out.items() if c}}


def detector_classes(graph: Any, records: Sequence[Any], class_names: Mapping[str, Sequence[str]] | None = None,
                     wanted: Sequence[str] = ()) -> dict[str, dict[str, int]]:
    """Per yolo node: class name (``class_key``) -> class id, from ``class_names`` (node -> names
    by id, e.g. a student schema's), the graph's own (a schema's ``class_names``) and the pairs
    of class ids and labels in the teacher's outputs; when a ``wanted`` name is still unknown
    and the graph is a spec, from the node's weights (``teachers.nodes.yolo.checkpoint_class_names``)."""
    out: dict[str, dict[str, int]] = {}
    schema = getattr(graph, "nodes", None) or {}
    for node, kind in node_types(graph).items():
        if kind != "yolo":
            continue
        names: dict[str, int] = {}
        for source in ((class_names or {}).get(node), schema.get(node, {}).get("class_names")):
            for i, name in enumerate(source or []):
                names.setdefault(class_key(name), i)
        for rec in records:
            o = rec.outputs.get(node) or {}
            for c, label in zip(np.asarray(o.get("classes", []), dtype=np.int64).tolist(), o.get("labels") or []):
                names[class_key(label)] = int(c)
        if hasattr(graph, "teachers") and any(class_key(w) not in names for w in wanted):
            for i, name in enumerate(checkpoint_class_names(graph.teachers[node].weights)):
                names.setdefault(class_key(name), i)
        out[node] = names
    return out


def _mask(coco: COCO, ann: dict) -> dict:
    """An annotation's mask (polygons, RLE or uncompressed RLE) as a stored RLE at its image's size."""
    found = coco.annToRLE(ann)  # pycocotools: polygons merged, uncompressed RLE compressed
    counts = found["counts"]
    return {"size": [int(s) for s in found["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _detection(labels: Labels, image_id: int, classes: Mapping[str, int], left_out: Counter) -> dict[str, Any]:
    """One image's objects of known classes: normalized xyxy boxes, class ids, labels, masks."""
    coco = labels.coco
    im = coco.imgs[image_id]
    w, h = im["width"], im["height"]
    out: dict[str, Any] = {"boxes": [], "classes": [], "labels": []}
    masks = []
    for ann in coco.imgToAnns.get(image_id, []):
        name = coco.cats[ann["category_id"]]["name"]
        if ann.get("iscrowd") or class_key(name) not in classes:
            left_out["(crowd)" if ann.get("iscrowd") else name] += 1
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
    # by what the node's head outputs: boxes (yolo), document ids (rag), or generated text (llm, openai)
    yolo = [n for n, k in kinds.items() if head_class(k).OUTPUT_KEY == "boxes"]
    rag = [n for n, k in kinds.items() if head_class(k).OUTPUT_KEY == "ids"]
    final = [n for n, k in kinds.items() if head_class(k).generative][-1:]
    wanted = [c["name"] for c in labels.coco.cats.values()] if labels.coco is not None else []
    classes = detector_classes(graph, records, class_names, wanted) if labels.coco is not None else {}
    truth = Truth([], [], {node: Counter() for node in yolo}, masks=labels.has_masks)
    for rec in records:
        req = labels.match(rec)
        out: dict[str, dict] = {}
        image_id = labels.image_id(req.image if req else path_key(rec.image_path)) if labels.coco else None
        if image_id is not None:
            for node in yolo:
                _check_size(labels, image_id, rec, node)
                out[node] = _detection(labels, image_id, classes[node], truth.left_out[node])
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
