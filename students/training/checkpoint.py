"""Resumable checkpoints: weights as safetensors, everything else as plain tensors and numbers.

A checkpoint is a folder ``checkpoints/step_XXXXXXXX`` holding ``model.safetensors`` and
``state.pt`` (optimizer, scheduler, scaler, RNG states, loop position), read back with
``torch.load(weights_only=True)``: no pickled objects, so loading one cannot run code. Folders are
written under a temporary name and renamed into place, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

STATE_FILE, WEIGHTS_FILE = "state.pt", "model.safetensors"


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as tensors and numbers (``weights_only``-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``rng_state`` took."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (``checkpoints/step_XXXXXXXX``), if any."""
    found = sorted(Path(out_dir, "checkpoints").glob("step_*"))
    return found[-1] if found else None


def save_checkpoint(ckpt_dir: Path, model: torch.nn.Module, payload: dict[str, Any], keep: int) -> Path:
    """Write ``step_N/{model.safetensors, state.pt}`` into a temporary folder, then rename it
    into place (atomic): a crash leaves the previous checkpoint, never a half one."""
    step = payload["loop"]["step"]
    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS_FILE))
    torch.save(payload, tmp / STATE_FILE)
    for f in (tmp / WEIGHTS_FILE, tmp / STATE_FILE):  # on disk before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load the weights into ``model`` (on ``device``) and return the rest, on the CPU
    (``torch.load(weights_only=True)``; RNG states must be CPU tensors, and the optimizer moves
    its state to its parameters' device when loaded)."""
    load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
