"""The registry room on a real MLflow (SQLite store in a temp folder) and a real tiny student.

What users rely on: a training run is logged (spec, params, per-epoch metrics, plots, report);
the student is registered with its lineage, once per training run; `challenger` follows the
newest version and `champion` only moves through the gate; the champion loads in a fresh
process; a pulled folder answers with the tracking store gone; loading never unpickles.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from distillery.registry import models
from distillery.registry import pull
from distillery.registry import plots, tracking
from distillery.registry.config import CHALLENGER, CHAMPION, RegistryConfig, artifact_location
from distillery.registry.pyfunc_model import flatten_prediction, to_requests
from registry_support import (CHAMPION_NAME, LINEAGE, QUESTION, make_spec, mlflow_uri_restored,
                              registry_env, train_and_register)  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(registry_env):
    with mlflow_uri_restored():  # later modules see conftest's MLFLOW_TRACKING_URI again
        yield registry_env


_train = train_and_register


# -- the pure promotion rule -----------------------------------------------------------------------
GATE = {"answer_agreement": 0.9}


@pytest.mark.parametrize("candidate, champion, promoted, needle", [
    ({"answer_agreement": 0.95}, None, True, "no champion yet"),
    ({"answer_agreement": 0.85}, None, False, "0.85 < 0.9"),
    ({"map50": 0.99}, None, False, "missing"),
    ({"answer_agreement": 0.92}, {"answer_agreement": 0.95}, False, "champion's 0.95"),
    ({"answer_agreement": 0.95}, {"answer_agreement": 0.95}, True, ">= champion's"),
    ({"answer_agreement": 0.97}, {"answer_agreement": 0.95}, True, "0.97 >= champion's 0.95"),
    ({"answer_agreement": 0.95}, {}, True, "nothing to beat"),
    ({"answer_agreement": float("nan")}, None, False, "missing"),
])
def test_decide_promotion(candidate, champion, promoted, needle):
    d = models.decide_promotion(candidate, champion, GATE, "answer_agreement")
    assert d.promoted is promoted
    assert any(needle in r for r in d.reasons), d.reasons


def test_gate_failure_is_reported_even_when_better_than_champion():
    d = models.decide_promotion({"answer_agreement": 0.8, "map50": 0.2}, {"answer_agreement": 0.7},
                                {"answer_agreement": 0.9, "map50": 0.1}, "answer_agreement")
    assert not d.promoted and d.reasons == ["gate: answer_agreement 0.8 < 0.9"]


# -- config ----------------------------------------------------------------------------------------
def test_tracking_uri_resolution_and_artifacts_beside_the_store(tmp_path, monkeypatch):
    assert RegistryConfig(tracking_uri="http://mlflow:5000").resolve_tracking_uri(tmp_path) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert RegistryConfig().resolve_tracking_uri(tmp_path) == "http://team:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = RegistryConfig().resolve_tracking_uri(tmp_path / "work")
    assert uri == f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}"
    assert artifact_location(uri) == (tmp_path / "work" / "mlartifacts").resolve().as_uri()
    assert artifact_location("http://mlflow:5000") is None
    assert f"mlflow=={mlflow.__version__}" in RegistryConfig().requirements()
    with pytest.raises(ValueError, match="model_name"):
        RegistryConfig(model_name="bad name!")


# -- run logging -----------------------------------------------------------------------------------
def test_training_run_logs_spec_params_epochs_plots_and_report(env, monkeypatch):
    monkeypatch.chdir(env["tmp"])  # anything MLflow wrote to ./mlruns would show up here
    spec = make_spec(env["uri"], name="logged-run")
    history = [{"epoch": e, "loss": 3.0 - e, "loss/detector": 1.0 / (e + 1), "loss/reasoner": 2.0 - e / 2,
                "lr": 1e-3} for e in range(3)]
    img = __import__("PIL.Image", fromlist=["Image"]).open(env["image"])
    det = env["direct"]["detector"]
    with tracking.start_run(spec.registry, spec, run_name="train", tags={"prefect_flow_run_id": "fr-9"}) as run:
        tracking.log_training_params(spec.training.model_dump())
        tracking.log_history(history, nodes=list(spec.teachers))
        plots.log_samples([{"image": img, "teacher": det, "student": det, "title": "0"}])
        tracking.log_report({"answer_agreement": 0.75, "nodes": {"detector": {"map50": 0.5}}})
    client = mlflow.MlflowClient(env["uri"])
    data = client.get_run(run.info.run_id).data
    assert data.params["spec.teachers.detector.task"] == "segment"
    assert data.params["spec.name"] == "logged-run"
    assert data.params["train.epochs"] == str(spec.training.epochs)
    assert data.tags["prefect_flow_run_id"] == "fr-9" and data.tags["spec_hash"] == spec.spec_hash()
    steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss/detector")]
    assert steps == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert data.metrics["eval.nodes.detector.map50"] == 0.5
    files = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"spec.yaml", "evaluation.json", "plots/loss_curves.png", "plots/samples.png"} <= files
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (env["tmp"] / "mlartifacts").as_uri()
    assert not (env["tmp"] / "mlruns").exists()


def test_loss_keys_are_grouped_per_node():
    groups = plots.group_loss_keys([{"loss": 1, "loss/detector": 1, "val_loss_reasoner": 2, "lr": 0}],
                                   ["detector", "reasoner"])
    assert groups == {"total": ["loss"], "detector": ["loss/detector"], "reasoner": ["val_loss_reasoner"]}


# -- log + register --------------------------------------------------------------------------------
def test_register_with_lineage_once_per_training_run(env):
    spec, run_id, uri, mv = env["champion_spec"], env["champion_run"], env["champion_uri"], env["champion"]
    assert models.log_student(env["student"], spec, {}, LINEAGE, run_id=run_id) == uri  # same run: same model
    again = models.register_student(uri, spec, {"answer_agreement": 0.9}, LINEAGE)
    assert again.version == mv.version
    client = mlflow.MlflowClient(env["uri"])
    versions = client.search_model_versions(f"name = '{CHAMPION_NAME}'")
    assert [v.version for v in versions] == [mv.version]
    tags = versions[0].tags
    assert {k: tags[k] for k in LINEAGE} == {k: str(v) for k, v in LINEAGE.items()}
    assert tags["spec_hash"] == spec.spec_hash() and tags["train_run_id"] == run_id
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert tags["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert float(tags["metric.answer_agreement"]) == 0.9
    assert versions[0].run_id == run_id
    assert versions[0].current_stage in (None, "None")  # aliases only, no stages
    same = models.log_and_register(env["student"], spec, {"answer_agreement": 0.9}, run_id=run_id)
    assert same.version == mv.version


def test_log_and_register_reads_the_student_lineage_file(env):
    spec = make_spec(env["uri"], name="lineage-file-model")
    with tracking.start_run(spec.registry, spec) as run:
        mv = models.log_and_register(env["student"], spec, {"answer_agreement": 0.9},
                                     {"prefect_flow_run_id": "fr-7"}, eval_set="set-A")
    assert mv.run_id == run.info.run_id
    assert (mv.tags["graph_fingerprint"], mv.tags["traces_version"]) == ("gf-1", "3")  # from lineage.json
    assert mv.tags["prefect_flow_run_id"] == "fr-7" and mv.tags["eval_set"] == "set-A"


def test_challenger_follows_newest_and_champion_moves_only_through_the_gate(env):
    name, gate = "alias-model", {"answer_agreement": 0.5}

    def version(metrics, eval_set="set-A", **kw):
        spec, _, _, mv = _train(env, name, metrics, gate=gate, eval_set=eval_set)
        d = models.promote(name, mv.version, metrics, gate, spec.registry.comparison_metric(), eval_set=eval_set, **kw)
        client = mlflow.MlflowClient(env["uri"])
        aliases = (client.get_model_version_by_alias(name, CHALLENGER).version,
                   client.get_model_version_by_alias(name, CHAMPION).version)
        return mv.version, d, aliases

    v1, d, aliases = version({"answer_agreement": 0.8})
    assert d.promoted and aliases == (v1, v1)
    v2, d, aliases = version({"answer_agreement": 0.7})  # passes the gate, worse than the champion
    assert not d.promoted and aliases == (v2, v1) and "champion's 0.8" in d.reasons[0]
    assert models.promote(name, v2, {"answer_agreement": 0.4}, gate, "answer_agreement").reasons == [
        "gate: answer_agreement 0.4 < 0.5", "comparison: answer_agreement 0.4 < champion's 0.8"]
    v3, d, aliases = version({"answer_agreement": 0.9}, eval_set="set-B")  # champion measured elsewhere
    assert not d.promoted and aliases == (v3, v1) and "another set" in d.reasons[0]
    d = models.promote(name, v3, {"answer_agreement": 0.8}, gate, "answer_agreement", eval_set="set-B",
                       champion_metrics={"answer_agreement": 0.8})  # champion re-measured on set-B: equal
    assert d.promoted and d.previous_champion == v1
    client = mlflow.MlflowClient(env["uri"])
    assert client.get_model_version_by_alias(name, CHAMPION).version == v3
    assert client.get_model_version_by_alias(name, CHALLENGER).version == v3
    assert client.get_model_version(name, v2).tags["promotion"] == "rejected"
    assert json.loads(client.get_model_version(name, v3).tags["promotion_reasons"]) == d.reasons


# -- using the registered student ------------------------------------------------------------------
@pytest.fixture
def champion(env):
    return env["champion"]


def test_champion_loads_and_predicts_in_a_fresh_process(env, champion):
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/' + sys.argv[3] + '@champion')\n"
        "out = m.predict(pd.DataFrame({'image': [sys.argv[1]], 'question': [sys.argv[2]]}))\n"
        "print(json.dumps(out.to_dict('records')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(env["image"]), QUESTION, CHAMPION_NAME], capture_output=True,
                          text=True, timeout=120, cwd=env["tmp"],
                          env={**os.environ, "MLFLOW_TRACKING_URI": env["uri"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    assert row == json.loads(json.dumps(flatten_prediction(env["direct"])))
    assert isinstance(row["answer"], str) and isinstance(json.loads(row["masks"]), list)


def test_pyfunc_accepts_path_bytes_base64_and_list_of_dicts(env, champion):
    mlflow.set_tracking_uri(env["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{CHAMPION_NAME}@champion")
    raw = env["image"].read_bytes()
    b64 = base64.b64encode(raw).decode()
    frame = pd.DataFrame({"image": [str(env["image"]), raw, b64, f"data:image/png;base64,{b64}"],
                          "question": [QUESTION] * 4})
    out = model.predict(frame)
    assert list(out["answer"]) == [env["direct"]["answer"]] * 4
    assert list(out.columns) == list(models.SIGNATURE.outputs.input_names())
    listed = model.predict([{"image": b64, "question": QUESTION}])
    assert listed["answer"][0] == env["direct"]["answer"]


def test_bad_model_input_names_the_row_and_the_reason():
    with pytest.raises(ValueError, match="missing column.*question"):
        to_requests(pd.DataFrame({"image": ["x"]}))
    with pytest.raises(ValueError, match="row 1: 'image' is neither an existing file nor valid base64"):
        to_requests([{"image": base64.b64encode(b"ok").decode(), "question": "q"},
                     {"image": "/no/such/file.png", "question": "q"}])
    with pytest.raises(ValueError, match="row 0: 'question'"):
        to_requests([{"image": b"123", "question": "  "}])


def test_loading_never_unpickles(env, champion, monkeypatch):
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{CHAMPION_NAME}@champion", tracking_uri=env["uri"]))
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]

    def refuse(*a, **k):
        raise AssertionError("unpickling while loading the student")

    import cloudpickle

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(cloudpickle, "load", refuse)
    monkeypatch.setattr(cloudpickle, "loads", refuse)
    out = mlflow.pyfunc.load_model(str(folder), model_config={"device": "cpu"}).predict(models.example_input())
    assert isinstance(out["answer"][0], str)


def test_logged_model_has_signature_input_example_and_its_code(env, champion):
    import yaml

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{CHAMPION_NAME}@champion", tracking_uri=env["uri"]))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])] == ["image", "question"]
    assert "answer" in {c["name"] for c in json.loads(mlmodel["signature"]["outputs"])}
    example = mlmodel["saved_input_example_info"]
    assert (folder / example["artifact_path"]).is_file()
    saved = json.loads((folder / example["artifact_path"]).read_text())
    assert "question" in json.dumps(saved)
    code = mlmodel["flavors"]["python_function"]["code"]  # code_paths: the packages it imports
    for module in ("students/serving/predictor.py", "students/model/student.py", "teachers/records.py",
                   "registry/pyfunc_model.py", "rle.py", "images.py"):
        assert (folder / code / "distillery" / module).is_file(), module
    assert sorted(p.name for p in (folder / code).iterdir()) == ["distillery"]  # one namespace on sys.path
    assert not (folder / code / "distillery" / "cli.py").exists()
    assert not list((folder / code).rglob("__pycache__"))


def test_pull_writes_a_folder_that_answers_without_the_store(env, champion):
    mlflow.set_tracking_uri(env["uri"])
    to = env["tmp"] / "pulled"
    assert pull.pull(f"{CHAMPION_NAME}@champion", to) == to
    info = json.loads((to / "registry.json").read_text())
    assert info["name"] == CHAMPION_NAME and info["version"] == champion.version and CHAMPION in info["aliases"]
    assert info["tags"]["graph_fingerprint"] == LINEAGE["graph_fingerprint"]
    assert (to / "MLmodel").is_file() and (to / "student" / "model.safetensors").is_file()
    assert pull.pull(CHAMPION_NAME, to) == to  # bare name = champion; a re-pull replaces the folder
    # the whole store goes away, and the folders the student was built and logged from
    store = [env["tmp"] / name for name in ("mlflow.db", "mlartifacts", "student", "student-graph")]
    for path in store:
        path.rename(path.with_name(path.name + ".moved"))
    assert not any(path.exists() for path in store)
    try:
        from distillery.students.serving.predictor import StudentPredictor

        pulled = StudentPredictor.load(to / "student", device="cpu")
        assert pulled.predict([{"image": str(env["image"]), "question": QUESTION}])[0] == env["direct"]
        assert pull.predict_dir(to, env["image"], QUESTION) == env["direct"]
    finally:
        for path in store:
            path.with_name(path.name + ".moved").rename(path)


def test_pull_forms_and_errors(env, champion, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    to = pull.pull(f"{CHAMPION_NAME}/{champion.version}", tmp_path / "by-version", tracking_uri=env["uri"])
    assert json.loads((to / "registry.json").read_text())["version"] == champion.version
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        pull.pull(f"{CHAMPION_NAME}@champion", other)
    with pytest.raises(LookupError, match="no-such-model"):
        pull.pull("no-such-model@champion", tmp_path / "x")
    with pytest.raises(LookupError, match="no-such-model"):
        pull.pull("no-such-model", tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        pull.predict_dir(tmp_path, env["image"], QUESTION)
    shutil.rmtree(to)


# -- what the distill flow asks of the registry ----------------------------------------------------
def test_a_distillation_registers_once_per_traces_and_its_champion_is_pulled_with_its_spec(env, tmp_path):
    from distillery.flows.spec import load_spec

    mlflow.set_tracking_uri(env["uri"])
    spec = make_spec(env["uri"], name="distilled-model", gate={"answer_agreement": 0.5})
    assert models.find_registered(spec, "/data/t.lance", 4) is None and pull.pull_champion(spec, tmp_path) is None
    lineage = {"graph_fingerprint": "gf-1", "traces_uri": "/data/t.lance", "traces_version": 4}
    run_id = tracking.open_run(spec.registry, spec, run_name="distill")
    reg = models.register_distilled(spec, env["student"], {"answer_agreement": 0.8}, lineage, run_id,
                                    eval_set="/data/e.lance")
    assert reg["promoted"] and reg["run_id"] == run_id and reg["metrics"] == {"answer_agreement": 0.8}
    assert mlflow.MlflowClient().get_run(run_id).data.tags["registered_version"] == f"distilled-model/{reg['version']}"
    assert models.find_registered(spec, "/data/t.lance", 4) == {
        "model_name": "distilled-model", "version": reg["version"], "run_id": run_id, "promoted": True,
        "reasons": ["reused"]}
    assert models.find_registered(spec, "/data/t.lance", 5) is None  # new traces: distil again
    changed = make_spec(env["uri"], name="distilled-model", gate={"answer_agreement": 0.6})
    assert models.find_registered(changed, "/data/t.lance", 4) is None  # another spec: distil again
    champion = pull.pull_champion(spec, tmp_path)
    assert champion == {"version": reg["version"], "dir": str(tmp_path / "champion" / "student"), "traces_version": 4}
    assert load_spec(tmp_path / "champion" / "spec.yaml").spec_hash() == spec.spec_hash()  # the run's spec
    predictor = pull.load_predictor(f"distilled-model/{reg['version']}")
    assert predictor.predict([{"image": str(env["image"]), "question": QUESTION}])[0] == env["direct"]
