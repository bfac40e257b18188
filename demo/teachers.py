"""The demo teachers: a YOLO segmenter and a reasoning LLM, trained by the project on its world.

``ensure_teachers(world, preset, out_dir)`` is what the demo calls:

* ``full``: the weights shipped in ``demo/assets/`` (checked against ``demo/assets/SHA256SUMS``
  before anything loads them), unless ``retrain=True``;
* ``tiny`` (or ``full`` with ``retrain``): trained, then cached under ``out_dir`` by the teachers'
  fingerprints, so a second call reuses them.

Each teacher has its own fingerprint (``fingerprints``): the YOLO teacher's is the world config and
its training config (the scenes it sees), the LLM's is the text it reads and writes (knowledge
base, questions, summary and trace format, ``llm_teacher.world_text``) and its training config. A
change to the questions therefore retrains the LLM only (``--only llm``), never the segmenter.

``train_teachers(world, preset, out_dir)`` is the seeded command that produced the shipped assets:
``python -m distillery.demo.teachers --preset full --world WORLD_DIR --out demo/assets``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from distillery.demo.evaluate import evaluate_teachers
from distillery.demo.llm_teacher import LLMTrainConfig, train_llm
from distillery.demo.world import World, WorldConfig, build_world, world_digest

ASSETS = Path(__file__).parent / "assets"
YOLO_FILE = "yolo_seg.pt"
LLM_DIR = "llm"
FLOOR = {"box_map50": 0.85, "llm_acc_gt": 0.9}
"""Quality the full teachers must reach on the test split (issue 3)."""


class YoloTrainConfig(BaseModel):
    """Ultralytics segmentation training (from ``yolo11n-seg.yaml``, random init, offline)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field("yolo11n-seg.yaml", description="Ultralytics model YAML (no weights download).")
    epochs: int = Field(30, ge=1)
    imgsz: int = Field(160, ge=32, description="Training, evaluation and inference size in pixels.")
    batch: int = Field(32, ge=1)
    close_mosaic: int = Field(10, ge=0, description="Last epochs trained without mosaic.")
    optimizer: str = Field("AdamW", description="Ultralytics optimizer name.")
    lr0: float = Field(0.002, gt=0, description="Initial learning rate (higher than 'auto' picks: from scratch).")
    workers: int = Field(1, ge=0, le=1)
    seed: int = 0


class TrainPreset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    yolo: YoloTrainConfig = Field(default_factory=YoloTrainConfig)
    llm: LLMTrainConfig = Field(default_factory=LLMTrainConfig)


PRESETS = {
    "full": TrainPreset(),
    "tiny": TrainPreset(
        yolo=YoloTrainConfig(epochs=1, imgsz=96, batch=8, close_mosaic=0),
        llm=LLMTrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, steps=30,
                           batch_size=8, warmup=5, top_ks=(4,)),
    ),
}


class TeacherArtifacts(BaseModel):
    """Where a set of demo teachers lives, and how good they are."""

    yolo_weights: Path
    llm_dir: Path
    metrics: dict = Field(default_factory=dict)


