"""A student's fidelity on a split of the demo world: ``distillery eval MODEL --split test``.

The demo world's splits are inputs folders with labels in the users' formats (a COCO
``annotations.json``, ``answer`` / ``type`` / ``documents`` on the ``requests.jsonl`` lines), so
the demo evaluates through the generic path, ``students.evaluation.fidelity.evaluate_inputs``,
like any user's held-out set; this module only sets the world, teachers, spec and trace store up.

    report = run_eval("models:/shapes-full@champion", "test")   # or a student folder
    world, spec = demo_setup(workdir, "full")                    # the world and teachers the demo uses
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

from distillery import runtime


def demo_setup(workdir: Path, preset: str, seed: int | None = None):
    """The demo world (``seed``: a fresh one) and its teachers under ``workdir``; (world, spec)."""
    from distillery.demo.pipeline import write_spec
    from distillery.demo.teachers import ensure_teachers
    from distillery.demo.world import WorldConfig, build_world
    from distillery.flows.spec import load_spec

    report = workdir / "report.json"
    if seed is None and report.exists() and json.loads(report.read_text()).get("preset") not in (None, preset):
        raise ValueError(f"{workdir} holds a demo of another preset; pass --preset "
                         f"{json.loads(report.read_text())['preset']} or another --workdir")
    cfg = WorldConfig.preset(preset) if seed is None else WorldConfig.preset(preset, seed=seed)
    world = build_world(cfg, workdir / ("world" if seed is None else f"world-seed{seed}"))
    base_world = world if seed is None else build_world(WorldConfig.preset(preset), workdir / "world")
    teachers = ensure_teachers(base_world, preset, workdir / "teachers")
    name = "spec.yaml" if seed is None else f"spec-seed{seed}.yaml"
    spec_path = write_spec(workdir / name, f"shapes-{preset}", teachers.yolo_weights, world.kb_path,
                           teachers.llm_dir, preset)
    return world, load_spec(spec_path)


def split_traces(workdir: Path, split: str, seed: int | None = None) -> Path:
    """Where the demo keeps a split's traces (``distillery demo`` records train and test there)."""
    return workdir / f"traces-{split if seed is None else f'seed{seed}-{split}'}.lance"


def record_split(spec, world, split: str, traces: Path) -> list:
    """The split's teacher records (recorded now unless the store already holds them)."""
    from distillery.teachers.record import record
    from distillery.teachers.store import TraceStore

    summary = record(spec, str(world.split_dir(split)), str(traces))
    return TraceStore(str(traces)).read(fingerprint=summary.fingerprint, status="ok")


@contextlib.contextmanager
def student_folder(model: str | Path) -> Iterator[Path]:
    """A student folder as is; a registry reference pulled into a temporary folder."""
    if Path(model).is_dir():
        yield Path(model)
        return
    from distillery.registry.pull import pull

    with tempfile.TemporaryDirectory(prefix="distillery-eval-") as tmp:
        yield pull(str(model), Path(tmp) / "pulled")


def run_eval(model: str | Path, split: str = "test", workdir: Path | None = None, preset: str = "full",
             seed: int | None = None, log: bool = False) -> dict[str, Any]:
    """Evaluate a registered model (or a student folder) on a split of the demo world; print a
    table and return the report. ``workdir`` (default: the demo's) keeps the world, teachers and
    traces, so a run after ``distillery demo`` reuses them; ``seed``: a fresh world instead."""
    from distillery.demo.pipeline import default_workdir
    from distillery.registry.models import use_store
    from distillery.registry.tracking import log_evaluation
    from distillery.students.evaluation.fidelity import evaluate_inputs, print_table

    runtime.configure()
    workdir = Path(workdir or default_workdir()).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    world, spec = demo_setup(workdir, preset, seed)
    use_store(spec.registry.resolve_tracking_uri(workdir / "runs"))  # the demo's registry
    with student_folder(model) as folder:
        report = evaluate_inputs(folder, world.split_dir(split), str(split_traces(workdir, split, seed)), spec)
    report |= {"model": str(model), "split": split, "preset": preset, "seed": world.config.seed}
    print_table(report, title=f"{model} on {preset} world (seed {world.config.seed}), split {split}")
    if log:
        report["mlflow_run_id"] = log_evaluation(report)
    return report
