"""The distill flow end to end on the tiny demo world, under Prefect's ephemeral server.

Three runs share one trace store and one MLflow store: run 1 over half the training inputs,
run 2 (the recurring case) over all of them, run 3 over the same data again. What users rely on:
the distillation's MLflow run holds the spec, training params, per-epoch and system metrics,
plots and the evaluation report; the flow publishes Prefect artifacts; a second run records only
the new inputs, warm-starts from the champion with a replay sample and reports forgetting; a
rerun over unchanged data registers nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from registry_support import mlflow_uri_restored


def _split_inputs(src: Path, dst: Path) -> tuple[Path, Path, int]:
    """``dst/part1`` (the first half of the images, all their questions) and ``dst/all``, each an
    inputs folder with its images and the world's labels (labelled request lines, the COCO file;
    its images not in a folder are unlabelled there); returns them and part1's request count."""
    lines = [json.loads(line) for line in (src / "requests.jsonl").read_text().splitlines() if line]
    images = sorted({r["image"] for r in lines})
    first = set(images[: len(images) // 2])
    folders = {"part1": [r for r in lines if r["image"] in first], "all": lines}
    for name, reqs in folders.items():
        (dst / name / "images").mkdir(parents=True)
        for image in {r["image"] for r in reqs}:
            shutil.copy2(src / image, dst / name / image)
        (dst / name / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
        shutil.copy2(src / "annotations.json", dst / name / "annotations.json")
    return dst / "part1", dst / "all", len(folders["part1"])


@pytest.fixture(scope="module")
def runs(tiny_demo, prefect_harness, tmp_path_factory):
    from distillery.flows.spec import Spec, load_spec
    from distillery.flows.distill import distill_flow

    tmp = tmp_path_factory.mktemp("distill-flow")
    part1, everything, n_part1 = _split_inputs(tiny_demo["world"].split_dir("train"), tmp / "inputs")
    data = load_spec(tiny_demo["spec_path"]).model_dump(mode="json")
    data["registry"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    spec = Spec.model_validate(data)
    common = {"spec": spec, "traces": str(tmp / "traces.lance"), "workdir": str(tmp / "runs")}
    with mlflow_uri_restored(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # tiny training lasts seconds
        first = distill_flow(inputs=str(part1), **common)
        second = distill_flow(inputs=str(everything), **common)
        third = distill_flow(inputs=str(everything), **common)
        yield {"first": first, "second": second, "third": third, "spec": spec, "n_part1": n_part1,
               "n_all": len((everything / "requests.jsonl").read_text().splitlines()),
               "client": mlflow.MlflowClient(data["registry"]["tracking_uri"])}


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_the_run_holds_params_epoch_and_system_metrics_plots_and_the_report(runs):
    client, first = runs["client"], runs["first"]
    run = client.get_run(first["mlflow_run_id"])
    params, metrics = run.data.params, run.data.metrics
    assert params["spec.name"] == runs["spec"].name and params["train.epochs"] == "1"
    assert run.data.tags["prefect_flow_run_id"] == first["flow_run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss/total")] == [1]
    assert any(k.startswith("system/") for k in metrics), sorted(metrics)
    assert any(k.startswith("eval.student_vs_teacher.") for k in metrics)
    assert any(k.startswith("eval.by_type.") for k in metrics)  # types from the inputs' annotations
    assert any(k.startswith("fidelity.") for k in metrics)
    assert metrics["record.written"] == first["record"]["written"]  # the record step's cost, per node
    assert all(metrics[f"record.{n}.seconds"] > 0 for n in ("detector", "retriever", "reasoner"))
    files = _artifact_paths(client, run.info.run_id)
    assert {"spec.yaml", "record_summary.json", "plots/loss_curves.png", "plots/samples.png", "plots/agreement_by_type.png",
            "eval/evaluation.json", "eval/fidelity_per_node.png"} <= files, sorted(files)
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="eval/evaluation.json", tracking_uri=client.tracking_uri)).read_text())
    assert {"student_vs_teacher", "student_vs_truth", "teacher_vs_truth", "retained", "by_type", "who_is_right"} <= set(report)
    who = report["who_is_right"]["reasoner"]  # the disagreements split by which side the labels agree with
    assert who["n"] == report["n_records"] and who["student_right"] + who["teacher_right"] + who["both_wrong"] == who["differ"]
    assert metrics["eval.who_is_right.reasoner.differ"] == who["differ"]
    assert set(report["student_vs_truth"]) == {"detector", "retriever", "reasoner"}  # the inputs' labels
    assert report["labels"]["labelled"] == report["n_records"] and report["labels"]["left_out"] == {}
    from distillery.flows.spec import load_spec

    saved = load_spec(Path(first["train"]["out_dir"]) / "spec.yaml")  # the spec travels with the student
    assert saved.spec_hash() == runs["spec"].spec_hash()
    mv = client.get_model_version(first["registered"]["model_name"], first["registered"]["version"])
    assert mv.run_id == run.info.run_id and run.data.tags["registered_version"].endswith(f"/{mv.version}")
    model = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}",
                                                     tracking_uri=client.tracking_uri))
    assert (model / "code" / "distillery" / "students" / "serving" / "predictor.py").is_file()
    student = {p.name for p in (model / "artifacts" / "student").iterdir()}
    assert {"model.safetensors", "spec.yaml"} <= student and not {"train_result.json", "checkpoints"} & student


