"""Fidelity per node and retained accuracy: the student on the demo world's test split and on a
fresh world (a seed the demo never trained on) as an extra held-out set.

    python -m benchmarks.fidelity [--preset tiny|full] [--student DIR] [--workdir DIR] [--seed 12345]
"""

from __future__ import annotations

from benchmarks.common import get_student, parser, workdir_of

FRESH_SEED = 12345


def headline(report: dict) -> dict:
    """The runner's keys from one evaluation report."""
    s_t, ret = report["student_vs_teacher"], report.get("retained", {})
    det = [n for n in report["nodes"] if "map50" in s_t.get(n, {})]
    llm = [n for n in report["nodes"] if "answer_em" in ret.get(n, {})]
    out = {"answer_retained": ret[llm[-1]]["answer_em"] if llm else None,
           "detection_map50_vs_teacher": s_t[det[0]]["map50"] if det else None}
    for comp in ("student_vs_teacher", "student_vs_truth", "teacher_vs_truth", "retained"):
        for node, metrics in report.get(comp, {}).items():
            out |= {f"{comp}.{node}.{k}": v for k, v in metrics.items() if k != "n"}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--seed", type=int, default=FRESH_SEED, help="world seed of the extra held-out set")
    args = ap.parse_args(argv)
    from distillery import runtime

    runtime.configure()
    from distillery.demo.fidelity import run_eval

    workdir = workdir_of(args)
    student = get_student(args, workdir)
    test = run_eval(str(student), "test", workdir=workdir, preset=args.preset)
    fresh = run_eval(str(student), "test", workdir=workdir, preset=args.preset, seed=args.seed)
    out = headline(test)
    out["fresh_seed"] = {"seed": args.seed, **headline(fresh)}
    out["by_type"] = test.get("by_type", {})
    out["n_records"] = {"test": test["n_records"], f"seed{args.seed}": fresh["n_records"]}
    print(f"answer retained {out['answer_retained']} (goal >= 0.97); detection mAP50 vs teacher "
          f"{out['detection_map50_vs_teacher']} (goal >= 0.85); fresh seed {args.seed}: answer retained "
          f"{out['fresh_seed']['answer_retained']}, mAP50 vs teacher {out['fresh_seed']['detection_map50_vs_teacher']}")
    return out


if __name__ == "__main__":
    main()