class AssetError(RuntimeError):
    """A shipped teacher file is missing or does not match its recorded sha256."""


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def train_yolo(world: World, cfg: YoloTrainConfig, out_dir: Path) -> Path:
    """Train the segmenter on the world's train split (val split for model selection); returns
    ``out_dir/yolo_seg.pt`` (Ultralytics' best checkpoint, optimizer stripped)."""
    from distillery import runtime

    runtime.configure(offline=True)
    from ultralytics import YOLO

    runtime.quiet_ultralytics()
    model = YOLO(cfg.model)
    model.train(data=str(world.data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch,
                workers=cfg.workers, seed=cfg.seed, deterministic=True, pretrained=False, amp=False,
                plots=False, device="cpu", close_mosaic=cfg.close_mosaic, optimizer=cfg.optimizer,
                lr0=cfg.lr0, cache="ram", project=str(out_dir / "runs"), name="yolo", exist_ok=True,
                verbose=False, patience=cfg.epochs)
    shutil.copyfile(out_dir / "runs" / "yolo" / "weights" / "best.pt", out_dir / YOLO_FILE)
    shutil.rmtree(out_dir / "runs", ignore_errors=True)
    return out_dir / YOLO_FILE


def train_teachers(world: World, preset: str, out_dir: Path, only: str = "all") -> TeacherArtifacts:
    """Train both teachers with the preset's seeded configs, evaluate them on the test split, and
    write ``metrics.json`` and ``SHA256SUMS`` next to the weights in ``out_dir``."""
    cfg = _preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    if only in ("yolo", "all"):
        t = time.time()
        train_yolo(world, cfg.yolo, out_dir)
        seconds["yolo_train_s"] = round(time.time() - t, 1)
    if only in ("llm", "all"):
        t = time.time()
        train_llm(cfg.llm, out_dir / LLM_DIR)
        seconds["llm_train_s"] = round(time.time() - t, 1)
    times = out_dir / "train_seconds.json"  # merged across parallel --only runs
    seconds = {**(json.loads(times.read_text()) if times.exists() else {}), **seconds}
    times.write_text(json.dumps(seconds))
    art = TeacherArtifacts(yolo_weights=out_dir / YOLO_FILE, llm_dir=out_dir / LLM_DIR)
    if only != "all":
        return art
    return evaluate_and_finalize(world, preset, out_dir)


def evaluate_and_finalize(world: World, preset: str, out_dir: Path) -> TeacherArtifacts:
    art = TeacherArtifacts(yolo_weights=out_dir / YOLO_FILE, llm_dir=out_dir / LLM_DIR)
    metrics = evaluate_teachers(world, art, imgsz=_preset(preset).yolo.imgsz)
    times = out_dir / "train_seconds.json"
    metrics.update(json.loads(times.read_text()) if times.exists() else {})
    return finalize(out_dir, world, preset, metrics)


def finalize(out_dir: Path, world: World, preset: str, metrics: dict) -> TeacherArtifacts:
    """Write metrics.json (figures, configs, the command) then SHA256SUMS over the weights."""
    cfg = _preset(preset)
    record = {"metrics": metrics, "preset": preset, "world": world.config.model_dump(),
              "world_digest": world_digest(world.config),
              "train": cfg.model_dump(mode="json"), "fingerprints": fingerprints(world.config, preset),
              "fingerprint": fingerprint(world.config, preset),
              "command": f"python -m distillery.demo.teachers --preset {preset} --world WORLD_DIR --out {out_dir}"}
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=1))
    write_sums(out_dir)
    return TeacherArtifacts(yolo_weights=out_dir / YOLO_FILE, llm_dir=out_dir / LLM_DIR, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------

def _files(root: Path) -> list[Path]:
    """The weight files a SHA256SUMS covers: the YOLO checkpoint and the LLM folder."""
    return [root / YOLO_FILE] + sorted(p for p in (root / LLM_DIR).rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sums(root: Path) -> None:
    """``SHA256SUMS`` in ``sha256sum`` format (paths relative to ``root``)."""
    lines = [f"{_sha256(p)}  {p.relative_to(root).as_posix()}" for p in _files(root)]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def verify_assets(root: Path = ASSETS) -> None:
    """Check every file listed in ``root/SHA256SUMS``; raise ``AssetError`` naming the first bad one."""
    sums = root / "SHA256SUMS"
    if not sums.exists():
        raise AssetError(f"{sums} is missing: cannot check the demo teachers' weights")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = root / name
        if not path.exists():
            raise AssetError(f"demo teacher file {path} is missing (listed in {sums})")
        actual = _sha256(path)
        if actual != digest:
            raise AssetError(f"demo teacher file {path} is corrupted or was changed: sha256 {actual}, "
                             f"expected {digest} (from {sums}). Restore it (git checkout) or rebuild "
                             "the teachers with `distillery demo --train-teachers`.")


# ---------------------------------------------------------------------------------------------
# What the demo calls
# ---------------------------------------------------------------------------------------------

def _preset(name: str) -> TrainPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown teacher preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fingerprints(world_cfg: WorldConfig, preset: str) -> dict[str, str]:
    """Per teacher, a hash of what it was trained on: ``yolo``: the world config and its training
    config; ``llm``: every text it reads or writes (``world_text``) and its training config."""
    from distillery.demo.llm_teacher import world_text

    cfg = _preset(preset)
    return {"yolo": _hash({"world": world_cfg.model_dump(), "train": cfg.yolo.model_dump(mode="json")}),
            "llm": _hash({"text": world_text(), "train": cfg.llm.model_dump(mode="json")})}


def fingerprint(world_cfg: WorldConfig, preset: str) -> str:
    """One hash of both teachers' fingerprints (names a cached teacher set)."""
    return _hash(fingerprints(world_cfg, preset))


def stale_teachers(record: dict, world_cfg: WorldConfig, preset: str) -> list[str]:
    """The teachers of a ``metrics.json`` record whose fingerprint is not this code's."""
    have = record.get("fingerprints") or {}
    return [name for name, fp in fingerprints(world_cfg, preset).items() if have.get(name) != fp]


def load_artifacts(root: Path) -> TeacherArtifacts:
    metrics = json.loads((root / "metrics.json").read_text())["metrics"]
    return TeacherArtifacts(yolo_weights=root / YOLO_FILE, llm_dir=root / LLM_DIR, metrics=metrics)


def ensure_teachers(world: World, preset: Literal["tiny", "full"], out_dir: str | Path,
                    retrain: bool = False) -> TeacherArtifacts:
    """The demo teachers for ``world``: shipped (full), cached (same fingerprint), or trained now."""
    _preset(preset)
    if preset == "full" and not retrain:
        verify_assets(ASSETS)
        stale = stale_teachers(json.loads((ASSETS / "metrics.json").read_text()), world.config, preset)
        if stale:
            raise AssetError(f"the shipped demo teachers ({ASSETS}) were trained for another world, knowledge "
                             f"base or training config (stale: {', '.join(stale)}): rebuild them with "
                             "`distillery demo --train-teachers`, or retrain only those with `python -m "
                             f"demo.teachers --world WORLD_DIR --out {ASSETS} --only {stale[0]}` then `--only evaluate`")
        return check_floor(load_artifacts(ASSETS))
    root = Path(out_dir) / f"{preset}-{fingerprint(world.config, preset)}"
    if (root / "metrics.json").exists() and not retrain:
        verify_assets(root)
        return load_artifacts(root)
    shutil.rmtree(root, ignore_errors=True)  # half-trained leftovers have no metrics.json
    tmp = root.with_name(root.name + ".training")
    shutil.rmtree(tmp, ignore_errors=True)
    train_teachers(world, preset, tmp)
    tmp.rename(root)
    art = load_artifacts(root)
    return check_floor(art) if preset == "full" else art  # tiny: a plumbing check, no floor


def check_floor(art: TeacherArtifacts) -> TeacherArtifacts:
    """Warn loudly when a teacher is below the quality floor (distilling it would mean little)."""
    low = {k: art.metrics.get(k) for k, floor in FLOOR.items() if (art.metrics.get(k) or 0.0) < floor}
    if low:
        warnings.warn(f"demo teachers below the quality floor {FLOOR}: {low}", stacklevel=2)
    return art


def _cli() -> None:
    ap = argparse.ArgumentParser(description="Train the demo teachers on the demo world.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--world", type=Path, required=True, help="Where the world is (built if absent).")
    ap.add_argument("--out", type=Path, required=True, help="Where the weights and metrics go.")
    ap.add_argument("--only", choices=["yolo", "llm", "all", "evaluate"], default="all",
                    help="Train one teacher (for parallel runs), or only evaluate and finalize.")
    args = ap.parse_args()
    world = build_world(WorldConfig.preset(args.preset), args.world)
    if args.only == "evaluate":
        art = evaluate_and_finalize(world, args.preset, args.out)
    else:
        art = train_teachers(world, args.preset, args.out, only=args.only)
    print(json.dumps(art.metrics, indent=1))


if __name__ == "__main__":
    _cli()
