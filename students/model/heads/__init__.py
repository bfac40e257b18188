"""The student's heads, one module per teacher node type (``base`` holds the interface).

Importing this package imports every module in it, so each head registers itself under its
node type's key: a new node type's student side is one new file here, and no other file changes.
(Only this package's own modules are imported; a config never names code.)
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Iterable

from distillery.students.model.heads.base import (HEADS, Features, Head, Segment, TargetContext,  # noqa: F401
                                                  conv_bn_act, mean_embed, padded, register_head)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def head_class(key: str) -> type[Head]:
    """The head for a teacher node type, failing with the known keys."""
    try:
        return HEADS[key]
    except KeyError:
        raise KeyError(f"no student head for node type {key!r}; known: {', '.join(sorted(HEADS))}") from None


def output_head(outputs: Iterable[dict[str, Any] | None]) -> type[Head] | None:
    """The head whose outputs these are (teacher's, student's or the truth's), read off their keys."""
    keys: set[str] = set()
    for o in outputs:
        keys |= set(o or {})
    return next((h for h in HEADS.values() if h.OUTPUT_KEY and h.OUTPUT_KEY in keys), None)
