"""Offline only vs offline + on-policy distillation, at the same wall-clock budget, on the demo world.

Arm B ("on-policy") trains the preset's offline epochs, then ``training.on_policy`` rounds (the
student answers training inputs, the teacher ``llm`` node scores its tokens). Arm A ("offline")
trains offline only, for as many steps as fit in arm B's whole wall-clock time (measured: B's
offline seconds per step), so both get the same budget. Both students are then evaluated on the
test split and on a fresh world drawn with ``--seed`` (never trained on): answer agreement with the
teacher (overall and per question type), accuracy vs ground truth, retained accuracy, detection
mAP50 vs the teacher.

    python -m benchmarks.onpolicy --quick                       # tiny preset, a plumbing check
    python -m benchmarks.onpolicy --preset full --rounds 4 --samples 512 --steps 60 --lambda 0.5
    python -m benchmarks.onpolicy --train-images 1600           # twice the transfer set, same teachers
    python -m benchmarks.onpolicy --train-images 1600 --evaluate-only   # its two students evaluated again

Where the student and the teacher disagree, the figures also say which of them the ground truth
sides with (``who_is_right``) and the agreement over the answers the teacher got right.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from benchmarks.common import parser, workdir_of

FRESH_SEED = 12345


def figures(report: dict) -> dict:
    """The figures of one evaluation report that this comparison is about."""
    s_t, s_gt, ret = report["student_vs_teacher"], report.get("student_vs_truth", {}), report.get("retained", {})
    llm = [n for n in report["nodes"] if "answer_em" in s_t.get(n, {})][-1]
    det = [n for n in report["nodes"] if "map50" in s_t.get(n, {})]
    return {"answer_agreement": s_t[llm]["answer_em"], "answer_accuracy": s_gt.get(llm, {}).get("answer_em"),
            "answer_retained": ret.get(llm, {}).get("answer_em"),
            "detection_map50_vs_teacher": s_t[det[0]]["map50"] if det else None,
            "agreement_by_type": {t: row["student_vs_teacher"] for t, row in report.get("by_type", {}).items()},
            "who_is_right": report.get("who_is_right", {}).get(llm),
            "agreement_where_teacher_right_by_type": {t: row.get("agreement_where_teacher_right")
                                                      for t, row in report.get("by_type", {}).items()},
            "accuracy_by_type": {t: row.get("student_vs_truth") for t, row in report.get("by_type", {}).items()},
            "n": report.get("n_records")}


def with_training(spec, **training):
    return spec.model_copy(update={"training": type(spec.training).model_validate(
        spec.training.model_dump(mode="json", by_alias=True) | training)})


def train_arm(spec, traces: Path, out: Path) -> tuple[Path, dict, float, float]:
    """(student folder, metrics, wall seconds, seconds per offline step measured between step events)."""
    from distillery.students.training.train import train

    stamps: list[float] = []
    t0 = time.perf_counter()
    result = train(spec, str(traces), out_dir=out, progress=False,
                   callback=lambda e: stamps.append(time.perf_counter()) if e["event"] == "step" else None)
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return result.out_dir, result.metrics, time.perf_counter() - t0, per_step


def more_train_data(world, spec, traces: Path, n_images: int, workdir: Path) -> Path:
    """A trace store with the train split of the same world drawn with ``n_images`` train images:
    the demo's records copied (not recorded again), the new scenes recorded by the same graph."""
    import shutil

    from distillery.demo.fidelity import record_split
    from distillery.demo.world import build_world

    bigger = build_world(world.config.model_copy(update={"n_train": n_images}), workdir / f"world-train{n_images}")
    out = workdir / f"traces-train{n_images}.lance"
    if not out.exists():  # copied whole, then moved: a killed copy leaves no half store behind
        tmp = out.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(traces, tmp)
        tmp.rename(out)
    record_split(spec, bigger, "train", out)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 12 epochs, small rounds (minutes)")
    ap.add_argument("--seed", type=int, default=FRESH_SEED, help="world seed of the fresh held-out set")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--samples", type=int, default=None, help="student answers scored per round")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per round")
    ap.add_argument("--lambda", dest="lmbda", type=float, default=0.5, help="share of on-policy steps")
    ap.add_argument("--kind", choices=["forward", "reverse", "jsd"], default="jsd")
    ap.add_argument("--epochs", type=int, default=None, help="offline epochs of arm B (default: the preset's)")
    ap.add_argument("--train-images", type=int, default=None, help=(
        "train on the first N train images of the same world (default: the preset's 800): each scene is "
        "seeded by its index, so the first 800 are the demo's and the test and val splits do not change; "
        "the same teachers label the rest (a bigger transfer set)"))
    ap.add_argument("--evaluate-only", action="store_true", help=(
        "train nothing: evaluate the two students of the last run with these arguments again and "
        "rewrite its results.json (after a change to the evaluation)"))
    args = ap.parse_args(argv)
    if args.quick:
        args.preset = "tiny"
    from distillery import runtime

    runtime.configure()
    from distillery.demo.fidelity import demo_setup, record_split

    workdir = workdir_of(args)
    world, spec = demo_setup(workdir, args.preset)
    if args.train_images is not None and args.train_images < world.config.n_train:
        ap.error(f"--train-images {args.train_images}: at least the world's {world.config.n_train} train images")
    bench = workdir / ("bench-onpolicy" if not args.train_images else f"bench-onpolicy-train{args.train_images}")
    if args.evaluate_only:  # the stored students: nothing recorded or trained
        if not (bench / "results.json").is_file():
            ap.error(f"--evaluate-only: no earlier run in {bench} (run without it first)")
        out = json.loads((bench / "results.json").read_text())
        evaluate_arms(out, bench, {"offline": bench / "offline", "on_policy": bench / "onpolicy"}, workdir, args)
        return out
    traces = workdir / "traces-train.lance"
    record_split(spec, world, "train", traces)
    if args.train_images and args.train_images != world.config.n_train:
        traces = more_train_data(world, spec, traces, args.train_images, workdir)
    quick = args.quick
    op = {"enabled": True, "rounds": args.rounds or (2 if quick else 4), "samples_per_round":
          args.samples or (32 if quick else 512), "steps_per_round": args.steps or (4 if quick else 60),
          "gkd_lambda": args.lmbda, "kind": args.kind, "lr": spec.training.lr * 0.1}
    epochs = args.epochs or (12 if quick else spec.training.epochs)  # tiny's 1 epoch: a student that says nothing
    spec_b = with_training(spec, epochs=epochs, on_policy=op, onnx_export=False, agreement_every=0)
    print(f"arm B: {epochs} offline epoch(s) + on-policy {op}", flush=True)
    dir_b, metrics_b, seconds_b, per_step = train_arm(spec_b, traces, bench / "onpolicy")
    onp = metrics_b["on_policy"]
    offline_steps = metrics_b["steps"]
    # the same budget: B's offline steps + as many offline steps as B's on-policy phase took time for
    extra = int(onp.get("seconds", 0.0) / per_step) if per_step == per_step and per_step > 0 else 0
    steps_a = offline_steps + extra
    steps_per_epoch = math.ceil(offline_steps / epochs)
    spec_a = with_training(spec, epochs=math.ceil(steps_a / steps_per_epoch), max_steps=steps_a,
                           onnx_export=False, agreement_every=0)
    print(f"arm A: offline only, {steps_a} steps (B: {offline_steps} offline steps at {per_step:.2f} s/step + "
          f"on-policy {onp.get('seconds', 0.0):.0f} s)", flush=True)
    dir_a, metrics_a, seconds_a, _ = train_arm(spec_a, traces, bench / "offline")
    out = {"preset": args.preset, "fresh_seed": args.seed, "train_images": args.train_images or world.config.n_train,
           "on_policy_config": op,
           "teacher_calls": onp.get("teacher_calls"), "teacher_seconds": onp.get("teacher_seconds"),
           "on_policy_summary": {k: v for k, v in onp.items() if k != "per_round"}}
    out["steps"] = {"offline": steps_a, "on_policy": offline_steps + onp.get("steps", 0)}
    for arm, seconds in (("offline", seconds_a), ("on_policy", seconds_b)):
        out[arm] = {"train_seconds": round(seconds, 1)}
    evaluate_arms(out, bench, {"offline": dir_a, "on_policy": dir_b}, workdir, args)
    return out


