"""Inputs: find them, check each one before any teacher sees it, quarantine the bad ones.

An inputs folder holds either

* ``requests.jsonl`` — one ``{"image": "path", "question": "..."}`` per line, image paths relative
  to the folder (absolute paths are fine too, inside the folder); or
* only images (png, jpg, jpeg, bmp, webp, sorted by name), each asked ``inputs.default_question``.

``inputs`` may also name a ``.jsonl`` file directly (paths then resolve against its folder).

An image must lie inside the inputs folder (after following symlinks: a link inside the folder
to a file inside it is fine); one outside it (``..``, an absolute path elsewhere, a link that
points out) is refused as ``outside_inputs`` before it is opened. A question may hold tab, newline
and carriage return but no other control character (Unicode category Cc: NUL, ESC, DEL, ...):
those are refused as ``question_control_chars``, not cleaned, so what the teachers saw is what the
request said. Every bad input becomes a ``Quarantined`` with one of ``REASONS`` and a sentence
naming the input (file and line) and what is wrong; good ones become a ``Request`` holding the raw image bytes.
Ids are content addresses (``make_input_id``), so reruns give the same ids and duplicates
collapse to one.
"""

from __future__ import annotations

import io
import json
import os
import unicodedata
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageFile, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from distillery.teachers.records import Quarantined, Request, make_input_id


class InputsConfig(BaseModel):
    """How inputs are read and checked before any teacher sees them (the spec's ``inputs:``)."""

    model_config = ConfigDict(extra="forbid")
    default_question: str | None = Field(None, description="Question for image-only folders.")
    max_pixels: int = Field(40_000_000, ge=1, description="Refuse larger images (decompression bombs).")
    max_question_chars: int = Field(2000, ge=1, description="Refuse longer questions.")


def pil_open(fp, formats):
    """PIL's own ``Image.open``, even after Ultralytics has patched it: its patch answers an
    unidentified image by pip-installing a HEIF plugin, which must never happen on bad input."""
    import sys

    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", Image.open)
    return opener(fp, formats=formats)

REASONS = ("missing_file", "empty_file", "not_an_image", "truncated_image", "too_many_pixels", "outside_inputs",
           "empty_question", "question_too_long", "question_not_utf8", "question_control_chars",
           "bad_request_line")
ALLOWED_CONTROLS = frozenset("\t\n\r")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # what PIL may decode: no plugin that shells out (EPS)
REQUESTS_FILE = "requests.jsonl"


@dataclass
class Candidate:
    """An input found on disk, not yet checked. ``question`` is bytes when it is not valid UTF-8."""

    image_path: Path
    question: str | bytes
    where: str  # how to name it in a message: "requests.jsonl line 3" or the image file
    root: Path | None = None  # the inputs folder the image must lie in


