"""Run every benchmark and write ``benchmarks/RESULTS.md``.

    python -m benchmarks [--quick] [--workdir DIR]     # or: make bench
    python -m benchmarks --only scale,blackbox         # the long ones, run on request

The demo runs first (cold, then warm) in DIR; the student and fidelity benchmarks then measure the
student it registered and pulled there.

Each benchmark is a module with ``main(argv) -> dict`` that prints its own figures; this runner
collects them, puts each figure beside its goal, and records the machine, date and commit.
``--quick`` uses the tiny preset (plumbing check; its figures do not meet the goals).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

# (module, figure key, goal text, check) — the goals from the issues, printed beside the figures.
GOALS = [
    ("record", "flow_over_direct", "<= 1.10", lambda v: v <= 1.10),
    ("record", "rerun_fraction", "<= 0.05", lambda v: v <= 0.05),
    ("record", "soft_label_bytes_per_token", "<= 128 B", lambda v: v <= 128),
    ("record", "prefect_server_startup_s", "(s, not counted above)", None),
    ("student", "speedup_batch1_paired", ">= 20x (median of alternating rounds)", lambda v: v >= 20),
    ("student", "speedup_batch1", "(one pass each)", None),
    ("student", "speedup_batch16", "(graph / student)", None),
    ("student", "param_ratio", "(graph / student)", None),
    ("student", "memory_ratio", "(graph / student)", None),
    ("fidelity", "answer_retained", ">= 0.97", lambda v: v >= 0.97),
    ("fidelity", "detection_map50_vs_teacher", ">= 0.85", lambda v: v >= 0.85),
    ("demo", "cold_s", "<= 900 s", lambda v: v <= 900),
    ("demo", "warm_s", "<= 180 s", lambda v: v <= 180),
    ("reliability", "corpus_bad_inputs", ">= 200 (every kind a feed produces)", lambda v: v >= 200),
    ("reliability", "corpus_crashes", "0", lambda v: v == 0),
    ("reliability", "corpus_bad_misclassified", "0 (each quarantined by its own reason)", lambda v: v == 0),
    ("reliability", "corpus_good_recorded", "(every good input)", None),
    ("reliability", "cli_kills", ">= 10 (SIGKILL of distillery record)", lambda v: v >= 10),
    ("reliability", "cli_processes_left", "0", lambda v: v == 0),
    ("reliability", "cli_records_exactly_once", "true", lambda v: v is True),
    ("reliability", "cli_versions_readable", "(every version)", None),
    ("reliability", "counted_extra_teacher_calls", "<= one shard per kill", None),
    ("reliability", "counted_extra_calls_within_bound", "true", lambda v: v is True),
    ("reliability", "registry_concurrent_errors", "0 (10 registrations at once, SQLite)", lambda v: v == 0),
    ("reliability", "registry_distinct_versions", "10", lambda v: v == 10),
    ("reliability", "registry_aliases_consistent", "true", lambda v: v is True),
    ("reliability", "train_killed_then_resumed_bit_identical", "true (same weights as a straight run)",
     lambda v: v is True),
    ("coldstart", "runtime_cold_s", "<= 1.0 s (process start to first answer)", lambda v: v <= 1.0),
    ("coldstart", "runtime_peak_rss_mb", "<= 150 MB", lambda v: v <= 150),
    ("coldstart", "steady_ratio", "<= 1.0 (runtime / torch predictor on the int8 graphs, batch 1)", lambda v: v <= 1.0),
    ("coldstart", "cold_speedup", "(torch predictor / runtime)", None),
    ("coldstart", "cli_runtime_cold_s", "(distillery predict, s)", None),
    ("coldstart", "phone_bundle_mb", "(ORT graphs + tokenizer + meta)", None),
    ("coldstart", "int8_same_answer", "(runtime vs torch student, 200 test requests)", None),
    ("coldstart", "float_same_answer", "1.0 (float graphs vs torch student)", lambda v: v == 1.0),
    ("coldstart", "int8_identical_to_torch_predictor", "1.0", lambda v: v == 1.0),
    ("dask_record", "dask2_over_dask1_speed", ">= 1.6 (records/s, 2 vs 1 worker process)", lambda v: v >= 1.6),
    ("dask_record", "dask1_over_local_time", "<= 1.10 (Dask, 1 worker / local runner)", lambda v: v <= 1.10),
    ("dask_record", "graph_loads_per_worker", "1 per worker (none after its first shard)", None),
    ("openai_record", "ratio_remote", ">= 5x (concurrency 8 / 1, remote-like server: +1.0 s a request)",
     lambda v: v >= 5),
    ("openai_record", "ratio_local", "(the LLM computed on this machine: its CPU is the limit)", None),
    ("serve_http", "http_over_in_process_p50", "(HTTP p50 / in-process p50, concurrency 1)", None),
    ("serve_http", "c8_over_c1_rps", "(requests/s at concurrency 8 / 1)", None),
]
# Per-node figures shown without a goal: fidelity vs the teacher, and retained accuracy
# (student vs truth / teacher vs truth), on the test split and on a fresh world seed.
PER_NODE = ("student_vs_teacher.", "retained.", "student_vs_truth.", "teacher_vs_truth.")
# demo first: its cold run leaves the pulled student that `student` and `fidelity` measure, in the
# same workdir, so one student is trained, not two.
MODULES = ["demo", "record", "student", "fidelity", "coldstart", "serve_http", "openai_record", "dask_record", "reliability"]
# Long runs, only on request (``--only scale,blackbox``): the realistic-scale graph (~20 min), the
# black-box demo's two extra recordings and trainings (~45 min cold), students from pretrained
# parts (~20 min) and offline vs on-policy training (~40 min); their figures are kept from the
# results file when other benchmarks run.
ON_REQUEST = ["scale", "blackbox", "pretrained", "onpolicy", "onpolicy_data", "vision_encoder"]
SHARES_WORKDIR = {"demo", "student", "fidelity", "coldstart", "serve_http", "blackbox", "pretrained", "onpolicy",
                  "onpolicy_data"}
HERE = Path(__file__).parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_all(quick: bool, workdir: Path, only: list[str] | None = None) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name in only or MODULES:
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError:
            results[name] = {"error": "not available yet"}
            continue
        print(f"== {name}", flush=True)
        try:
            if name == "scale":  # its own sizes; the demo's rows come from the shared workdir
                argv = (["--quick"] if quick else []) + ["--demo-workdir", str(workdir)]
            else:
                argv = ["--preset", "tiny"] if quick else []
                argv += ["--workdir", str(workdir)] if name in SHARES_WORKDIR else []
            results[name] = {**mod.main(argv), "ran": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {commit()}"}
        except Exception as e:  # one failing benchmark must not lose the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def render(results: dict[str, dict], quick: bool) -> str:
    lines = ["# Benchmark results", "",
             f"- machine: {machine()}", f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- commit: {commit()}", f"- command: `python -m benchmarks{' --quick' if quick else ''}`", "",
             "| benchmark | figure | value | goal | met |", "|---|---|---|---|---|"]
    for mod, key, goal, check in GOALS:
        value = results.get(mod, {}).get(key)
        met = "" if value is None or check is None else ("yes" if check(value) else "NO")
        shown = results.get(mod, {}).get("error", "n/a") if value is None else value
        lines.append(f"| {mod} | {key} | {shown} | {goal} | {met} |")
    fid = results.get("fidelity", {})
    for label, figures in (("test split", fid), (f"fresh world seed {fid.get('fresh_seed', {}).get('seed')}",
                                                 fid.get("fresh_seed", {}))):
        rows = [(k, v) for k, v in figures.items() if k.startswith(PER_NODE) and isinstance(v, (int, float))]
        if rows:
            lines += ["", f"## Fidelity per node, {label}", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {round(v, 4)} |" for k, v in rows]
    lines += breakdown_lines(results.get("student", {}).get("breakdown"))
    lines += scale_lines(results.get("scale"))
    lines += blackbox_lines(results.get("blackbox"))
    lines += pretrained_lines(results.get("pretrained"))
    lines += onpolicy_lines(results.get("onpolicy"))
    lines += onpolicy_lines(results.get("onpolicy_data"), "onpolicy_data")
    lines += vision_lines(results.get("vision_encoder"))
    faults = results.get("reliability", {}).get("remote_teacher_faults")
    if faults:
        lines += ["", "## Reliability: a remote teacher's faults", "",
                  "Played by a real HTTP server process against the `openai` node (`tests/test_node_openai.py`); "
                  "each ends with nothing lost and nothing recorded twice.", "", "| fault | test |", "|---|---|"]
        lines += [f"| {fault} | `{test}` |" for fault, test in faults.items()]
    lines += ["", "## All figures", "", "```json", json.dumps(results, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def breakdown_lines(res: dict | None) -> list[str]:
    """Where each side's batch-1 request goes (``benchmarks.breakdown``), as a table."""
    if not res or "student" not in res:
        return []
    lines = ["", "## Where a batch-1 request's time goes", "",
             f"Speed-up in this breakdown (median of its passes' ratios; the goal's figure is the paired one above) "
             f"{res['speedup']:.1f}x; for {res['goal']:.0f}x the student may take "
             f"{res['student_budget_ms']:.2f} ms a request.", "",
             "| side | stage | ms per request | share |", "|---|---|---|---|"]
    for side in ("graph", "student"):
        b = res[side]
        name = f"student ({b['backend']})" if side == "student" else "teacher graph"
        lines.append(f"| {name} | request | {b['request_ms']:.2f} | 100% |")
        lines += [f"| {name} | {stage} | {ms:.2f} | {100 * ms / b['request_ms']:.0f}% |"
                  for stage, ms in b["stages_ms"].items()]
    return lines