def evaluate_arms(out: dict, bench: Path, folders: dict[str, Path], workdir: Path, args) -> None:
    """Each arm's student on the test split and the fresh world into ``out``; print; write
    ``bench``/results.json."""
    from distillery.demo.fidelity import run_eval

    for arm, folder in folders.items():
        test = run_eval(str(folder), "test", workdir=workdir, preset=args.preset)
        fresh = run_eval(str(folder), "test", workdir=workdir, preset=args.preset, seed=args.seed)
        out[arm] |= {"test": figures(test), f"seed{args.seed}": figures(fresh)}
    print_summary(out, args.seed)
    tmp = bench / "results.json.tmp"
    tmp.write_text(json.dumps(out, indent=2, default=float))
    tmp.replace(bench / "results.json")


def print_summary(out: dict, seed: int) -> None:
    from distillery.students.evaluation.fidelity import who_is_right_sentence

    a, b = out["offline"], out["on_policy"]
    s = out["on_policy_summary"]
    print(f"\nteacher calls in the on-policy phase: {out['teacher_calls']} ({out['teacher_seconds']:.1f} s); "
          f"{s.get('scored')}/{s.get('answered')} student answers scored, skipped: {s.get('skipped_why')}")
    if not s.get("answered"):
        print("no training record had a usable teacher answer (the tiny preset's LLM teacher does not finish its "
              "answers): a plumbing check only; run --preset full for figures")
    print(f"train seconds: offline {a['train_seconds']}, offline + on-policy {b['train_seconds']}")
    for split in ("test", f"seed{seed}"):
        fa, fb = a[split], b[split]
        for key in ("answer_agreement", "answer_accuracy", "answer_retained", "detection_map50_vs_teacher"):
            ratio = f"  ({fb[key] - fa[key]:+.4f})" if fa[key] is not None and fb[key] is not None else ""
            print(f"{split:>10} {key:<28} offline {fa[key]}  on-policy {fb[key]}{ratio}")
        for t in fb["agreement_by_type"]:
            print(f"{split:>10} agreement[{t}]{'':<{17 - len(t)}} offline {fa['agreement_by_type'].get(t)}  "
                  f"on-policy {fb['agreement_by_type'][t]}")
        for arm, f in (("offline", fa), ("on-policy", fb)):
            if f.get("who_is_right"):
                print(f"{split:>10} {arm}: {who_is_right_sentence(f['who_is_right'])}")


if __name__ == "__main__":
    main()
