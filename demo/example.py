"""`distillery example DIR`: a small example the record command runs on, built here, offline.

``build_example(DIR)`` writes (and a second call reuses what is there)::

    DIR/world/            the tiny demo world (demo/world.py): generated images + requests.jsonl
                          per split, the documents (kb.jsonl), ground truth
    DIR/teachers/tiny-*/  the tiny YOLO segmenter and reasoning LLM the project trains itself
                          (demo/teachers.py), cached by a fingerprint of the world and configs
    DIR/spec.yaml         the teacher graph over them (demo/pipeline.py ``write_spec``)

and returns the commands that run on it: ``distillery record DIR/spec.yaml --inputs
DIR/world/train --traces DIR/traces.lance`` first. Its eval command is the generic one
(``--inputs DIR/world/test``, whose requests.jsonl and COCO annotations.json are labelled the
way a user's held-out set is). DIR is laid out like a demo workdir, so ``distillery eval
STUDENT --workdir DIR --preset tiny`` reuses its world and teachers too.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

PRESET = "tiny"
SPEC_NAME = f"shapes-{PRESET}"  # what demo.fidelity.demo_setup (distillery eval --workdir DIR) writes too
SPLIT = "train"  # the inputs the record command reads; eval measures on "test"
EVAL_SPLIT = "test"


def _cmd(*args: Any) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def build_example(directory: str | Path) -> dict[str, Any]:
    """Build (or reuse) the example in ``directory``; returns its paths and the commands."""
    from distillery.demo.pipeline import write_spec
    from distillery.demo.teachers import ensure_teachers, fingerprint
    from distillery.demo.world import WorldConfig, build_world
    from distillery import runtime

    runtime.configure()
    # Absolute: Ultralytics puts a relative training folder under its own runs dir.
    root = Path(directory).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = WorldConfig.preset(PRESET)
    world_reused = (root / "world" / "world.json").exists()
    world = build_world(cfg, root / "world")
    teachers_root = root / "teachers" / f"{PRESET}-{fingerprint(world.config, PRESET)}"
    teachers_reused = (teachers_root / "metrics.json").exists()
    teachers = ensure_teachers(world, PRESET, root / "teachers")
    spec = write_spec(root / "spec.yaml", SPEC_NAME, teachers.yolo_weights, world.kb_path, teachers.llm_dir, PRESET)
    inputs, traces = world.split_dir(SPLIT), root / "traces.lance"
    record = _cmd("distillery", "record", spec, "--inputs", inputs, "--traces", traces)
    return {
        "dir": str(root), "spec": str(spec), "inputs": str(inputs), "traces": str(traces),
        "documents": str(world.kb_path), "yolo_weights": str(teachers.yolo_weights),
        "llm": str(teachers.llm_dir),
        "images": sum(1 for _ in (inputs / "images").glob("*.png")),
        "requests": sum(1 for line in world.requests_path(SPLIT).read_text().splitlines() if line.strip()),
        "reused": {"world": world_reused, "teachers": teachers_reused},
        "seconds": round(time.perf_counter() - t0, 1),
        "commands": {
            "record": record,
            "record_json": f"{record} --json",
            "train": _cmd("distillery", "train", spec, "--traces", traces, "--out", root / "student"),
            "eval": _cmd("distillery", "eval", root / "student", "--inputs", world.split_dir(EVAL_SPLIT),
                         "--traces", root / f"traces-{EVAL_SPLIT}.lance", "--spec", spec),
        },
    }
