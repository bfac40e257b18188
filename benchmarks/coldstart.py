"""Cold start, peak memory and steady latency of the student as a user runs it: the torch
predictor vs the torch-free runtime (``students/serving/runtime.py``), each side in a fresh
process, in alternating rounds in one run; plus the size of what a phone ships and how often the
runtime's outputs equal the torch student's on the demo's test split.

    python -m benchmarks.coldstart [--preset tiny|full] [--workdir DIR] [--student DIR]
                                   [--rounds 5] [--steady 100] [--agreement 200]

The student: ``--student DIR``; else the one ``distillery demo`` pulled into the workdir (its
``report.json``; ``make demo`` makes one); with ``--preset tiny``, else one trained now.

Sides (each a fresh ``python`` process per round):

* ``torch onnx-int8``: ``StudentPredictor.load(folder)``, today's default path (torch imported,
  the int8 graphs on ONNX Runtime); ``torch eager``: the same on the torch student;
* ``runtime int8`` (the default: the .onnx int8 graphs) and ``runtime ort`` (the int8 graphs in
  ORT format, as a phone runs them): ``StudentRuntime.load(folder)``, no torch;
* ``cli torch onnx-int8`` / ``cli runtime``: ``distillery predict FOLDER --image --question``
  with ``--backend onnx-int8`` (before this runtime) and the default ``auto``.

Cold start: from the process's spawn to its first answer. Peak RSS: the process's whole life
(its VmHWM). Steady: median batch-1 latency over ``--steady`` requests after the first. Goals:
cold start <= 1.0 s, peak RSS <= 150 MB, steady latency no worse than the torch predictor on
the int8 graphs. Figures vary with the machine's load: compare sides within one run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# (A child process imports only the above and what its side needs, as a user's app would; the
# parent's other modules are imported where they are used.)

GOAL_COLD_S, GOAL_RSS_MB = 1.0, 150.0
SIDES = ("torch onnx-int8", "torch eager", "runtime int8", "runtime ort")
CLI_SIDES = {"cli torch onnx-int8": "onnx-int8", "cli runtime": "auto"}
PHONE_FILES = ("config.json", "tokenizer.json", "onnx/meta.json")  # + the ORT graphs


# -- a child process: one side, cold then steady ------------------------------------------------------
def child(side: str, folder: str, inputs: str, steady: int) -> None:
    """Answer the first request as a user's process does, then ``steady`` more; print the time
    of the first answer (epoch seconds) and the steady latencies."""
    pairs = json.loads(Path(inputs).read_text())
    if side.startswith("runtime"):
        from distillery.students.serving.runtime import StudentRuntime

        model = StudentRuntime.load(folder, graphs="ort" if side == "runtime ort" else "auto")
    else:
        from distillery.students.serving.predictor import StudentPredictor

        model = StudentPredictor.load(folder, backend="onnx-int8" if side == "torch onnx-int8" else "torch")
    first = model.predict([{"image": pairs[0][0], "question": pairs[0][1]}])[0]
    first_at = time.time()
    times = []
    for k in range(steady):
        image, question = pairs[(k + 1) % len(pairs)]
        t = time.perf_counter()
        model.predict([{"image": image, "question": question}])
        times.append(time.perf_counter() - t)
    print(json.dumps({"first_answer_at": first_at, "answer": first["answer"], "steady_s": times,
                      "torch_imported": "torch" in sys.modules, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: its own, not inherited from its parent at fork
    as ``ru_maxrss`` is)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ``distillery predict`` as a user runs it, its peak memory written last on stderr at exit
CLI_CODE = ("import atexit, runpy, sys\n"
            "from benchmarks.coldstart import peak_rss_mb\n"
            "atexit.register(lambda: print(f'peak_rss_mb {peak_rss_mb()}', file=sys.stderr))\n"
            "sys.argv = ['distillery', *sys.argv[1:]]\n"
            "runpy.run_module('distillery.cli', run_name='__main__')\n")


def spawn(cmd: list[str]) -> tuple[float, float, str, str]:
    """(spawn time, end of its output, stdout, stderr) of a process run to its end."""
    import subprocess

    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    t1 = time.time()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{err[-3000:]}")
    return t0, t1, out, err


def run_side(side: str, folder: Path, inputs: Path, steady: int) -> dict:
    import statistics

    if side in CLI_SIDES:  # the whole command: its answer is its last output
        image, question = json.loads(inputs.read_text())[0]
        t0, t1, out, err = spawn([sys.executable, "-c", CLI_CODE, "predict", str(folder), "--image", image,
                                  "--question", question, "--backend", CLI_SIDES[side]])
        rss = float(err.strip().splitlines()[-1].split()[-1])
        return {"cold_s": t1 - t0, "rss_mb": rss, "answer": json.loads(out)["answer"]}
    t0, _, out, _ = spawn([sys.executable, "-m", "benchmarks.coldstart", "--child", side, str(folder), str(inputs),
                           str(steady)])
    res = json.loads(out.strip().splitlines()[-1])
    return {"cold_s": res["first_answer_at"] - t0, "rss_mb": res["peak_rss_mb"], "answer": res["answer"],
            "steady_ms": 1e3 * statistics.median(res["steady_s"]), "torch_imported": res["torch_imported"]}


# -- the student, its inputs, what a phone ships --------------------------------------------------------
def find_student(args) -> tuple[Path, Path]:
    """(the student folder, the demo workdir it came from)."""
    from benchmarks.common import get_student, workdir_of

    workdir = workdir_of(args)
    if args.student is not None:
        return args.student, workdir
    report = workdir / "report.json"
    if report.exists():
        rep = json.loads(report.read_text())
        pulled = rep.get("paths", {}).get("pulled_student")
        if rep.get("preset") == args.preset and pulled and Path(pulled).exists():
            return Path(pulled), workdir
    if args.preset == "tiny":
        return get_student(args, workdir), workdir
    raise SystemExit(f"no trained demo student in {workdir}: run `make demo` (or `distillery demo --workdir "
                     f"{workdir}`), pass --student DIR, or --preset tiny to train a tiny one now")


def test_pairs(workdir: Path, preset: str, n: int) -> list[tuple[str, str]]:
    """(image path, question) of the demo's first ``n`` test requests."""
    report = workdir / "report.json"
    test_dir = json.loads(report.read_text()).get("paths", {}).get("inputs_test") if report.exists() else None
    if test_dir is None or not (Path(test_dir) / "requests.jsonl").exists():
        from distillery.demo.fidelity import demo_setup

        world, _ = demo_setup(workdir, preset)
        test_dir = world.split_dir("test")
    lines = (Path(test_dir) / "requests.jsonl").read_text().splitlines()[:n]
    return [(str(Path(test_dir) / r["image"]), r["question"]) for r in map(json.loads, lines)]


