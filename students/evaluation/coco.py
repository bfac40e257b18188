"""A COCO detection / segmentation file, read with pycocotools after checks that name the file
and the entry of anything malformed (``ValueError``), before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

from pycocotools.coco import COCO


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entries(data: dict, key: str, where: str) -> Iterator[tuple[str, dict]]:
    """(where, entry) for each entry of a COCO list: objects with a unique integer id."""
    if not isinstance(data.get(key, []), list):
        raise ValueError(f"{where}: '{key}' must be a list")
    seen: set[int] = set()
    for i, entry in enumerate(data.get(key, [])):
        if not isinstance(entry, dict) or not _int(entry.get("id")) or entry["id"] in seen:
            raise ValueError(f"{where} {key}[{i}]: expected an object with an integer 'id' of its own")
        seen.add(entry["id"])
        yield f"{where} {key}[{i}] (id {entry['id']})", entry


def _check_segmentation(seg: Any, image: dict, at: str) -> None:
    """Polygons ``[[x1, y1, x2, y2, x3, y3, ...], ...]`` or an RLE at the image's size."""
    h, w = image["height"], image["width"]
    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_number, p)) for p in seg):
            raise ValueError(f"{at}: a segmentation polygon is a list of at least 3 x, y pairs (pixels)")
        return
    if not isinstance(seg, dict) or seg.get("size") != [h, w]:
        raise ValueError(f"{at}: 'segmentation' must be polygons or an RLE {{'size': [{h}, {w}], 'counts': ...}} "
                         "at the image's size")
    counts = seg.get("counts")
    if isinstance(counts, list) and (not all(_int(c) and c >= 0 for c in counts) or sum(counts) != h * w):
        raise ValueError(f"{at}: uncompressed RLE counts must be non-negative integers summing to {h * w}")
    if not isinstance(counts, list) and (not isinstance(counts, str) or not counts):
        raise ValueError(f"{at}: RLE 'counts' must be a string (compressed) or a list of integers")


def _check_annotation(ann: dict, at: str, images: dict, categories: dict) -> bool:
    """Check one annotation; whether it carries a mask."""
    if not _int(ann.get("image_id")) or ann["image_id"] not in images:
        raise ValueError(f"{at}: image_id {ann.get('image_id')!r} is not an image of the file")
    if not _int(ann.get("category_id")) or ann["category_id"] not in categories:
        raise ValueError(f"{at}: category_id {ann.get('category_id')!r} is not a category of the file")
    box = ann.get("bbox")
    if not isinstance(box, list) or len(box) != 4 or not all(map(_number, box)) or box[2] < 0 or box[3] < 0:
        raise ValueError(f"{at}: 'bbox' must be [x, y, width, height] in pixels (width, height >= 0)")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise ValueError(f"{at}: 'iscrowd' must be 0 or 1")
    if ann.get("segmentation") in (None, []):
        return False
    _check_segmentation(ann["segmentation"], images[ann["image_id"]], at)
    return True


def read_coco(path: Path) -> tuple[COCO, bool]:
    """A COCO annotations file, checked entry by entry, indexed by pycocotools; and whether
    every (non-crowd) object has a mask."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path}: not valid JSON{where}") from None
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path}: expected a COCO object with 'images', 'annotations' and 'categories'")
    images, categories, files = {}, {}, set()
    for at, im in _entries(data, "images", str(path)):
        if not isinstance(im.get("file_name"), str) or not im["file_name"].strip() or im["file_name"] in files:
            raise ValueError(f"{at}: 'file_name' must be a path string no other image has")
        if not all(_int(im.get(k)) and im[k] > 0 for k in ("width", "height")):
            raise ValueError(f"{at}: 'width' and 'height' must be positive integers (pixels)")
        images[im["id"]] = im
        files.add(im["file_name"])
    for at, cat in _entries(data, "categories", str(path)):
        if not isinstance(cat.get("name"), str) or not cat["name"].strip():
            raise ValueError(f"{at}: 'name' must be a non-empty string")
        categories[cat["id"]] = cat
    masked = []  # per non-crowd object: whether it has a mask
    for at, ann in _entries(data, "annotations", str(path)):
        has_mask = _check_annotation(ann, at, images, categories)
        if not ann.get("iscrowd"):
            masked.append(has_mask)
    coco = COCO()  # indexed here: createIndex would print (into a flow's log)
    coco.dataset = {"annotations": [], "categories": [], **data}
    coco.imgs, coco.cats = images, categories
    coco.anns = {ann["id"]: ann for ann in coco.dataset["annotations"]}
    for ann in coco.anns.values():
        coco.imgToAnns[ann["image_id"]].append(ann)
        coco.catToImgs[ann["category_id"]].append(ann["image_id"])
    return coco, bool(masked) and all(masked)


# ---------------------------------------------------------------------------------------------
# Labels of an inputs folder
# ---------------------------------------------------------------------------------------------