def scale_lines(res: dict | None) -> list[str]:
    """The realistic-scale benchmark's table (``benchmarks.scale``): every side, then the ratios."""
    if not res or "table" not in res:
        return []
    return ["", f"## Speed and cost at realistic scale (`python -m benchmarks.scale`, {res.get('size')} size, "
                f"{res.get('ran', '')})", "",
            "The realistic rows have random weights (timing only); the teacher LLM at its best on this CPU is "
            f"{res.get('best_dtype')}. Each ratio is measured side by side in one run, rounds alternating.", "",
            res["table"]]


def blackbox_lines(res: dict | None) -> list[str]:
    """The black-box demo (``benchmarks.blackbox``): answer agreement of each student with its teacher."""
    if not res or "answer_agreement" not in res:
        return []
    agree = res["answer_agreement"]
    lines = ["", f"## Black-box teacher: the demo's reasoner behind an OpenAI-compatible server "
                 f"(`python -m benchmarks.blackbox`, {res.get('ran', '')})", "",
             "| student distilled from | answer agreement with its teacher (test split) | retained accuracy | "
             "soft labels in the train traces |", "|---|---|---|---|",
             f"| in-process `llm` node (white box, top-k) | {_r(agree.get('white_box'))} | | 1.0 |"]
    for mode, what in (("topk", "`openai` node, top-20 log-probs served"), ("text", "`openai` node, text only")):
        m = res.get(mode) or {}
        lines.append(f"| {what} | {_r(m.get('answer_agreement'))} | {_r(m.get('answer_retained'))} | "
                     f"{m.get('soft_label_share')} |")
    return lines


