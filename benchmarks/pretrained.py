"""Students from pretrained parts, measured on the demo world at one step budget: agreement per node
with the teacher on the test split and training time per step, as figures and as ratios to
today's student (same spec, same traces, same steps, same seed, in one process).

    python -m benchmarks.pretrained [--quick] [--preset tiny|full] [--workdir DIR] [--steps N]

Students (random init everywhere: no pretrained weights can be fetched here; what is measured is
what each path costs and how it trains from scratch, not what pretrained weights bring):

* ``today``: the spec's student (the built-in conv encoder and decoder, the teacher's tokenizer);
* ``llama-text``: the text side a pretrained-shaped causal LM (``text_base``: a Llama /
  SmolLM2-architecture model: RMSNorm, SwiGLU, rotary positions, grouped-query attention, tied
  embeddings) at today's width and depth, on the teacher's tokenizer: the architecture alone;
* ``llama-text-lora``: the same with LoRA (rank 8) and frozen embeddings (what a team does with
  real weights: only the adapters and the heads learn);
* ``cross-tokenizer``: today's student on its own byte-level BPE tokenizer (trained on the demo's
  text), the teacher's soft labels counted through the universal logit distillation loss;
* with ``--backbone``: ``timm-backbone``: the vision side timm's mobilenetv3_small_100;
* with ``--variants today,relu-vision``: ``relu-vision``: today's student with ``vision_act:
  relu`` (the int8-friendly activation ``benchmarks/scale.py``'s student uses);
  ``relu-patchify``: that with ``vision_stem: patchify``.

``--smollm2-steps N``: also N steps of a student on SmolLM2-135M's real text-side shape (30
blocks, width 576; slow on a CPU): its time per step only.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from benchmarks.common import parser, workdir_of

DEFAULT_VARIANTS = ("today", "llama-text", "llama-text-lora", "cross-tokenizer")


def private_traces(src: Path, spec, dst: Path | None, n: int, world, split: str):
    """The first ``n`` usable records of the demo's recorded ``src`` store (the graph fingerprint
    with the most records, so a change elsewhere that moved the fingerprint records nothing
    again), re-stamped with this spec's fingerprint; written to a private store ``dst`` (its
    URI returned) or returned as a list. Records the split first where ``src`` holds none."""
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.store import TraceStore

    records = TraceStore(str(src)).read(status="ok") if src.exists() else []
    if not records:
        from distillery.demo.fidelity import record_split

        records = record_split(spec, world, split, src)
    fp, _ = Counter(r.graph_fingerprint for r in records).most_common(1)[0]
    now = TeacherGraph(spec.teachers).fingerprint
    records = [replace(r, graph_fingerprint=now) for r in records if r.graph_fingerprint == fp][:n]
    if dst is None:
        return records
    TraceStore(str(dst)).append(records)
    return str(dst)


def student_variants(spec, tmp: Path, backbone: bool) -> dict[str, dict]:
    """Per variant: the student config keys that differ from the spec's."""
    from distillery.demo.standins import byte_level_bpe, demo_corpus, write_text_base, write_timm_weights

    cfg = spec.student
    llm = next(n for n in spec.teachers.values() if n.type == "llm")
    sizes = dict(hidden_size=cfg.d_model, intermediate_size=cfg.mlp_ratio * cfg.d_model * 2 // 3,
                 num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                 num_key_value_heads=max(1, cfg.n_heads // 2), max_position_embeddings=1024,
                 tie_word_embeddings=True, rms_norm_eps=1e-5)
    base = write_text_base(tmp / "llama-text", shape=sizes, tokenizer_from=llm.model)
    bpe = tmp / "bpe-tokenizer"
    byte_level_bpe(demo_corpus(), 800, ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>").save_pretrained(str(bpe))
    out = {"today": {}, "llama-text": {"text_base": base},
           "llama-text-lora": {"text_base": base, "lora_rank": 8, "lora_alpha": 16.0},
           "cross-tokenizer": {"tokenizer": str(bpe)}}
    # (not in the default set: ``--variants today,relu-vision``) the conv encoder with ReLU, the
    # int8-friendly activation benchmarks/scale.py's student uses: what it costs in agreement
    out["relu-vision"] = {"vision_act": "relu"}
    # (``--variants relu-vision,relu-patchify``) the same with the patchify stem (``vision_stem``), which
    # benchmarks/vision_encoder.py times at 0.77x the int8 encoder at 640 px: what it costs in agreement
    out["relu-patchify"] = {"vision_act": "relu", "vision_stem": "patchify"}
    if backbone:
        out["timm-backbone"] = {"vision_backbone": "timm/mobilenetv3_small_100",
                                "vision_weights": write_timm_weights(tmp / "mnv3.safetensors")}
    return out


def run_variant(spec, changes: dict, traces: str, out_dir: Path, steps: int, batch_size: int, test_records) -> dict:
    """Train ``steps`` steps and measure: seconds per step (the loop alone), parameters,
    agreement per node on ``test_records``."""
    from distillery.students.evaluation.metrics import evaluate_student
    from distillery.students.model.config import StudentConfig
    from distillery.students.training.train import train

    student = StudentConfig.model_validate(spec.student.model_dump() | changes)
    training = spec.training.model_copy(update={
        "max_steps": steps, "epochs": 1000, "batch_size": batch_size, "val_fraction": 0.0, "agreement_every": 0,
        "onnx_export": False, "checkpoint_every": 10 ** 6, "device": "cpu", "warmup_steps": min(50, steps // 5)})
    clock: dict[str, float] = {}

    def on_event(event: dict) -> None:
        if event["event"] in ("start", "end"):
            clock[event["event"]] = time.perf_counter()
            clock[event["event"] + "_step"] = event["step"]

    result = train(spec.model_copy(update={"student": student, "training": training}), traces, out_dir=out_dir,
                   progress=False, callback=on_event)
    model = result.model.eval()
    n_steps = clock["end_step"] - clock["start_step"]
    agreement = evaluate_student(model, test_records)
    if "cross_tokenizer" in str(model.schema.nodes):  # token KL is over the teacher's ids: not comparable
        for node in agreement.values():
            node.pop("token_kl", None)
    return {"s_per_step": (clock["end"] - clock["start"]) / max(n_steps, 1), "steps": n_steps, "model": model,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "final_loss": result.history[-1].get("train_loss/total"), "agreement": agreement}


def paired_step_times(models: dict[str, object], records, batch_size: int, rounds: int) -> dict[str, float]:
    """Median seconds of one forward + backward pass (no optimizer, no echo steps) per student on
    one training batch, the students taking turns in each round, so a load change on a shared
    machine hits all of them alike."""
    import statistics

    from distillery.students.data import TraceDataset, collate

    batches = {}
    for name, model in models.items():
        ds = TraceDataset(records[:batch_size], model.schema, model.cfg, model.text_tokenizer(), train=True)
        batches[name] = collate([ds[i] for i in range(len(ds))])
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds + 1):  # round 0 warms up
        for name, model in models.items():
            model.train()
            t0 = time.perf_counter()
            total, _ = model.loss(batches[name])
            total.backward()
            dt = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if r:
                times[name].append(dt)
    return {name: statistics.median(v) for name, v in times.items()}


def smollm2_step_time(spec, tmp: Path, traces: str, steps: int, batch_size: int) -> dict:
    """Seconds per step of a student on SmolLM2-135M's real text-side shape (random weights)."""
    from distillery.demo.standins import write_text_base

    llm = next(n for n in spec.teachers.values() if n.type == "llm")
    base = write_text_base(tmp / "smollm2-135m", shape="smollm2-135m", tokenizer_from=llm.model)
    from distillery.students.model.config import StudentConfig
    from distillery.students.training.train import train

    student = StudentConfig.model_validate(spec.student.model_dump() | {"text_base": base})
    training = spec.training.model_copy(update={"max_steps": steps, "epochs": 1000, "batch_size": batch_size,
                                                "val_fraction": 0.0, "agreement_every": 0, "onnx_export": False,
                                                "checkpoint_every": 10 ** 6, "device": "cpu"})
    clock: dict[str, float] = {}
    result = train(spec.model_copy(update={"student": student, "training": training}), traces,
                   out_dir=tmp / "smollm2-student", progress=False,
                   callback=lambda e: clock.update({e["event"]: time.perf_counter(), e["event"] + "_step": e["step"]})
                   if e["event"] in ("start", "end") else None)
    n = clock["end_step"] - clock["start_step"]
    return {"s_per_step": (clock["end"] - clock["start"]) / max(n, 1), "steps": n,
            "params": sum(p.numel() for p in result.model.parameters())}


def headline(agreement: dict) -> dict[str, float]:
    """One figure per node: detection mAP50, retrieval top-1, answer exact match."""
    out = {}
    for node, m in agreement.items():
        for key in ("map50", "top1", "answer_em"):
            if key in m:
                out[node] = (key, float(m[key]))
                break
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="a short run: 30 steps, 32 test inputs")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per student (default 300; quick 30)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--test-inputs", type=int, default=None, help="test records to score (default 128; quick 32)")
    ap.add_argument("--train-records", type=int, default=None, help="training records (default: steps x batch)")
    ap.add_argument("--rounds", type=int, default=5, help="paired forward+backward timing rounds")
    ap.add_argument("--backbone", action="store_true", help="also a student on a timm backbone")
    ap.add_argument("--smollm2-steps", type=int, default=0, help="also time a SmolLM2-135M-shaped text side")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"students to train (default {','.join(DEFAULT_VARIANTS)}; also: relu-vision, relu-patchify, and "
                    "timm-backbone with --backbone)")
    args = ap.parse_args(argv)
    steps = args.steps or (30 if args.quick else 300)
    n_test = args.test_inputs or (32 if args.quick else 128)
    from distillery import runtime

    runtime.configure()
    from distillery.demo.fidelity import demo_setup

    workdir = workdir_of(args)
    world, spec = demo_setup(workdir, args.preset)
    tmp_root = Path(tempfile.mkdtemp(prefix="bench-pretrained-"))
    traces = private_traces(workdir / "traces-train.lance", spec, tmp_root / "train.lance",
                            args.train_records or (steps * args.batch_size), world, "train")
    test_records = private_traces(workdir / "traces-test.lance", spec, None, n_test, world, "test")
    results: dict[str, dict] = {}
    try:
        tmp = tmp_root
        wanted = [v.strip() for v in args.variants.split(",")] + (["timm-backbone"] if args.backbone else [])
        variants = student_variants(spec, tmp, args.backbone)
        unknown = sorted(set(wanted) - set(variants))
        if unknown or "today" not in wanted:
            raise SystemExit(f"--variants {args.variants}: unknown {unknown} (known: {', '.join(variants)}); "
                             "'today' is the baseline and must be one")
        for name, changes in ((n, variants[n]) for n in wanted):
            print(f"[{name}] {steps} steps ...", flush=True)
            results[name] = run_variant(spec, changes, str(traces), tmp / "students" / name, steps, args.batch_size,
                                        test_records)
            print(f"[{name}] {results[name]['s_per_step'] * 1000:.0f} ms/step, {headline(results[name]['agreement'])}",
                  flush=True)
        from distillery.teachers.store import TraceStore

        models = {n: r.pop("model") for n, r in results.items()}
        try:
            paired = paired_step_times(models, TraceStore(str(traces)).read(), args.batch_size, args.rounds)
        except Exception as e:  # (the agreement figures still print)
            print(f"paired timing failed: {type(e).__name__}: {e}", flush=True)
            paired = {}
        for name, seconds in paired.items():
            results[name]["s_fwd_bwd"] = seconds
        if args.smollm2_steps:
            results["smollm2-135m-shape"] = smollm2_step_time(spec, tmp, str(traces), args.smollm2_steps,
                                                              args.batch_size)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    report(results, steps, n_test, args)
    return results


def report(results: dict, steps: int, n_test: int, args) -> None:
    base = results["today"]
    print(f"\nstudents from pretrained parts, demo world ({args.preset}), {steps} steps at batch {args.batch_size}, "
          f"agreement with the teacher on {n_test} test inputs (CPU)")
    nodes = list(headline(base["agreement"]))
    head = f"{'student':<20}{'params':>10}{'trainable':>11}{'ms/step':>9}{'x today':>8}{'fwd+bwd':>9}{'x today':>8}"
    print(head + "".join(f"{n[:16]:>18}" for n in nodes))
    print("(ms/step: the training loop, echo steps included, students one after another; fwd+bwd: one "
          "forward + backward on one batch, students taking turns: the fairer ratio on a shared machine)")
    for name, r in results.items():
        line = f"{name:<20}{r['params']:>10,}{r.get('trainable', r['params']):>11,}{r['s_per_step'] * 1000:>9.0f}" \
               f"{r['s_per_step'] / base['s_per_step']:>8.2f}"
        if "s_fwd_bwd" in r:
            line += f"{r['s_fwd_bwd'] * 1000:>9.0f}{r['s_fwd_bwd'] / base['s_fwd_bwd']:>8.2f}"
        else:
            line += f"{'-':>17}"
        if "agreement" in r:
            h = headline(r["agreement"])
            line += "".join(f"{h[n][0][:8]:>12} {h[n][1]:.3f}" if n in h else f"{'-':>18}" for n in nodes)
        print(line)


if __name__ == "__main__":
    main()
