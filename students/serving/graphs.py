"""A student folder's exported graphs (``<student>/onnx/``), read and checked without torch.

The export (``onnx.export_onnx``, which needs torch) writes them; the runtime
(``runtime.StudentRuntime``, which does not) and ``distillery predict`` read them through this
module. Layout:

* ``vision.onnx``, ``text.onnx``, ``step.onnx``: the float graphs (see ``onnx.py``);
* ``vision-int8.onnx``, ``text-int8.onnx``: their int8 versions (when calibrated);
* ``ort/vision-int8.ort``, ``ort/text-int8.ort``, ``ort/step.ort``: the int8 graphs in ONNX
  Runtime's ORT format, for ONNX Runtime Mobile (Android, iOS), with
  ``ort/required_operators.config`` (the operators a minimal ONNX Runtime build must keep). Any
  ONNX Runtime runs them too, with the int8 graphs' outputs, and opens them faster (their
  optimizations are already applied: 0.30 vs 0.40 s to the demo student's first answer) but
  holds more memory while opening them (a copy of the file's bytes beside the weights: 283 vs
  233 MB peak for the 152k-vocabulary student of ``benchmarks/scale.py``), so ``auto`` runs the
  int8 ``.onnx`` graphs first and the ORT ones where a folder has only those (a phone bundle);
* ``meta.json``: output names, answer segments, the layout's ``format`` and the ``digest`` of the
  weights and config the graphs came from (a student whose files changed is never run from stale
  graphs; a folder shipped without ``model.safetensors``, e.g. to a phone, is taken as it is).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

ONNX_DIR = "onnx"
META_FILE = "meta.json"
VISION, TEXT, STEP = "vision.onnx", "text.onnx", "step.onnx"
VISION_INT8, TEXT_INT8 = "vision-int8.onnx", "text-int8.onnx"
ORT_DIR = "ort"  # inside ONNX_DIR
ORT_OPERATORS = "required_operators.config"
FORMAT = 3  # 3: the text graph takes the detector's counts (computed on numpy), not its raw outputs;
# 2: vision / text / step graphs; 1: one encoder graph. An older layout is treated as stale.
GRAPH_SETS = ("auto", "int8", "float", "ort")  # which graphs a runtime runs
# The node types whose outputs the runtime decodes without torch (students/model/arrays.py).
RUNTIME_NODE_TYPES = ("yolo", "rag", "llm", "openai")


def digest(model_dir: str | Path) -> str:
    """sha256 over the student's weights and config: what the graphs must have been made from."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        with open(Path(model_dir) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_meta(model_dir: str | Path) -> dict[str, Any] | None:
    """The export's meta.json when it was made from the folder's present weights and config (or
    the folder ships no weights), in this version's layout of graphs; else None."""
    model_dir = Path(model_dir)
    try:
        meta = json.loads((model_dir / ONNX_DIR / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            return None
        if not (model_dir / "model.safetensors").exists():  # a shipped runtime bundle: nothing to compare
            return meta
        return meta if meta.get("digest") == digest(model_dir) else None
    except (OSError, ValueError):
        return None


def has_int8(model_dir: str | Path, meta: dict[str, Any] | None) -> bool:
    """``meta`` (``read_meta``'s) names int8 vision and text graphs and the files are there."""
    return bool(meta and "int8" in meta and all((Path(model_dir) / ONNX_DIR / meta["int8"][k]["file"]).is_file()
                                                for k in ("vision", "text")))


def has_ort(model_dir: str | Path, meta: dict[str, Any] | None) -> bool:
    """``meta`` names ORT-format graphs and the files are there."""
    return bool(meta and "ort" in meta and all((Path(model_dir) / ONNX_DIR / meta["ort"][k]).is_file()
                                               for k in ("vision", "text", "step")))


def graph_files(model_dir: str | Path, meta: dict[str, Any], graphs: str = "auto") -> dict[str, Path]:
    """The vision, text and step graph files to run: ``int8``, ``float``, ``ort`` (the int8 graphs
    in ORT format) or ``auto`` (int8, else ORT, else float: the first the folder has).
    ValueError names what is missing."""
    root = Path(model_dir) / ONNX_DIR
    if graphs not in GRAPH_SETS:
        raise ValueError(f"graphs {graphs!r}: expected one of {', '.join(GRAPH_SETS)}")
    if graphs == "auto":
        graphs = "int8" if has_int8(model_dir, meta) else "ort" if has_ort(model_dir, meta) else "float"
    if graphs == "ort":
        if not has_ort(model_dir, meta):
            raise ValueError(f"{root}: no ORT-format graphs (the export writes them with the int8 graphs)")
        return {k: root / meta["ort"][k] for k in ("vision", "text", "step")}
    if graphs == "int8":
        if not has_int8(model_dir, meta):
            raise ValueError(f"{root}: no int8 graphs (exported without calibration inputs)")
        return {"vision": root / meta["int8"]["vision"]["file"], "text": root / meta["int8"]["text"]["file"],
                "step": root / STEP}
    files = {"vision": root / VISION, "text": root / TEXT, "step": root / STEP}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise ValueError(f"{root}: missing {', '.join(missing)}")
    return files


def runtime_ready(model_dir: str | Path) -> bool:
    """The folder has current graphs and only node types the runtime decodes: what ``distillery
    predict`` (auto) and the served model need to run without torch."""
    meta = read_meta(model_dir)
    if meta is None:
        return False
    try:
        nodes = json.loads((Path(model_dir) / "config.json").read_text())["schema"]["nodes"]
        graph_files(model_dir, meta)
    except (OSError, ValueError, KeyError):
        return False
    return (Path(model_dir) / "tokenizer.json").is_file() and all(
        n.get("type") in RUNTIME_NODE_TYPES for n in nodes.values())


def write_ort(onnx_dir: Path, meta: dict[str, Any]) -> dict[str, str]:
    """The int8 graphs (and the float step graph) in ORT format, under ``onnx_dir/ort``, with the
    operators they need (for a minimal ONNX Runtime build). Optimized for any CPU (ARM too: no
    x86-only layouts), as ``python -m onnxruntime.tools.convert_onnx_models_to_ort
    --target_platform arm`` does. Returns meta's ``ort`` entry (paths relative to ``onnx_dir``)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    sources = [meta["int8"]["vision"]["file"], meta["int8"]["text"]["file"], STEP]
    out = onnx_dir / ORT_DIR
    with tempfile.TemporaryDirectory(prefix=".ort-", dir=onnx_dir) as tmp:
        for f in sources:
            shutil.copy2(onnx_dir / f, Path(tmp) / f)
        quiet = logging.getLogger("ort_format_model.utils")  # (it logs the operators file at INFO)
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # (the tool prints each step)
                convert_onnx_models_to_ort(Path(tmp), output_dir=out, optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform="arm")
        finally:
            quiet.setLevel(level)
    configs = sorted(out.glob("*.config"))
    if configs and configs[0].name != ORT_OPERATORS:
        configs[0].replace(out / ORT_OPERATORS)
    names = {"vision": sources[0], "text": sources[1], "step": sources[2]}
    entry = {k: f"{ORT_DIR}/{Path(v).with_suffix('.ort').name}" for k, v in names.items()}
    missing = [v for v in entry.values() if not (onnx_dir / v).is_file()]
    if missing:
        raise RuntimeError(f"ORT conversion wrote no {', '.join(missing)} in {out}")
    return entry | {"operators": f"{ORT_DIR}/{ORT_OPERATORS}", "target_platform": "arm"}
