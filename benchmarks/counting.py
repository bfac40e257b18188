"""Counting, scene by scene: how many objects the teacher's detector, the student's and the labels
see in each image of a demo split. Where the student's answers differ from the teacher's, this
says whether the counts behind them do, and which side the labels take.

    python -m benchmarks.counting --student DIR [--seed 12345] [--workdir DIR]   # a fresh world
    python -m benchmarks.counting --student DIR --seed 0                         # the demo's test split

Prints, per number of objects the teacher saw: scenes, scenes where the student's (class, count)
pairs differ from the teacher's, and where the student's equal the labels; and how many scenes each
side counts exactly as the labels do.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import parser, workdir_of


def scene_counts(images: Sequence[str], teacher: Sequence[Sequence[str]], student: Sequence[Sequence[str]],
                 truth: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Per scene (records of one image counted once), the detected labels of each side against the
    labels: ``by_teacher_n[n] = {"scenes", "student_differs", "student_true"}``, and the scenes each
    side counts exactly right (``teacher_true``, ``student_true``)."""
    if not len(images) == len(teacher) == len(student) == len(truth):
        raise ValueError(f"scene_counts: {len(images)} images, {len(teacher)} teacher, {len(student)} student "
                         f"and {len(truth)} true label lists")
    scenes = {img: (Counter(t), Counter(s), Counter(g)) for img, t, s, g in zip(images, teacher, student, truth)}
    by_n: dict[int, dict[str, int]] = {}
    for t, s, g in scenes.values():
        row = by_n.setdefault(sum(t.values()), {"scenes": 0, "student_differs": 0, "student_true": 0})
        row["scenes"] += 1
        row["student_differs"] += s != t
        row["student_true"] += s == g
    return {"scenes": len(scenes), "teacher_true": sum(t == g for t, _, g in scenes.values()),
            "student_true": sum(s == g for _, s, g in scenes.values()), "by_teacher_n": dict(sorted(by_n.items()))}


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--seed", type=int, default=12345, help="world seed (0: the demo's own world)")
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)
    if args.student is None:
        ap.error("--student: the student folder to look at")
    from distillery import runtime

    runtime.configure()
    from distillery.demo.fidelity import demo_setup, split_traces
    from distillery.students.evaluation.fidelity import (class_names, graph_fingerprint, held_out_records,
                                                         load_predictor, read_schema)
    from distillery.students.evaluation.metrics import predict_records
    from distillery.students.evaluation.truth import align, node_types, read_labels

    workdir = workdir_of(args)
    seed = args.seed or None
    world, spec = demo_setup(workdir, args.preset, seed)
    inputs = world.split_dir(args.split)
    labels = read_labels(inputs)
    records = held_out_records(inputs, str(split_traces(workdir, args.split, seed)), labels,
                               graph_fingerprint(args.student, spec), spec)
    records = [r for r in records if r.status == "ok"]
    truth = align(labels, spec, records, class_names(read_schema(args.student))).outputs
    det = next(n for n, kind in node_types(spec).items() if kind == "yolo")
    preds = predict_records(load_predictor(args.student), records)
    out = scene_counts([r.image_path for r in records], [r.outputs[det]["labels"] for r in records],
                       [p[det]["labels"] for p in preds], [(t or {}).get(det, {}).get("labels", []) for t in truth])
    print(f"{args.student} on {args.split} (world seed {world.config.seed}): {out['scenes']} scenes; counted "
          f"exactly as the labels: teacher {out['teacher_true']}, student {out['student_true']}")
    print("objects the teacher saw | scenes | student's counts differ | student's counts true")
    for n, row in out["by_teacher_n"].items():
        print(f"{n:>23} | {row['scenes']:>6} | {row['student_differs']:>23} | {row['student_true']:>21}")
    return out


if __name__ == "__main__":
    main()
