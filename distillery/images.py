"""Decoding request images: the one set of rules the teachers' inputs, the student's data, the
predictor and the served model share.

An image arrives as raw bytes, a path (where paths are allowed) or base64 text (a ``data:``
URL prefix is fine); it is decoded with EXIF orientation applied, in RGB. Every error is a
``ValueError`` that names the input (``where``) and the reason.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

MAX_PATH_CHARS = 4096  # a longer string is base64 data, never a path


def open_image(data: bytes, where: str) -> Image.Image:
    """Bytes -> RGB image, EXIF orientation applied."""
    try:
        img = Image.open(io.BytesIO(data))
        ImageOps.exif_transpose(img, in_place=True)  # (not in place: a copy of every image)
        if img.mode.startswith("I;16"):  # 16-bit grey: scaled to 8 bits (PIL's convert would clip at 255)
            img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:  # PIL raises many kinds
        raise ValueError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None


def image_source(image: Any, where: str, allow_paths: bool = True) -> bytes | Path:
    """bytes -> bytes; an existing file's path -> the Path (if ``allow_paths``); base64 -> bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Path):
        if allow_paths:
            return image
        raise ValueError(f"{where}: 'image' must be base64 data here, not a path")
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: 'image' must be a path, bytes or a base64 string, got {type(image).__name__}")
    if allow_paths and len(image) < MAX_PATH_CHARS and not image.startswith("data:") and Path(image).is_file():
        return Path(image)
    data = image.split(",", 1)[1] if image.startswith("data:") else image
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        what = "an existing file nor valid base64" if allow_paths else "valid base64 (a served model takes no paths)"
        raise ValueError(f"{where}: 'image' is neither {what}") from None


def read_image(image: Any, where: str, allow_paths: bool = True) -> Image.Image:
    """A PIL image, bytes, a path or base64 text -> RGB image (EXIF orientation applied)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    source = image_source(image, where, allow_paths)
    if isinstance(source, Path):
        try:
            source = source.read_bytes()
        except OSError as e:
            raise ValueError(f"{where}: cannot read {image}: {e.strerror or e}") from None
    return open_image(source, where)
