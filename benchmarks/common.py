"""What the student benchmarks share: their arguments, the demo workdir, the student under test
(``--student``, else the demo's pulled one, else one trained now) and the test inputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL_SPEEDUP_B1 = 20.0


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "full"], default="full")
    ap.add_argument("--workdir", type=Path, default=None, help="demo workdir (default: the demo's own)")
    ap.add_argument("--student", type=Path, default=None, help="a student folder (trained or pulled)")
    return ap


def workdir_of(args) -> Path:
    from distillery.demo.pipeline import default_workdir

    wd = Path(args.workdir or default_workdir()).resolve()
    if args.preset == "tiny" and args.workdir is None:
        wd = wd.with_name(wd.name + "-tiny")  # never touch a full demo with a tiny benchmark
    wd.mkdir(parents=True, exist_ok=True)
    return wd


def get_student(args, workdir: Path) -> Path:
    """--student, else the demo's pulled student, else train one on the demo's train traces."""
    from distillery.demo.fidelity import demo_setup, record_split
    from distillery.students.training.train import train

    if args.student is not None:
        return args.student
    report = workdir / "report.json"
    if report.exists():
        rep = json.loads(report.read_text())
        pulled = rep.get("paths", {}).get("pulled_student")
        if rep.get("preset") == args.preset and pulled and Path(pulled).exists():
            return Path(pulled)
    out = workdir / "bench-student"
    if (out / "model.safetensors").exists():
        return out
    world, spec = demo_setup(workdir, args.preset)
    traces = workdir / "traces-train.lance"
    record_split(spec, world, "train", traces)
    print(f"training a student on {traces} -> {out}", flush=True)
    return train(spec, str(traces), out_dir=out, progress=False).out_dir


def prepared(args) -> tuple[Path, object, object]:
    """(the student, the demo world, its spec) for parsed ``parser`` args, the process configured."""
    from distillery import runtime

    runtime.configure()
    from distillery.demo.fidelity import demo_setup

    workdir = workdir_of(args)
    student = get_student(args, workdir)
    world, spec = demo_setup(workdir, args.preset)
    return student, world, spec


def test_inputs(world, n: int) -> tuple[list[Path], list[str]]:
    reqs = world.annotations("test")["requests"][:n]
    return [world.split_dir("test") / r["image"] for r in reqs], [r["question"] for r in reqs]