class _Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# -- discovery -------------------------------------------------------------------------------------
def discover(inputs: str | Path, cfg: InputsConfig) -> list[Candidate | Quarantined]:
    """The inputs named by a folder (or a requests .jsonl file), in order; request lines that
    cannot be read at all come back already quarantined (``bad_request_line``)."""
    path = Path(inputs)
    if path.is_file() and path.suffix == ".jsonl":
        return read_requests(path)
    if not path.is_dir():
        raise ValueError(f"inputs {str(path)!r} does not exist or is not a folder "
                         f"(expected a folder of images or with a {REQUESTS_FILE})")
    if (path / REQUESTS_FILE).is_file():
        return read_requests(path / REQUESTS_FILE)
    if cfg.default_question is None:
        raise ValueError(f"inputs folder {str(path)!r} has no {REQUESTS_FILE} and the spec has no "
                         "inputs.default_question; add one or the other")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not images:
        raise ValueError(f"inputs folder {str(path)!r} has no {REQUESTS_FILE} and no images "
                         f"({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
    return [Candidate(p, cfg.default_question, p.name, path) for p in images]


def read_requests(jsonl: Path) -> list[Candidate | Quarantined]:
    """Parse a requests file line by line (in binary, so one bad line never loses the others)."""
    found: list[Candidate | Quarantined] = []
    with open(jsonl, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if not raw.strip():
                continue
            where = f"{jsonl.name} line {number}"
            try:
                found.append(parse_request_line(raw, jsonl.parent, where))
            except _Refused as e:
                found.append(Quarantined(make_input_id(raw.strip(), ""), "", "", e.reason, str(e)))
    return found


def parse_request_line(raw: bytes, base: Path, where: str) -> Candidate:
    """One requests.jsonl line -> a Candidate; raises _Refused("bad_request_line") when unusable.

    Invalid UTF-8 is decoded with ``surrogateescape`` so the line still parses; a question that
    keeps such bytes is handed on as bytes (and quarantined as ``question_not_utf8``)."""
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Refused("bad_request_line", f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entry, dict):
        raise _Refused("bad_request_line", f"{where}: expected a JSON object "
                       '{"image": ..., "question": ...}, got ' + type(entry).__name__)
    missing = [k for k in ("image", "question") if k not in entry]
    if missing:
        raise _Refused("bad_request_line", f"{where}: missing key(s) {', '.join(missing)}; "
                       'each line is {"image": "path", "question": "text"}')
    image, question = entry["image"], entry["question"]
    if not isinstance(image, str) or not image.strip() or not isinstance(question, str):
        raise _Refused("bad_request_line", f"{where}: 'image' must be a non-empty path string and "
                       "'question' a string")
    if not _utf8_ok(image):
        raise _Refused("bad_request_line", f"{where}: the image path is not valid UTF-8")
    if not _utf8_ok(question):
        return Candidate(base / image, _raw_bytes(question), where, base)
    return Candidate(base / image, question, where, base)


def _raw_bytes(text: str) -> bytes:
    """The bytes a surrogate-escaped string came from (lone surrogates from JSON ``\\ud8xx``
    escapes are kept as their UTF-8-like encoding, which is still invalid UTF-8)."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass")


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# -- checking --------------------------------------------------------------------------------------
def check_input(image_path: Path, question: str | bytes, cfg: InputsConfig,
                where: str = "", root: Path | None = None,
                good_images: dict[Path, bytes] | None = None) -> Request | Quarantined:
    """Check one input: where the file is (inside ``root``, when given), the file, the question,
    then the image (header first, then a full decode).

    ``where`` names the input in messages (e.g. "requests.jsonl line 3"); the image path is added.
    ``good_images``: the files already read and decoded in this scan, by path (an image that
    several questions ask about is read and decoded once, and its requests share its bytes);
    a file that passes is added. Returns a Request with the raw image bytes, or a Quarantined
    naming the input and the reason."""
    image_path = Path(image_path)
    shown = os.fsencode(image_path).decode("utf-8", errors="replace")
    label = f"{where} ({shown})" if where and image_path.name not in where else (where or shown)
    text = question if isinstance(question, str) else question.decode("utf-8", errors="replace")
    data: bytes | None = None
    try:
        if root is not None:
            check_inside(image_path, root, label)
        known = None if good_images is None else good_images.get(image_path)
        data = known if known is not None else read_image_file(image_path, label)
        text = check_question(question, cfg, label)
        if known is None:
            check_image(data, cfg, label)
            if good_images is not None:
                good_images[image_path] = data
    except _Refused as e:
        key = data or os.fsencode(image_path)  # empty or unreadable file: the path names it
        return Quarantined(make_input_id(key, text), shown, text, e.reason, str(e))
    return Request(make_input_id(data, text), shown, data, text)


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in the folder ``root``, symlinks followed (neither is opened)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def check_inside(path: Path, root: Path, label: str) -> None:
    if not inside(path, root):
        raise _Refused("outside_inputs", f"{label}: the image lies outside the inputs folder {root} "
                       f"(it resolves to {os.path.realpath(path)}); images must be inside it")


def read_image_file(path: Path, label: str) -> bytes:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise _Refused("missing_file", f"{label}: the image file {what}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Refused("missing_file", f"{label}: the image file cannot be read ({e.strerror})") from None
    if not data:
        raise _Refused("empty_file", f"{label}: the image file is empty (0 bytes)")
    return data


def check_question(question: str | bytes, cfg: InputsConfig, label: str) -> str:
    if isinstance(question, bytes):
        try:
            question = question.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Refused("question_not_utf8", f"{label}: the question is not valid UTF-8 "
                           f"(byte {question[e.start]:#04x} at position {e.start})") from None
    if not question.strip():
        raise _Refused("empty_question", f"{label}: the question is empty")
    bad = next((i for i, c in enumerate(question) if c not in ALLOWED_CONTROLS and unicodedata.category(c) == "Cc"),
               None)
    if bad is not None:
        raise _Refused("question_control_chars", f"{label}: the question holds the control character "
                       f"U+{ord(question[bad]):04X} at position {bad} (only tab, newline and carriage return "
                       "are allowed)")
    if len(question) > cfg.max_question_chars:
        raise _Refused("question_too_long", f"{label}: the question has {len(question)} characters, "
                       f"more than inputs.max_question_chars = {cfg.max_question_chars}")
    return question


@contextmanager
def _strict_pil() -> Iterator[None]:
    """Truncated files must fail to load; PIL's own bomb warning is ours to judge (max_pixels)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def check_image(data: bytes, cfg: InputsConfig, label: str) -> None:
    """Identify the image, check its pixel count from the header, then decode it fully."""
    with _strict_pil():
        try:
            img = pil_open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise _Refused("not_an_image", f"{label}: not an image PIL can read as "
                           f"{'/'.join(IMAGE_FORMATS)}") from None
        except Image.DecompressionBombError as e:
            raise _Refused("too_many_pixels", f"{label}: too many pixels ({e})") from None
        except (OSError, ValueError, SyntaxError) as e:  # a header that starts right, then breaks
            raise _Refused("truncated_image", f"{label}: broken image header ({e})") from None
        with img:
            width, height = img.size
            if width * height > cfg.max_pixels:
                raise _Refused("too_many_pixels", f"{label}: {width}x{height} = {width * height} pixels, "
                               f"more than inputs.max_pixels = {cfg.max_pixels}")
            try:
                img.load()
            except Image.DecompressionBombError as e:
                raise _Refused("too_many_pixels", f"{label}: too many pixels ({e})") from None
            except (OSError, ValueError, SyntaxError, EOFError) as e:
                raise _Refused("truncated_image", f"{label}: image data is truncated or corrupt "
                               f"({e})") from None


# -- everything ------------------------------------------------------------------------------------
@dataclass
class InputScan:
    requests: list[Request]
    quarantined: list[Quarantined]
    skipped: int  # inputs whose id was in ``skip``: not checked again


@dataclass
class ScanCounts:
    """What a lazy scan (``iter_inputs``) has counted so far besides the items it yields."""

    skipped: int = 0  # inputs whose id was in ``skip``: not checked again
    seen: int = 0  # candidates looked at (yielded, skipped, or a duplicate of an earlier one)


class RecentImages(OrderedDict):
    """The image files most recently read and decoded in a scan, by path (least recently used
    dropped past ``size``): the questions about one image, which request files list together,
    share one read, one decode and one copy of its bytes, while the memory a scan holds stays
    bounded however many inputs it covers."""

    def __init__(self, size: int = 64):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def iter_inputs(found: Iterable[Candidate | Quarantined], cfg: InputsConfig, skip: Collection[str] = (),
                counts: ScanCounts | None = None) -> Iterator[Request | Quarantined]:
    """Check ``found`` (``discover``'s list) one input at a time, as it is consumed: each good
    request and each quarantined input once (by id), in order. An input whose id is in ``skip``
    (already recorded) is only counted (``counts.skipped``): its bytes are read and hashed (the
    id), not decoded and checked again, so a rerun over recorded inputs costs a read per file.
    Nothing but the ids seen and a few recent images is kept, so a run over millions of inputs
    holds no more than the shards it is working on."""
    counts = counts if counts is not None else ScanCounts()
    seen: set[str] = set()
    recent = RecentImages()
    for item in found:
        counts.seen += 1
        if isinstance(item, Candidate):
            known = _known_id(item, skip)
            if known is not None:
                counts.skipped += known not in seen
                seen.add(known)
                continue
            item = check_input(item.image_path, item.question, cfg, item.where, item.root, recent)
        if item.input_id in seen:
            continue
        seen.add(item.input_id)
        if item.input_id in skip:  # (an id only known once checked: a refused input, a bytes question)
            counts.skipped += 1
            continue
        yield item


def scan_inputs(inputs: str | Path, cfg: InputsConfig, skip: Collection[str] = ()) -> InputScan:
    """Discover and check every input at once (``iter_inputs`` over ``discover``): the good
    requests and the quarantined ones, each input id once, in order."""
    scan, counts = InputScan([], [], 0), ScanCounts()
    for item in iter_inputs(discover(inputs, cfg), cfg, skip, counts):
        (scan.requests if isinstance(item, Request) else scan.quarantined).append(item)
    scan.skipped = counts.skipped
    return scan


def _known_id(found: Candidate, skip: Collection[str]) -> str | None:
    """The candidate's input id when it is in ``skip`` (a readable file, a text question)."""
    if not skip or not isinstance(found.question, str):
        return None
    if found.root is not None and not inside(found.image_path, found.root):
        return None  # never read: check_input refuses it
    try:
        data = Path(found.image_path).read_bytes()
    except OSError:
        return None
    input_id = make_input_id(data, found.question) if data else None
    return input_id if input_id in skip else None
