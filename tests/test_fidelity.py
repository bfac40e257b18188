"""Fidelity reports on the tiny demo world, whose splits carry labels in the users' formats (a
COCO annotations.json, answer / type / documents on the requests.jsonl lines): the truth read
from them agrees with the demo's own scenes, the teacher's outputs as the "student" retain
exactly 1.0, answers grouped by question type, a real student's report end to end through the
generic path (``demo.fidelity.run_eval`` -> ``fidelity.evaluate_inputs``), and the MLflow log."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillery.students.evaluation.fidelity import by_question_type, evaluate_predictions
from distillery.students.evaluation.truth import ground_truth


@pytest.fixture(scope="module")
def demo(tiny_demo):
    from distillery.demo.fidelity import record_split
    from distillery.flows.spec import load_spec

    world, spec = tiny_demo["world"], load_spec(tiny_demo["spec_path"])
    records = record_split(spec, world, "test", tiny_demo["workdir"] / "traces-test.lance")
    truth = ground_truth(world.split_dir("test"), spec, records)
    return {"world": world, "spec": spec, "records": records, "truth": truth.outputs, "types": truth.types,
            "summary": truth.summary(), "workdir": tiny_demo["workdir"]}


def test_the_users_label_formats_give_the_demos_own_truth(demo):
    """What the COCO file and the request lines give equals the demo's private scenes.json."""
    from distillery.demo import kb

    scenes = demo["world"].annotations("test")
    assert len(demo["records"]) == len(scenes["requests"]) and all(t is not None for t in demo["truth"])
    by_q = {(r["image"], r["question"]): r for r in scenes["requests"]}
    objects = {im["file"]: im["objects"] for im in scenes["images"]}
    for rec, truth, qtype in zip(demo["records"], demo["truth"], demo["types"]):
        key = "/".join(rec.image_path.split("/")[-2:])
        req = by_q[(key, rec.question)]
        assert truth["reasoner"]["answer"] == req["answer"] and qtype == req["type"]
        assert truth["retriever"]["ids"] == req["needed_docs"]
        det = truth["detector"]
        np.testing.assert_allclose(det["boxes"], [o["box_norm"] for o in objects[key]], atol=1e-6)
        assert det["classes"] == [o["class_id"] for o in objects[key]]  # by name: the detector's ids
        assert det["labels"] == [kb.CLASSES[o["class_id"]] for o in objects[key]]
        assert det["masks"] == [o["mask"] for o in objects[key]]
    assert demo["summary"]["masks"] is True and demo["summary"]["left_out"] == {}


def test_teacher_outputs_as_student_retain_everything(demo):
    recs = demo["records"]
    report = evaluate_predictions(demo["spec"], recs, [r.outputs for r in recs], demo["truth"], types=demo["types"])
    for node, metrics in report["student_vs_teacher"].items():
        assert metrics["n"] == len(recs)
        for name, v in metrics.items():
            if name != "n":
                assert v == pytest.approx(1.0), (node, name)
    assert report["student_vs_truth"] == report["teacher_vs_truth"]
    assert set(report["student_vs_truth"]) == {"detector", "retriever", "reasoner"}
    for node, metrics in report["retained"].items():
        assert all(v == pytest.approx(1.0) for v in metrics.values()), node
    assert sum(row["n"] for row in report["by_type"].values()) == len(recs)


def test_answers_by_question_type():
    out = by_question_type(["count", "count", "sum", None], ["1", "2", "3", "9"], ["1", "3", "3", "9"],
                           ["1", "2", "4", "0"])
    assert out == {"count": {"student_vs_teacher": 0.5, "student_vs_truth": 1.0, "teacher_vs_truth": 0.5,
                             "agreement_where_teacher_right": 1.0, "n": 2},
                   "sum": {"student_vs_teacher": 1.0, "student_vs_truth": 0.0, "teacher_vs_truth": 0.0, "n": 1}}


def test_who_is_right_splits_the_disagreements_by_the_truth():
    from distillery.students.model.scores import who_is_right

    student = ["2", "3", "Yes", "4", "1", "0"]
    teacher = ["2", "4", "no", "4", "2", "5"]
    truth = ["2", "3", "no", "5", "2", "7"]
    # differ at 1 (student right), 2 (teacher right: "Yes" vs "no"), 4 (teacher right), 5 (neither)
    assert who_is_right(student, teacher, truth) == {
        "n": 6, "differ": 4, "student_right": 1, "teacher_right": 2, "both_wrong": 1,
        "agreement_where_teacher_right": pytest.approx(1 / 3)}  # the teacher is right at 0, 2, 4; agree at 0
    assert who_is_right([" Yes."], ["yes"], ["YES"])["differ"] == 0  # compared as answer_agreement compares
    with pytest.raises(ValueError, match="who_is_right: 1 student, 2 teacher"):
        who_is_right(["1"], ["1", "2"], ["1", "2"])


def test_run_eval_on_a_student_folder_and_log_it(demo, tmp_path):
    import mlflow

    from distillery.demo.fidelity import run_eval
    from distillery.flows.artifacts import publish_fidelity
    from distillery.students.data import build_schema, load_tokenizer
    from distillery.students.model.student import MultimodalStudent
    from student_support import tiny_config

    schema = build_schema(demo["spec"], demo["records"])
    torch.manual_seed(0)
    model = MultimodalStudent(tiny_config(), schema)
    model.tokenizer = load_tokenizer(schema)
    folder = model.save_pretrained(tmp_path / "student")
    report = run_eval(str(folder), "test", workdir=demo["workdir"], preset="tiny", log=True)
    n = len(demo["records"])
    assert report["n_records"] == n and report["split"] == "test"
    assert report["inputs"] == str(demo["world"].split_dir("test")) and report["labels"]["labelled"] == n
    assert set(report["student_vs_teacher"]) == {"detector", "retriever", "reasoner"}
    assert report["student_vs_teacher"]["reasoner"]["n"] == n
    for node, metrics in report["retained"].items():  # retained = student vs truth / teacher vs truth
        for name, v in metrics.items():
            assert v == pytest.approx(report["student_vs_truth"][node][name] / report["teacher_vs_truth"][node][name])
    run = mlflow.get_run(report["mlflow_run_id"])
    assert "/mlruns/" not in run.info.artifact_uri  # beside the store, not in ./mlruns of the working folder
    assert run.data.metrics["eval.student_vs_teacher.reasoner.answer_em"] == pytest.approx(
        report["student_vs_teacher"]["reasoner"]["answer_em"])
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert {"eval/fidelity_per_node.png", "eval/evaluation.json"} <= files
    assert json.loads(json.dumps(report)) is not None  # the report is JSON as is
    assert publish_fidelity(report) is None  # outside a flow run: no artifact
    assert "eval.student_vs_teacher.retriever.recall_at_4" in run.data.metrics


def test_bad_alignment_is_named(demo):
    recs = demo["records"]
    with pytest.raises(ValueError, match="1 predictions for"):
        evaluate_predictions(demo["spec"], recs, [{}])
