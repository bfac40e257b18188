"""The distill flow's artifacts as plain rows and texts (flows/artifacts.py), and forgetting as
plain maths on real (tiny) students (students/evaluation/forgetting.py): no Prefect run needed."""

from __future__ import annotations

import pytest

from distillery.flows import artifacts
from distillery.students.evaluation.forgetting import LOWER_IS_BETTER, forgetting, forgetting_report

REPORT = {"old": {"student": {"answer_agreement": 0.8, "token_kl": 0.5}, "champion": {"answer_agreement": 0.9,
                                                                                      "token_kl": 0.4}, "n": 10},
          "new": {"student": {"answer_agreement": 0.95}, "champion": {"answer_agreement": 0.6}, "n": 5}}


def test_forgetting_is_what_the_student_lost_on_the_old_set():
    assert "token_kl" in LOWER_IS_BETTER
    out = forgetting(REPORT["old"]["student"], REPORT["old"]["champion"])
    assert out == pytest.approx({"answer_agreement": 0.1, "token_kl": 0.1})  # both: lost ground
    assert forgetting({"answer_agreement": 0.9, "map50": 0.5}, {"answer_agreement": 0.8}) == pytest.approx(
        {"answer_agreement": -0.1})  # gained; a metric the champion lacks is not compared


def test_forgetting_rows_hold_both_sets_and_the_change():
    rows = artifacts.forgetting_rows(REPORT | {"forgetting": forgetting(REPORT["old"]["student"],
                                                                        REPORT["old"]["champion"])})
    assert [r["metric"] for r in rows] == ["answer_agreement", "token_kl"]
    first = rows[0]
    assert (first["old set: champion"], first["old set: student"], first["new set: student"]) == (0.9, 0.8, 0.95)
    assert first[artifacts.FORGETTING_CHANGE] == pytest.approx(0.1)
    assert rows[1]["new set: student"] is None  # not measured there


def test_registration_is_a_markdown_note_locally_and_links_on_a_server():
    reg = {"model_name": "m", "version": "3", "run_id": "r1", "promoted": False, "reasons": ["gate: x < y"]}
    text = artifacts.registration_markdown(reg, "sqlite:///tmp/mlflow.db")
    assert "`models:/m/3`" in text and "distillery pull m/3 --to ./student" in text and "gate: x < y" in text
    links = artifacts.registration_links(reg, "http://mlflow:5000/", "4")
    assert [(link["key"], link["link"]) for link in links] == [
        ("mlflow-run", "http://mlflow:5000/#/experiments/4/runs/r1"),
        ("registered-version", "http://mlflow:5000/#/models/m/versions/3")]
    assert [link["key"] for link in artifacts.registration_links(reg, "http://mlflow:5000", None)] == [
        "registered-version"]


def test_publishing_outside_a_flow_run_does_nothing():
    assert artifacts.publish_forgetting(REPORT) is None
    assert artifacts.publish_fidelity({"student_vs_teacher": {}}) is None
    assert artifacts.publish_links({"model_name": "m", "version": "1", "promoted": True, "reasons": []}) is None


def test_forgetting_report_of_a_student_against_itself_is_zero(tmp_path):
    import torch

    from distillery.flows.spec import load_spec
    from distillery.students.data import build_schema, load_tokenizer
    from distillery.students.model.student import MultimodalStudent
    from student_support import make_records, tiny_config, write_graph

    records = make_records()
    schema = build_schema(load_spec(write_graph(tmp_path / "graph")), records)
    torch.manual_seed(0)
    model = MultimodalStudent(tiny_config(), schema)
    model.tokenizer = load_tokenizer(schema)
    folder = model.save_pretrained(tmp_path / "student")
    report = forgetting_report(folder, model, records[:2], records[2:])
    assert report["old"]["n"] == 2 and report["new"]["n"] == 2
    assert report["old"]["student"] == pytest.approx(report["old"]["champion"])
    assert set(report["forgetting"]) == set(report["old"]["student"])
    assert all(v == pytest.approx(0.0, abs=1e-5) for v in report["forgetting"].values())
    assert "forgetting" not in forgetting_report(model, model, [], records[:1])  # no old set: nothing lost
