"""A generated feed of bad inputs mixed with good ones, each line's expected outcome known.

    corpus = make_corpus(root, seed=0)     # root/requests.jsonl, root/images/, root/../outside/
    corpus.expected[line]                  # "ok", "duplicate" or the quarantine reason

The bad kinds are what a real feed produces: zero-byte files, PNG and JPEG files truncated at
random offsets, wrong magic numbers, decompression bombs and huge dimensions (claimed in valid
headers), animated GIFs (not an accepted format), images outside the folder (``..``, absolute
paths, symlinks pointing out), missing files, malformed request lines, and empty, over-long,
non-UTF-8 and control-character questions. The good ones include the awkward-but-valid: EXIF
orientations 1-8, CMYK JPEGs, 16-bit greys, palettes with transparency, animated WebP, symlinks
that stay inside. Duplicate lines are counted once. Used by ``tests/test_reliability.py`` and
``benchmarks/reliability.py``.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 1_000_000  # the corpus's inputs.max_pixels
MAX_QUESTION_CHARS = 300  # and inputs.max_question_chars


@dataclass
class Corpus:
    root: Path
    expected: dict[int, str] = field(default_factory=dict)  # requests.jsonl line -> outcome

    def count(self, outcome: str) -> int:
        return sum(v == outcome for v in self.expected.values())

    @property
    def bad(self) -> int:
        return sum(v not in ("ok", "duplicate") for v in self.expected.values())


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, then a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + _chunk(b"IEND", b""))


def good_images(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(suffix, bytes) of valid images of every awkward kind."""
    out = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out.append((".jpg", _encode(_noise(rng, 40, 24), "JPEG", exif=exif.tobytes())))
    out.append((".jpg", _encode(_noise(rng, 32, 32).convert("CMYK"), "JPEG")))
    out.append((".png", _encode(Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)), "PNG")))
    out.append((".png", _encode(_noise(rng, 24, 24).convert("P"), "PNG", transparency=0)))
    out.append((".png", _encode(_noise(rng, 24, 24).convert("RGBA"), "PNG")))
    out.append((".webp", _encode(_noise(rng, 24, 24), "WEBP", save_all=True, append_images=[_noise(rng, 24, 24)])))
    out.append((".bmp", _encode(_noise(rng, 24, 24), "BMP")))
    while len(out) < 20:
        out.append((".png", _encode(_noise(rng, int(rng.integers(16, 64)), int(rng.integers(16, 64))), "PNG")))
    return out


def make_corpus(root: str | Path, seed: int = 0, n_bad: int = 220, n_good: int = 40) -> Corpus:
    """Write the corpus under ``root`` (a fresh folder); its expected outcome per request line."""
    root = Path(root)
    images, outside = root / "images", root.parent / f"{root.name}-outside"
    images.mkdir(parents=True)
    outside.mkdir()
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    corpus, lines = Corpus(root), []
    goods = good_images(rng)

    def add(line: bytes | str, outcome: str) -> None:
        lines.append(line.encode() if isinstance(line, str) else line)
        corpus.expected[len(lines)] = outcome

    def request(image: str, question: str, outcome: str) -> None:
        add(json.dumps({"image": image, "question": question}), outcome)

    def file(name: str, data: bytes) -> str:
        (images / name).write_bytes(data)
        return f"images/{name}"

    for i in range(n_good):
        suffix, data = goods[i % len(goods)]
        request(file(f"good-{i}{suffix}", data), f"good {i}: how many objects?", "ok")
    (images / "inside-link.png").symlink_to(images / f"good-0{goods[0][0]}")
    request("images/inside-link.png", "good link: what is here?", "ok")
    request(f"images/good-1{goods[1][0]}", "good 1: how many objects?", "duplicate")  # line repeated
    (outside / "secret.png").write_bytes(goods[-1][1])
    (images / "outside-link.png").symlink_to(outside / "secret.png")
    jpeg, png = goods[0][1], goods[-1][1]
    kinds = ["empty", "trunc_png", "trunc_jpeg", "magic", "bomb", "huge", "gif", "dotdot", "absolute",
             "link_out", "missing", "bad_json", "not_object", "missing_key", "empty_q", "long_q", "utf8_q",
             "control_q"]
    for i in range(n_bad):
        kind, q = kinds[i % len(kinds)], f"bad {i}: how many?"
        if kind == "empty":
            request(file(f"empty-{i}.png", b""), q, "empty_file")
        elif kind == "trunc_png":  # past the header: the decode fails; inside it: not identified
            cut = pick.randrange(60, len(png) * 3 // 4)
            request(file(f"trunc-{i}.png", png[:cut]), q, "truncated_image")
        elif kind == "trunc_jpeg":
            cut = pick.randrange(len(jpeg) // 3, len(jpeg) * 3 // 4)
            request(file(f"trunc-{i}.jpg", jpeg[:cut]), q, "truncated_image")
        elif kind == "magic":
            request(file(f"magic-{i}.png", bytes(rng.integers(0, 255, 200, dtype=np.uint8))), q, "not_an_image")
        elif kind == "bomb":
            request(file(f"bomb-{i}.png", png_claiming(60_000, 60_000)), q, "too_many_pixels")
        elif kind == "huge":
            request(file(f"huge-{i}.png", png_claiming(2_000 + i, 1_000)), q, "too_many_pixels")
        elif kind == "gif":
            frames = [_noise(rng, 16, 16).convert("P") for _ in range(2)]
            data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
            request(file(f"anim-{i}.gif", data), q, "not_an_image")
        elif kind == "dotdot":
            request(f"../{outside.name}/secret.png", q, "outside_inputs")
        elif kind == "absolute":
            request(str(outside / "secret.png"), q, "outside_inputs")
        elif kind == "link_out":
            request("images/outside-link.png", q, "outside_inputs")
        elif kind == "missing":
            request(f"images/missing-{i}.png", q, "missing_file")
        elif kind == "bad_json":
            add('{"image": "images/x%d.png", "question": ' % i, "bad_request_line")
        elif kind == "not_object":
            add(json.dumps(["images/x.png", q]), "bad_request_line")
        elif kind == "missing_key":
            add(json.dumps({"image": f"images/good-0{goods[0][0]}", "n": i}), "bad_request_line")
        elif kind == "empty_q":
            request(f"images/good-2{goods[2][0]}", " " * (i % 7 + 1) + "\t" * (i // 7 + 1), "empty_question")
        elif kind == "long_q":
            request(f"images/good-2{goods[2][0]}", "why " * (MAX_QUESTION_CHARS // 4 + 1 + i), "question_too_long")
        elif kind == "utf8_q":
            head = json.dumps({"image": f"images/good-2{goods[2][0]}", "question": "X"}).encode()
            add(head.replace(b'"X"', b'"bad ' + str(i).encode() + b' \xff\xfe?"'), "question_not_utf8")
        elif kind == "control_q":
            ch = pick.choice(["\x00", "\x07", "\x1b", "\x7f", "\x85"])
            request(f"images/good-2{goods[2][0]}", f"bad {i}{ch} how many?", "question_control_chars")
    (root / "requests.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return corpus


def outcomes(scan) -> dict[int, str]:
    """requests.jsonl line -> outcome, read back from a scan (``teachers.inputs.scan_inputs``):
    each quarantined input names its line; each request is matched by its question."""
    out: dict[int, str] = {}
    for q in scan.quarantined:
        line = int(q.detail.split(" line ", 1)[1].split(None, 1)[0].rstrip(":"))
        out[line] = q.reason
    return out
