"""A student folder: what it holds, checked without loading anything (no torch here)."""

from __future__ import annotations

from pathlib import Path

STUDENT_FILES = ("model.safetensors", "config.json")  # the least a student folder holds


def student_dir(folder: str | Path) -> Path:
    """The student inside a pulled folder (``folder/student``) or the folder itself, checked:
    FileNotFoundError names the folder and what it lacks."""
    folder = Path(folder)
    model_dir = folder / "student" if (folder / "student").is_dir() else folder
    if not model_dir.is_dir():
        raise FileNotFoundError(f"student folder {model_dir}: not a directory")
    missing = [f for f in STUDENT_FILES if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"student folder {model_dir}: missing {', '.join(missing)}")
    return model_dir.resolve()