def with_ort(folder: Path, tmp: Path) -> Path:
    """The student folder with ORT-format graphs: itself when its export has them, else a copy
    (an older export) with them added."""
    import shutil

    from distillery.students.serving import graphs
    from distillery.students.serving.folder import student_dir

    src = student_dir(folder)
    meta = graphs.read_meta(src)
    if meta is None or "int8" not in meta:
        raise SystemExit(f"{src}: no current int8 ONNX graphs (training writes them)")
    if graphs.has_ort(src, meta):
        return src
    copy = shutil.copytree(src, tmp / "student", ignore=shutil.ignore_patterns("checkpoints"))
    meta["ort"] = graphs.write_ort(copy / graphs.ONNX_DIR, meta)
    (copy / graphs.ONNX_DIR / graphs.META_FILE).write_text(json.dumps(meta, indent=1))
    print(f"(the export predates ORT graphs: measuring a copy with them, {copy})")
    return copy


def phone_bytes(folder: Path) -> dict[str, int]:
    """What a phone app ships: the ORT graphs, the tokenizer and the two JSON files."""
    from distillery.students.serving import graphs

    meta = graphs.read_meta(folder)
    files = [folder / graphs.ONNX_DIR / meta["ort"][k] for k in ("vision", "text", "step")]
    files += [folder / f for f in PHONE_FILES]
    return {str(f.relative_to(folder)): f.stat().st_size for f in files}


