"""Student vs the full teacher graph on the same demo test inputs: parameters, peak memory,
latency per image at batch 1 and 16, as ratios (graph / student), measured in one process (on the CPU,
and also on the GPU when there is one).

    python -m benchmarks.student [--preset tiny|full] [--student DIR] [--workdir DIR] [--device cpu|cuda]

The student: ``--student DIR``; else the one ``distillery demo`` pulled into ``--workdir``
(its ``report.json``); else one trained now on the demo world's train traces.

Both sides run on ``--device`` (default: cpu, where the >= 20x goal at batch 1 is set), the
teacher nodes included, even on a machine with a GPU; the output records it. On the CPU the
student runs as it is deployed: on ONNX Runtime where its folder holds the export
(``students/onnx.py``; training writes it), and then on eager torch too, against the same graph run.
Each side's batch-1 request is also broken down, stage by stage and node by node (``benchmarks.breakdown``).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import GOAL_SPEEDUP_B1, parser, prepared, test_inputs


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--inputs", type=int, default=16, help="distinct test requests to time on")
    ap.add_argument("--device", default="cpu", help="torch device of the student and every teacher node")
    ap.add_argument("--rounds", type=int, default=5, help="alternating student/graph rounds for the paired speed-up")
    args = ap.parse_args(argv)
    student, world, spec = prepared(args)
    from distillery.students.evaluation.efficiency import measure

    images, questions = test_inputs(world, args.inputs)
    res = measure(student, spec, images, questions, batch_sizes=(1, 16), device=args.device)
    out = {**res["ratios"], "student": res["student"], "graph": res["graph"], "student_dir": str(student),
           "preset": args.preset, "device": res["device"], "backend": res["student"]["backend"]}
    report(res)
    from distillery.students.evaluation.efficiency import paired_speedup

    paired = paired_speedup(student, spec, images, questions, rounds=args.rounds, device=args.device)
    out["speedup_batch1_paired"], out["paired"] = paired["speedup"], paired
    print(f"speedup b1 in {paired['rounds']} alternating rounds (student {paired['backend']}): median "
          f"{paired['speedup']:.1f}x (goal >= {GOAL_SPEEDUP_B1:.0f}x); rounds "
          + ", ".join(f"{x:.1f}" for x in paired["speedups"]))
    from benchmarks.breakdown import breakdown, report as report_breakdown

    out["breakdown"] = breakdown(student, spec, images, questions)  # where each side's batch-1 request goes
    report_breakdown(out["breakdown"])
    if res["student"]["backend"] != "torch":  # the same student on eager torch, against the same graph run
        from distillery.students.evaluation.efficiency import compare, measure_student

        eager = measure_student(student, images, questions, batch_sizes=(1, 16), device=args.device, backend="torch")
        out["torch"] = {**compare(eager, res["graph"]), "student": eager}
        report({"student": eager, "graph": res["graph"], "ratios": out["torch"], "device": res["device"]})
        out["backend_vs_torch"] = backend_agreement(student, *test_inputs(world, 200), res["student"]["backend"])
        a = out["backend_vs_torch"]
        print(f"{res['student']['backend']} vs torch on {a['inputs']} test requests: same answer {a['same_answer']:.3f}, "
              f"same detected labels {a['same_labels']:.3f}, same top document {a['same_top_document']:.3f}")
    import torch

    if args.device == "cpu" and torch.cuda.is_available():  # the same figures on the GPU, in the same run
        gpu = measure(student, spec, images, questions, batch_sizes=(1, 16), device="cuda")
        out["cuda"] = {**gpu["ratios"], "student": gpu["student"], "graph": gpu["graph"]}
        report(gpu)
    return out


def backend_agreement(student: Path, images: list[Path], questions: list[str], backend: str) -> dict:
    """How often the backend's outputs equal the torch student's (int8 quantization may change
    some): answers, detected labels (as multisets), the top retrieved document."""
    from distillery.students.serving.folder import student_dir
    from distillery.students.serving.predictor import StudentPredictor

    folder = student_dir(student)
    fast, ref = StudentPredictor.load(folder, backend=backend), StudentPredictor.load(folder, backend="torch")
    same = {"same_answer": 0, "same_labels": 0, "same_top_document": 0}
    for image, question in zip(images, questions):
        req = [{"image": str(image), "question": question}]
        (a,), (b,) = fast.predict(req), ref.predict(req)
        same["same_answer"] += a["answer"] == b["answer"]
        nodes = [n for n, out in a.items() if isinstance(out, dict)]  # ("answer" is the final text)
        same["same_labels"] += all(sorted(a[n]["labels"]) == sorted(b[n]["labels"]) for n in nodes if "labels" in a[n])
        same["same_top_document"] += all(a[n]["ids"][:1] == b[n]["ids"][:1] for n in nodes if "ids" in a[n])
    return {"inputs": len(images), **{k: v / max(len(images), 1) for k, v in same.items()}}


def report(res: dict) -> None:
    for side in ("student", "graph"):
        s = res[side]
        name = f"student ({s['backend']})" if side == "student" else side
        print(f"{name:>16}: {s['parameters']:>12,d} params  peak {s['peak_memory_bytes'] / 2**20:8.1f} MiB  "
              f"b1 {s['latency_b1_s'] * 1e3:8.2f} ms/img  b16 {s['latency_b16_s'] * 1e3:8.2f} ms/img")
    r = res["ratios"]
    print(f"on {res['device']}, student on {res['student']['backend']}: speedup b1 {r['speedup_batch1']:.1f}x (goal >= {GOAL_SPEEDUP_B1:.0f}x on the CPU), "
          f"b16 {r['speedup_batch16']:.1f}x, params {r['param_ratio']:.1f}x, memory {r['memory_ratio']:.1f}x")


if __name__ == "__main__":
    main()
