"""Black-box teacher: the demo's reasoner behind an OpenAI-compatible server, distilled from its
top-k log-probs and from its text only, beside the white-box student.

    python -m benchmarks.blackbox [--workdir DIR] [--preset full]

It is the black-box stage of ``distillery demo --teacher openai`` (``demo/blackbox.py``) run on a
demo workdir whose white-box demo has run (``make demo``, or the benchmark runner's own demo):
it serves the reasoner on 127.0.0.1, records train and test through it in both modes, trains,
evaluates and registers a student per mode. A warm workdir reuses the recordings and the
registered students (then only the server starts). On the full preset a cold run records 3,000
requests twice and trains twice: ~45 minutes on 2 cores.

Prints each student's answer agreement with its teacher on the test split: the white-box student
(soft labels from the in-process LLM), ``topk`` (the server's top-20 log-probs mapped to ids), and
``text`` (hard labels: the answer text alone), with each black-box recording's requests, tokens
and seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="a demo workdir (default: the demo's own)")
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    args = ap.parse_args(argv)

    from distillery import runtime

    runtime.configure()
    from distillery.demo.blackbox import run_blackbox
    from distillery.demo.pipeline import DemoReport, default_workdir
    from distillery.demo.teachers import ensure_teachers
    from distillery.demo.world import WorldConfig, build_world

    workdir = Path(args.workdir or default_workdir()).resolve()
    report = workdir / "report.json"
    white = json.loads(report.read_text()) if report.is_file() else {}
    if white.get("preset") != args.preset or "student" not in white.get("figures", {}):
        raise SystemExit(f"{workdir}: no {args.preset} demo report with a student (run `make demo` or "
                         "`python -m benchmarks --only demo` there first)")
    rep = DemoReport(workdir=str(workdir), preset=args.preset, teacher="openai")
    rep.figures["student"] = white["figures"]["student"]
    world = build_world(WorldConfig.preset(args.preset), workdir / "world")
    teachers = ensure_teachers(world, args.preset, workdir / "teachers")
    with runtime.local_prefect():
        out = run_blackbox(rep, world, teachers, args.preset, workdir)
    figures: dict[str, Any] = {"answer_agreement": out["answer_agreement"]}
    for mode in ("topk", "text"):
        fig = out[mode]
        figures[mode] = {"answer_agreement": fig["answer_agreement"], "answer_retained": fig["answer_retained"],
                         "soft_label_share": fig["soft_labels"],
                         "teacher_answers_as_white_box": fig["teacher_answers_as_white_box"],
                         "record_train": fig["record_train"], "registered": fig["registered"].get("version"),
                         "reused": fig["reused"]}
    print(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