def _r(value, digits: int = 4):
    """A figure for a table cell: floats rounded, anything else as it is."""
    return round(value, digits) if isinstance(value, float) else value


def pretrained_lines(res: dict | None) -> list[str]:
    """Students from pretrained parts (``benchmarks.pretrained``): agreement per node and time per step."""
    if not res or "today" not in res:
        return []
    base = res["today"]
    nodes = list(base.get("agreement", {}))
    lines = ["", f"## Students from pretrained parts, one step budget (`python -m benchmarks.pretrained`, "
                 f"{res.get('ran', '')})", "",
             f"Random init everywhere (no pretrained weights can be fetched here): what each path costs and how it "
             f"trains, at {base.get('steps')} steps each on the demo's train traces, agreement with the teacher on "
             "the test split. fwd+bwd: one forward + backward, the students taking turns (the fairer time ratio).", "",
             "| student | parameters | trainable | ms / step | x today | fwd+bwd ms | x today | "
             + " | ".join(nodes) + " |", "|---" * (7 + len(nodes)) + "|"]
    for name, r in res.items():
        if not isinstance(r, dict) or "s_per_step" not in r:
            continue
        fb = r.get("s_fwd_bwd")
        cells = [name, f"{r['params']:,}", f"{r.get('trainable', r['params']):,}", f"{r['s_per_step'] * 1000:.0f}",
                 f"{r['s_per_step'] / base['s_per_step']:.2f}",
                 f"{fb * 1000:.0f}" if fb else "", f"{fb / base['s_fwd_bwd']:.2f}" if fb and base.get("s_fwd_bwd") else ""]
        for node in nodes:
            m = r.get("agreement", {}).get(node, {})
            key = next((k for k in ("map50", "top1", "answer_em") if k in m), None)
            cells.append(f"{key} {m[key]:.3f}" if key else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def onpolicy_lines(res: dict | None, module: str = "onpolicy") -> list[str]:
    """Offline only vs offline + on-policy at one wall-clock budget (``benchmarks.onpolicy``)."""
    if not res or "offline" not in res:
        return []
    seed = f"seed{res.get('fresh_seed')}"
    lines = ["", f"## On-policy distillation: offline only vs offline + on-policy, one wall-clock budget, "
                 f"{res.get('train_images', 800)} train images (`python -m benchmarks.{module}`, {res.get('ran', '')})", "",
             f"On-policy rounds: {res.get('on_policy_config')}; teacher calls {res.get('teacher_calls')} "
             f"({res.get('teacher_seconds')} s). Train seconds: offline {res['offline'].get('train_seconds')}, "
             f"offline + on-policy {res['on_policy'].get('train_seconds')}. Goals: answer agreement >= 0.95 on both "
             "sets, every question type >= 0.92, detection mAP50 vs the teacher >= 0.90.", "",
             "| set | figure | offline only | offline + on-policy |", "|---|---|---|---|"]
    for split, label in (("test", "test split"), (seed, f"fresh world (seed {res.get('fresh_seed')})")):
        a, b = res["offline"].get(split, {}), res["on_policy"].get(split, {})
        for key in ("answer_agreement", "answer_accuracy", "answer_retained", "detection_map50_vs_teacher"):
            lines.append(f"| {label} | {key} | {_r(a.get(key))} | {_r(b.get(key))} |")
        for t, v in (b.get("agreement_by_type") or {}).items():
            lines.append(f"| {label} | agreement: {t} | {_r((a.get('agreement_by_type') or {}).get(t))} | {_r(v)} |")
        wa, wb = a.get("who_is_right"), b.get("who_is_right")
        if wa and wb:
            lines.append(f"| {label} | answers that differ: truth sides with student / teacher / neither | "
                         f"{_who(wa)} | {_who(wb)} |")
            lines.append(f"| {label} | agreement where the teacher is right | {_r(wa['agreement_where_teacher_right'])} "
                         f"| {_r(wb['agreement_where_teacher_right'])} |")
    return lines


def _who(w: dict) -> str:
    return f"{w['differ']}: {w['student_right']} / {w['teacher_right']} / {w['both_wrong']}"


def vision_lines(res: dict | None) -> list[str]:
    """The int8 vision encoder: today's, with depthwise-separable blocks, with a patchify stem
    (``benchmarks.vision_encoder``)."""
    if not res or "today" not in res:
        return []
    lines = ["", f"## The int8 vision encoder at {res.get('size')} px, batch {res.get('batch')}, one thread "
                 f"(`python -m benchmarks.vision_encoder`, {res.get('ran', '')})", "",
             "| encoder | params | ms a request | costliest nodes (ms a request) |", "|---|---|---|---|"]
    for name in ("today", "depthwise", "patchify"):
        if name not in res:
            continue
        r = res[name]
        nodes = "; ".join(f"{k} {v}" for k, v in r.get("top_nodes_ms", {}).items())
        lines.append(f"| {name} | {r.get('params', 0):,} | {r.get('ms_per_request')} | {nodes} |")
    return lines


def previous(path: Path) -> dict[str, dict]:
    """The figures of an earlier run, read back from its results file's JSON block ({} if none)."""
    if not path.is_file():
        return {}
    text = path.read_text()
    start = text.rfind("```json\n")
    end = text.find("\n```", start + 8)
    try:
        return json.loads(text[start + 8:end]) if start >= 0 and end > start else {}
    except json.JSONDecodeError:
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny preset: a plumbing check, not the figures")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="demo workdir shared by demo, student and fidelity (default: DATA_DIR/bench)")
    ap.add_argument("--only", default=None, help="comma-separated benchmarks to run (e.g. serve_http,record); "
                    "the other figures are kept from the existing results file, each with the date it ran")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: benchmarks/RESULTS.md (with --quick: benchmarks/RESULTS-quick.md)")
    args = ap.parse_args()
    args.out = args.out or HERE / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    from distillery import runtime

    workdir = (args.workdir or runtime.data_dir() / ("bench-quick" if args.quick else "bench")).resolve()
    print(f"benchmark workdir: {workdir} (the demo's cold run rebuilds it)", flush=True)
    only = [m.strip() for m in args.only.split(",")] if args.only else None
    unknown = set(only or []) - set(MODULES) - set(ON_REQUEST)
    if unknown:
        ap.error(f"--only {args.only}: unknown benchmark(s) {sorted(unknown)}; known: {', '.join(MODULES + ON_REQUEST)}")
    results = {**(previous(args.out) if only else {}), **run_all(args.quick, workdir, only)}
    text = render(results, args.quick)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