def agreement(folder: Path, pairs: list[tuple[str, str]]) -> dict:
    """How often the runtime's outputs equal the torch student's, on its default (int8)
    graphs and on its float graphs: answers, detected labels (as multisets), the top document;
    where the labels agree, the largest difference of a box from the nearest torch box of its
    label (normalized). And how often the default equals the torch predictor on the same int8
    graphs (today's ``distillery predict``) to the last digit."""
    from distillery.students.serving.predictor import StudentPredictor
    from distillery.students.serving.runtime import StudentRuntime

    reqs = [[{"image": image, "question": question}] for image, question in pairs]
    ref = [StudentPredictor.load(folder, backend="torch").predict(r)[0] for r in reqs]
    out = {"inputs": len(pairs)}
    for name, graph_set in (("int8", "auto"), ("float", "float")):
        runtime = StudentRuntime.load(folder, graphs=graph_set)
        got = [runtime.predict(r)[0] for r in reqs]
        out[name] = compare(got, ref)
        if name == "int8":
            today = StudentPredictor.load(folder, backend="onnx-int8")
            out["identical_to_torch_predictor_int8"] = sum(g == today.predict(r)[0] for g, r in zip(got, reqs)) / len(reqs)
    return out


def compare(got: list[dict], ref: list[dict]) -> dict:
    import numpy as np

    same = {"same_answer": 0, "same_labels": 0, "same_top_document": 0}
    box_diff = 0.0
    for a, b in zip(got, ref):
        same["same_answer"] += a["answer"] == b["answer"]
        nodes = [n for n, out in a.items() if isinstance(out, dict)]
        labels = all(sorted(a[n]["labels"]) == sorted(b[n]["labels"]) for n in nodes if "labels" in a[n])
        same["same_labels"] += labels
        same["same_top_document"] += all(a[n]["ids"][:1] == b[n]["ids"][:1] for n in nodes if "ids" in a[n])
        for n in (n for n in nodes if labels and a[n].get("boxes")):  # each box vs its nearest of its label
            for box, label in zip(a[n]["boxes"], a[n]["labels"]):
                others = [o for o, lb in zip(b[n]["boxes"], b[n]["labels"]) if lb == label]
                box_diff = max(box_diff, min(float(np.abs(np.subtract(box, o)).max()) for o in others))
    return {**{k: v / max(len(got), 1) for k, v in same.items()}, "max_box_diff": round(box_diff, 4)}


# -- the run --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    import tempfile

    from benchmarks.common import parser

    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (each side once a round)")
    ap.add_argument("--steady", type=int, default=100, help="requests timed after the first, per process")
    ap.add_argument("--agreement", type=int, default=200, help="test requests compared with the torch student")
    args = ap.parse_args(argv)
    from distillery import runtime

    runtime.configure()
    student, workdir = find_student(args)
    pairs = test_pairs(workdir, args.preset, max(args.agreement, args.steady + 1))
    with tempfile.TemporaryDirectory(prefix="distillery-coldstart-") as tmp:
        folder = with_ort(student, Path(tmp))
        inputs = Path(tmp) / "inputs.json"
        inputs.write_text(json.dumps(pairs[: args.steady + 1]))
        sides = list(SIDES) + list(CLI_SIDES)
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:  # alternate the order too
                runs[side].append(run_side(side, folder, inputs, args.steady))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{s} {runs[s][-1]['cold_s']:.2f} s" for s in sides),
                  flush=True)
        out = summarize(runs, folder, args)
        out["phone_files"] = phone_bytes(folder)
        out["phone_bundle_mb"] = round(sum(out["phone_files"].values()) / 2**20, 2)
        out["agreement"] = a = agreement(folder, pairs[: args.agreement])
        for name in ("int8", "float"):  # (flat keys: the RESULTS.md rows)
            out |= {f"{name}_{k}": v for k, v in a[name].items()}
        out["int8_identical_to_torch_predictor"] = a["identical_to_torch_predictor_int8"]
    report(out)
    return out