def _artifacts(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId)

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(str(f.id) for f in subflows)]
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))


def test_prefect_artifacts_fidelity_table_progress_and_links(runs):
    arts = {(a.key, a.type): a for a in _artifacts(runs["first"]["flow_run_id"])}
    assert {("fidelity", "table"), ("record-progress", "progress"), ("train-progress", "progress"),
            ("registered-student", "markdown"), ("record-cost", "table")} <= set(arts), sorted(arts)
    cost = arts[("record-cost", "table")].data
    cost = json.loads(cost) if isinstance(cost, str) else cost
    assert {r["node"] for r in cost} == {"detector", "retriever", "reasoner"} and all(r["seconds"] > 0 for r in cost)
    table = arts[("fidelity", "table")].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {"detector", "retriever", "reasoner"} <= {r["node"] for r in rows}
    assert arts[("train-progress", "progress")].data == 100.0
    reg = runs["first"]["registered"]
    assert f"models:/{reg['model_name']}/{reg['version']}" in arts[("registered-student", "markdown")].data


def test_recurring_run_records_only_new_inputs_warm_starts_with_replay_and_reports_forgetting(runs):
    first, second, client = runs["first"], runs["second"], runs["client"]
    assert first["record"]["written"] == runs["n_part1"]
    assert (second["record"]["written"], second["record"]["skipped"]) == (
        runs["n_all"] - runs["n_part1"], runs["n_part1"])
    reg = second["registered"]
    assert int(reg["version"]) == int(first["registered"]["version"]) + 1
    tags = client.get_model_version(reg["model_name"], reg["version"]).tags
    assert tags["warm_start_version"] == str(first["registered"]["version"])
    assert tags["init_from"].endswith("student") and int(tags["num_replay"]) > 0
    assert int(tags["traces_version"]) > int(first["train"]["traces_version"])
    assert "old" in second["forgetting"] and "forgetting" in second["forgetting"]
    metrics = client.get_run(second["mlflow_run_id"]).data.metrics
    assert "forgetting.answer_agreement" in metrics and "forgetting.old.champion.answer_agreement" in metrics
    arts = {(a.key, a.type) for a in _artifacts(second["flow_run_id"])}
    assert ("forgetting", "table") in arts


def test_rerun_over_unchanged_data_registers_no_new_version(runs):
    third, reg = runs["third"], runs["second"]["registered"]
    assert third["reused"] and third["registered"]["version"] == reg["version"]
    assert third["record"]["written"] == 0
    versions = runs["client"].search_model_versions(f"name = '{reg['model_name']}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_a_bad_label_file_stops_the_flow_before_anything_is_recorded(runs, tmp_path):
    from distillery.flows.distill import distill_flow

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "requests.jsonl").write_text('{"image": "a.png", "question": "q", "answer": ["two"]}\n')
    with pytest.raises(ValueError, match=r"requests.jsonl line 1: 'answer' must be a string"):
        distill_flow(spec=runs["spec"], inputs=str(inputs), traces=str(tmp_path / "traces.lance"),
                     workdir=str(tmp_path / "runs"))
    assert not (tmp_path / "traces.lance").exists()


def test_train_result_is_read_back_from_shared_storage(tmp_path):
    from distillery.flows.train import RESULT_FILE, read_result, write_result

    with pytest.raises(FileNotFoundError, match="no result"):
        read_result(tmp_path)
    write_result(tmp_path, {"out_dir": str(tmp_path), "flow_run_id": "run-a"})
    assert read_result(tmp_path, flow_run_id="run-a")["out_dir"] == str(tmp_path)
    assert not list(tmp_path.glob(f".{RESULT_FILE}*"))  # written via a temp file, then renamed
    with pytest.raises(RuntimeError, match="run-a, not run-b"):
        read_result(tmp_path, flow_run_id="run-b")  # a stale file of an earlier attempt


def test_links_to_a_tracking_server_are_link_artifacts(prefect_harness, monkeypatch):
    from types import SimpleNamespace

    from prefect import flow

    from distillery.flows import distill

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://mlflow:5000")
    monkeypatch.setattr(mlflow, "get_run", lambda run_id: SimpleNamespace(info=SimpleNamespace(experiment_id="4")))

    @flow
    def links() -> str:
        from prefect import runtime

        distill.publish_links({"model_name": "m", "version": "3", "run_id": "r1", "promoted": True,
                               "reasons": []})
        return str(runtime.flow_run.id)

    arts = {a.key: a.data for a in _artifacts(links())}  # Prefect keeps a link as "[text](url)"
    assert arts["mlflow-run"] == "[MLflow run r1](http://mlflow:5000/#/experiments/4/runs/r1)"
    assert arts["registered-version"] == "[m v3](http://mlflow:5000/#/models/m/versions/3)"
    assert "registered-student" not in arts
