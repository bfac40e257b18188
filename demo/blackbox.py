"""`distillery demo --teacher openai`: the demo's reasoner as a black box behind an
OpenAI-compatible server, distilled beside the white-box student, twice:

* ``topk``: the server's top-k log-probs (``logprobs_k: 20``) mapped to token ids by the
  reasoner's tokenizer folder: soft labels, as the in-process ``llm`` node records them;
* ``text``: the text only (``logprobs_k: 0``): hard labels (the tokenizer still gives the ids).

The server is ``demo/openai_server.py`` serving the demo's own reasoning LLM on 127.0.0.1 (started
here, always stopped; it batches concurrent requests as vLLM does). Only the reasoner changes: the
detector and retriever are the white-box spec's nodes. Each mode has its own spec
(``spec-openai-MODE.yaml``, registered model ``shapes-PRESET-openai-MODE``), trace stores and
runs folder, in the demo's MLflow store. The server's port is fixed (``PORT``) because
``base_url`` is part of the graph fingerprint: a warm run then reuses the recorded traces and the
registered students.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True)
PORT = 18431
MODES = {"topk": 20, "text": 0}  # mode -> logprobs_k
MAX_BATCH = 8  # the server generates up to 8 waiting requests together
MAX_CONCURRENCY = 8


def openai_reasoner(base_url: str, llm_dir: str | Path, logprobs_k: int,
                    max_concurrency: int = MAX_CONCURRENCY) -> dict[str, Any]:
    """The reasoner as an ``openai`` node: the white-box node's prompt and length limit."""
    from distillery.demo.kb import PROMPT_TEMPLATE

    return {"type": "openai", "base_url": base_url, "model": "demo-reasoner", "prompt": PROMPT_TEMPLATE,
            "max_tokens": 96, "temperature": 0.0, "logprobs_k": logprobs_k, "tokenizer": str(llm_dir),
            "max_concurrency": max_concurrency, "batch_size": 128, "timeout_s": 120, "max_retries": 3}


def write_mode_spec(workdir: Path, preset: str, mode: str, base_url: str, teachers, world) -> Path:
    """The black-box spec of one mode, registered in the white-box run's MLflow store."""
    from distillery.demo.spec import write_spec

    registry = None if os.environ.get("MLFLOW_TRACKING_URI") else \
        {"tracking_uri": f"sqlite:///{(workdir / 'runs').resolve() / 'mlflow.db'}"}  # the white-box store
    return write_spec(workdir / f"spec-openai-{mode}.yaml", f"shapes-{preset}-openai-{mode}", teachers.yolo_weights,
                      world.kb_path, teachers.llm_dir, preset,
                      reasoner=openai_reasoner(base_url, teachers.llm_dir, MODES[mode]), registry=registry)


def run_blackbox(rep, world, teachers, preset: str, workdir: Path) -> dict[str, Any]:
    """Serve the reasoner, record and distill each mode; the figures (also in ``rep.figures``)."""
    from distillery.demo.openai_server import TeacherServer

    server = TeacherServer(teachers.llm_dir, port=PORT, max_batch=MAX_BATCH)
    if server.port_changed:
        console.print(f"[yellow]port {PORT} is busy: the teacher server uses {server.port}, so the black-box "
                          "traces of an earlier run (another base_url) are recorded again")
    out: dict[str, Any] = {"server": {"base_url": server.base_url, "max_batch": MAX_BATCH,
                                      "served": str(teachers.llm_dir)}}
    rep.stage("black box: start the OpenAI-compatible server", server.start)
    try:
        for mode in MODES:
            out[mode] = distill_mode(rep, world, teachers, preset, workdir, mode, server.base_url)
    finally:
        server.stop()
    white = rep.figures.get("student", {}).get("fidelity_vs_teacher") or {}
    out["answer_agreement"] = {"white_box": (white.get("reasoner") or {}).get("answer_em"),
                               **{f"black_box_{m}": out[m]["answer_agreement"] for m in MODES}}
    rep.figures["black_box"] = out
    console.print(f"answer agreement, student vs its teacher (test split): {out['answer_agreement']}")
    return out


def distill_mode(rep, world, teachers, preset: str, workdir: Path, mode: str, base_url: str) -> dict[str, Any]:
    """Record train and test through the server, then the distill flow; this mode's figures."""
    from distillery.flows.distill import distill_flow
    from distillery.flows.record import run_record
    from distillery.flows.spec import load_spec

    spec_path = write_mode_spec(workdir, preset, mode, base_url, teachers, world)
    spec = load_spec(spec_path)
    traces = {split: str(workdir / f"traces-openai-{mode}-{split}.lance") for split in ("train", "test")}
    fig: dict[str, Any] = {"spec": str(spec_path), "logprobs_k": MODES[mode], "traces": traces}
    for split in ("train", "test"):
        summary = rep.stage(f"black box {mode}: record ({split})",
                            lambda: run_record(spec, world.split_dir(split), traces[split]))
        fig[f"record_{split}"] = {k: summary.get(k) for k in ("written", "skipped", "quarantined", "usage",
                                                              "node_seconds")}
    fig["soft_labels"] = soft_label_share(traces["train"])
    result = rep.stage(f"black box {mode}: distill (train -> evaluate -> register)", lambda: distill_flow(
        spec=spec, inputs=str(world.split_dir("train")), traces=traces["train"],
        eval_inputs=str(world.split_dir("test")), eval_traces=traces["test"],
        workdir=str(workdir / "runs" / f"openai-{mode}")))
    reg = result["registered"]
    logged = {} if result.get("fidelity") else logged_metrics(reg["run_id"])  # a reused student: its MLflow run
    fidelity, retained = result.get("fidelity") or {}, result.get("retained") or {}
    fig.update(answer_agreement=(fidelity.get("reasoner") or {}).get("answer_em",
                                                                     logged.get("fidelity.reasoner.answer_em")),
               answer_retained=(retained.get("reasoner") or {}).get("answer_em",
                                                                    logged.get("eval.retained.reasoner.answer_em")),
               fidelity_vs_teacher=fidelity or None, registered=reg, reused=result.get("reused", False),
               teacher_answers_as_white_box=same_answers(traces["test"], workdir / "traces-test.lance"))
    return fig


def logged_metrics(run_id: str | None) -> dict[str, float]:
    """The metrics of a registered student's MLflow run (a warm demo reuses the student)."""
    import mlflow

    return dict(mlflow.get_run(run_id).data.metrics) if run_id else {}


def soft_label_share(traces: str) -> float:
    """Share of the recorded reasoner outputs that hold top-k soft labels."""
    from distillery.teachers.store import TraceStore

    outs = [r.outputs.get("reasoner") or {} for r in TraceStore(traces).read(status="ok", with_images=False)]
    return round(sum(len(o.get("topk_ids", [])) > 0 for o in outs) / max(len(outs), 1), 4)


def same_answers(black: str, white: str | Path) -> float | None:
    """Share of inputs where the served teacher's answer is the in-process teacher's (same model;
    the server generates in batches of its own making, so a rare near-tie can differ)."""
    from distillery.teachers.store import TraceStore

    if not Path(white).exists():
        return None
    ans = {r.input_id: r.outputs["reasoner"]["answer"]
           for r in TraceStore(str(white)).read(status="ok", with_images=False)}
    pairs = [(r.outputs["reasoner"]["answer"], ans[r.input_id])
             for r in TraceStore(black).read(status="ok", with_images=False) if r.input_id in ans]
    return round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None