def summarize(runs: dict[str, list[dict]], folder: Path, args) -> dict:
    import statistics

    med = lambda side, key: statistics.median(r[key] for r in runs[side])  # noqa: E731
    sides = {s: {"cold_s": round(med(s, "cold_s"), 3), "peak_rss_mb": round(med(s, "rss_mb"), 1),
                 **({"steady_ms": round(med(s, "steady_ms"), 2)} if "steady_ms" in runs[s][0] else {}),
                 "cold_s_rounds": [round(r["cold_s"], 3) for r in runs[s]]} for s in runs}
    answers = {s: {r["answer"] for r in runs[s]} for s in runs}
    rt, today = sides["runtime int8"], sides["torch onnx-int8"]
    return {"student_dir": str(folder), "preset": args.preset, "rounds": args.rounds, "sides": sides,
            "runtime_cold_s": rt["cold_s"], "runtime_peak_rss_mb": rt["peak_rss_mb"],
            "runtime_steady_ms": rt["steady_ms"], "cli_runtime_cold_s": sides["cli runtime"]["cold_s"],
            "cli_runtime_peak_rss_mb": sides["cli runtime"]["peak_rss_mb"],
            "cold_speedup": round(today["cold_s"] / rt["cold_s"], 2),
            "cli_cold_speedup": round(sides["cli torch onnx-int8"]["cold_s"] / sides["cli runtime"]["cold_s"], 2),
            "rss_ratio": round(today["peak_rss_mb"] / rt["peak_rss_mb"], 2),
            "steady_ratio": round(rt["steady_ms"] / today["steady_ms"], 3),
            "runtime_torch_free": not any(r["torch_imported"] for s in ("runtime ort", "runtime int8") for r in runs[s]),
            "same_first_answer": len(set().union(*answers.values())) == 1,
            "load_average": os.getloadavg()[0]}


def report(out: dict) -> None:
    print(f"{'side':>20}  {'cold start':>10}  {'peak RSS':>9}  {'steady b1':>9}")
    for side, s in out["sides"].items():
        steady = f"{s['steady_ms']:7.2f} ms" if "steady_ms" in s else f"{'-':>9}"
        print(f"{side:>20}  {s['cold_s']:8.2f} s  {s['peak_rss_mb']:6.0f} MB  {steady}")
    ok = lambda met: "met" if met else "NOT met"  # noqa: E731
    print(f"runtime: cold start {out['runtime_cold_s']:.2f} s (goal <= {GOAL_COLD_S} s: "
          f"{ok(out['runtime_cold_s'] <= GOAL_COLD_S)}), peak RSS {out['runtime_peak_rss_mb']:.0f} MB (goal <= "
          f"{GOAL_RSS_MB:.0f} MB: {ok(out['runtime_peak_rss_mb'] <= GOAL_RSS_MB)}), steady {out['runtime_steady_ms']:.2f} ms "
          f"= {out['steady_ratio']:.2f}x the torch predictor's int8 path (goal <= 1: {ok(out['steady_ratio'] <= 1.0)})")
    print(f"vs the torch predictor (int8 graphs): cold start {out['cold_speedup']:.1f}x faster, peak RSS "
          f"{out['rss_ratio']:.1f}x smaller; distillery predict: {out['cli_cold_speedup']:.1f}x faster "
          f"({out['cli_runtime_cold_s']:.2f} s, {out['cli_runtime_peak_rss_mb']:.0f} MB)")
    print(f"phone bundle (ORT graphs + tokenizer + meta): {out['phone_bundle_mb']:.2f} MB; torch never imported by "
          f"the runtime: {out['runtime_torch_free']}; same first answer on every side: {out['same_first_answer']}")
    a = out["agreement"]
    for name in ("int8", "float"):
        g = a[name]
        print(f"runtime ({name} graphs) vs torch student on {a['inputs']} test requests: same answer "
              f"{g['same_answer']:.3f}, same labels {g['same_labels']:.3f}, same top document "
              f"{g['same_top_document']:.3f}, largest box difference {g['max_box_diff']} (normalized)")
    print(f"runtime (int8) identical to the torch predictor on the int8 graphs: {a['identical_to_torch_predictor_int8']:.3f}")
    print(f"(load average {out['load_average']:.1f} on {os.cpu_count()} CPUs during the run)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one side in a fresh process: SIDE FOLDER INPUTS STEADY
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
