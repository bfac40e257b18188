"""`distillery demo --preset tiny` end to end, twice: every stage runs, report.json holds what a
person reads, and the second (warm) run reuses the world, the teachers, the traces and the
registered student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def demo_runs(tiny_demo, tmp_path_factory, prefect_harness):
    """Two demo runs in one workdir; the tiny teachers come from the session's tiny_demo (same
    fingerprint, so the demo finds them in its cache instead of training them again)."""
    import mlflow

    from distillery.demo.pipeline import run_demo

    workdir = tmp_path_factory.mktemp("demo")
    shutil.copytree(tiny_demo["teachers"].llm_dir.parent, workdir / "teachers" / tiny_demo["teachers"].llm_dir.parent.name)
    before = mlflow.get_tracking_uri()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")  # a registry of its own
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        cold = run_demo(workdir, preset="tiny")
        cold_report = json.loads((workdir / "report.json").read_text())
        warm = run_demo(workdir, preset="tiny")
        warm_report = json.loads((workdir / "report.json").read_text())
    finally:
        mp.undo()
        mlflow.set_tracking_uri(before)
    return {"workdir": workdir, "cold": cold, "warm": warm, "cold_report": cold_report, "warm_report": warm_report}


def test_every_stage_runs_and_report_json_holds_the_figures_and_paths(demo_runs):
    rep = demo_runs["cold_report"]
    stages = [s["name"] for s in rep["stages"]]
    assert stages[:4] == ["world", "teachers", "record (train)", "record (test)"]
    assert any(s.startswith("distill") for s in stages) and "pull and predict" in stages
    fig = rep["figures"]
    assert {"box_map50", "llm_acc_gt"} <= set(fig["teachers"])
    assert fig["record_train"]["written"] > 0 and fig["record_train"]["quarantined"] == 0
    student = fig["student"]
    assert student["registered_uri"].startswith("models:/shapes-tiny")
    assert "answer_em" in student["fidelity_vs_teacher"]["reasoner"]
    assert student["retained"], student  # retained accuracy per node: the test split's labels are read
    assert set(student["retained"]) <= {"detector", "retriever", "reasoner"}
    assert isinstance(fig["prediction"]["answer"], str) and fig["prediction"]["ground_truth"]
    assert fig["speed"]["speedup_batch1"] > 0 and fig["speed"]["graph_parameters"] > fig["speed"]["student_parameters"]
    assert fig["wall_seconds"] > 0
    for key in ("spec", "world", "inputs_train", "traces_train", "pulled_student"):
        assert Path(rep["paths"][key]).exists(), key
    assert rep["commands"]["record_train"].startswith(f"distillery record {rep['paths']['spec']}")
    assert rep["paths"]["traces_train"] in rep["commands"]["read_traces"]


def test_the_segmenters_masks_reach_the_reasoners_prompt(demo_runs):
    """All four node types matter: the detector's labels, the segmenter's mask areas (which objects
    are large), the retriever's documents and the reasoner's reasoning meet in the prompt."""
    import yaml

    from distillery.demo import kb
    from distillery.teachers.store import TraceStore
    from distillery import rle as rle_codec
    from distillery.teachers.nodes.yolo import describe_detections, large_labels

    rep = demo_runs["cold_report"]
    spec = yaml.safe_load(Path(rep["paths"]["spec"]).read_text())
    assert spec["teachers"]["detector"]["large_area"] == kb.LARGE_AREA
    records = TraceStore(rep["paths"]["traces_train"]).read(status="ok", with_images=False)
    assert records
    for r in records:
        det, prompt = r.outputs["detector"], r.outputs["reasoner"]["prompt"]
        assert len(det["areas"]) == len(det["masks"]) == len(det["labels"])
        for rle, area in zip(det["masks"], det["areas"]):
            assert area == pytest.approx(rle_codec.decode(rle).mean(), abs=1e-6)
        summary = describe_detections(det["labels"], large_labels(det["labels"], det["areas"], kb.LARGE_AREA))
        assert det["summary"] == summary and prompt.startswith(f"objects: {summary}\nfacts: ")
        assert r.outputs["retriever"]["context"] in prompt and r.question in prompt


def test_a_warm_run_reuses_everything_and_still_reports_the_student(demo_runs):
    cold, warm = demo_runs["cold_report"]["figures"], demo_runs["warm_report"]["figures"]
    assert warm["record_train"]["written"] == 0
    assert warm["record_train"]["skipped"] == cold["record_train"]["written"]
    assert warm["student"]["reused"] is True
    assert warm["student"]["registered"]["version"] == cold["student"]["registered"]["version"]
    reused = warm["student"]["fidelity_vs_teacher"]["reasoner"]["answer_em"]  # read back from MLflow
    assert reused == pytest.approx(cold["student"]["fidelity_vs_teacher"]["reasoner"]["answer_em"])
    for node, metrics in cold["student"]["retained"].items():
        for name, value in metrics.items():
            assert warm["student"]["retained"][node][name.replace("@", "_at_")] == pytest.approx(value)
    teachers = demo_runs["workdir"] / "teachers"
    assert len([p for p in teachers.iterdir() if not p.name.endswith(".training")]) == 1  # no second training


def test_fresh_deletes_only_a_demo_workdir(tmp_path):
    from distillery.demo.pipeline import prepare_workdir

    (tmp_path / "keep.txt").write_text("not the demo's")
    with pytest.raises(ValueError, match="not a demo workdir"):
        prepare_workdir(tmp_path, fresh=True)
    assert (tmp_path / "keep.txt").exists()
    wd = prepare_workdir(tmp_path / "demo")
    (wd / "stale.json").write_text("{}")
    assert prepare_workdir(wd, fresh=True) == wd and not (wd / "stale.json").exists()
