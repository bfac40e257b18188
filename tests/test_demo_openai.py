"""`distillery demo --preset tiny --teacher openai` end to end: the standard demo, then the reasoner
as a black box behind the OpenAI-compatible server (demo/openai_server.py, a real HTTP process on
127.0.0.1, stopped at the end), recorded and distilled from its top-k log-probs and from its text
only; records carry top-k soft labels with the tokenizer and none in text-only mode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import psutil
import pytest


WHITE_BOX_AGREEMENT = 0.5  # stands in for the white-box student's figure (the standard demo's part)


@pytest.fixture(scope="module")
def demo_run(tiny_demo, tmp_path_factory, prefect_harness):
    """The black-box stage of ``run_demo(teacher="openai")`` on the session's tiny world and teachers
    (the standard demo before it is tests/test_demo.py's)."""
    import mlflow

    from distillery.demo.blackbox import run_blackbox
    from distillery.demo.pipeline import DemoReport

    workdir = tmp_path_factory.mktemp("demo-openai")
    llm_root = tiny_demo["teachers"].llm_dir.parent
    shutil.copytree(llm_root, workdir / "teachers" / llm_root.name)
    rep = DemoReport(workdir=str(workdir), preset="tiny", teacher="openai")
    rep.figures["student"] = {"fidelity_vs_teacher": {"reasoner": {"answer_em": WHITE_BOX_AGREEMENT}}}
    before = mlflow.get_tracking_uri()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")  # a registry of its own
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        run_blackbox(rep, tiny_demo["world"], tiny_demo["teachers"], "tiny", workdir)
    finally:
        mp.undo()
        mlflow.set_tracking_uri(before)
    return {"workdir": workdir, "report": {"teacher": rep.teacher, "figures": rep.figures},
            "train_requests": len(tiny_demo["world"].annotations("train")["requests"])}


def test_the_demo_refuses_an_unknown_teacher_naming_the_choices(tmp_path):
    from distillery.demo.pipeline import run_demo

    with pytest.raises(ValueError, match="--teacher 'vllm': choose one of llm, openai"):
        run_demo(tmp_path, preset="tiny", teacher="vllm")


def reasoner_outputs(traces: str) -> list[dict]:
    from distillery.teachers.store import TraceStore

    return [r.outputs["reasoner"] for r in TraceStore(traces).read(status="ok", with_images=False)]


def test_black_box_records_from_the_server_and_trains_a_student_per_mode(demo_run):
    fig = demo_run["report"]["figures"]
    bb = fig["black_box"]
    white_written = demo_run["train_requests"]
    assert demo_run["report"]["teacher"] == "openai" and bb["server"]["base_url"].startswith("http://127.0.0.1:")
    for mode in ("topk", "text"):
        rec = bb[mode]["record_train"]
        assert rec["written"] == white_written and rec["quarantined"] == 0  # every input, from the server
        usage = rec["usage"]["reasoner"]
        assert usage["requests"] == white_written and usage["completion_tokens"] > 0
        assert bb[mode]["registered"]["model_name"] == f"shapes-tiny-openai-{mode}"
        assert 0.0 <= bb[mode]["answer_agreement"] <= 1.0  # the student vs its black-box teacher
        assert bb["answer_agreement"][f"black_box_{mode}"] == bb[mode]["answer_agreement"]
    assert bb["answer_agreement"]["white_box"] == WHITE_BOX_AGREEMENT  # side by side with the white box
    assert bb["topk"]["soft_labels"] == 1.0 and bb["text"]["soft_labels"] == 0.0


def test_the_server_is_stopped(demo_run):
    mine = [p for p in psutil.Process().children(recursive=True)
            if "distillery.demo.openai_server" in " ".join(p.cmdline())]
    assert not mine


def test_topk_records_carry_soft_labels_with_the_tokenizer_and_text_only_none(demo_run):
    from transformers import AutoTokenizer

    bb = demo_run["report"]["figures"]["black_box"]
    tok = AutoTokenizer.from_pretrained(bb["server"]["served"], local_files_only=True)
    soft = reasoner_outputs(bb["topk"]["traces"]["train"])
    hard = reasoner_outputs(bb["text"]["traces"]["train"])
    assert soft and hard
    for out in soft:
        T = len(out["token_ids"])
        assert T > 0 and out["topk_ids"].shape == (T, 20) and out["topk_logprobs"].shape == (T, 20)
        assert out["topk_ids"].dtype == np.int32 and out["topk_logprobs"].dtype == np.float16
        assert (out["topk_ids"] < len(tok)).all()
        assert np.all(np.diff(out["topk_logprobs"].astype(np.float32), axis=1) <= 0)  # sorted, best first
        assert out["usage"]["completion_tokens"] == T
    for out in hard:
        assert np.asarray(out.get("topk_ids", [])).size == 0 and np.asarray(out.get("topk_logprobs", [])).size == 0
        assert len(out["token_ids"]) > 0  # hard labels: the tokenizer's ids of the text
