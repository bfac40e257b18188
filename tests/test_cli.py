"""The `distillery` command on the tiny demo, in process (typer's CliRunner): `example` builds a
folder and prints a record command that runs; `train` on `URI@1` prints per-epoch tables and the
version it read; `eval` prints the table or one JSON report for a folder or a registry URI; bad
input exits 2 with one line naming it, never a traceback."""

from __future__ import annotations

import json
import shlex
import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distillery.cli import app

RUNNER = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich tables keep their headers
REPORT_KEYS = {"n_records", "student_vs_teacher", "student_vs_truth", "teacher_vs_truth", "retained",
               "split", "preset", "model"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def invoke(*args):
    result = RUNNER.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.strip()][-1])


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err and "Traceback" not in result.output, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def example(tiny_demo, tmp_path_factory):
    """`distillery example DIR --json`, with the session's tiny teachers already in DIR/teachers
    (ensure_teachers caches by a fingerprint of world + configs, so they are reused, not retrained)."""
    root = tmp_path_factory.mktemp("cli-example")
    teachers = Path(tiny_demo["teachers"].yolo_weights).parent
    shutil.copytree(teachers, root / "teachers" / teachers.name)
    result = invoke("example", root, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout is the JSON object alone


@pytest.fixture(scope="module")
def recorded(example, prefect_harness):
    """The example's printed `--json` record command, run as printed."""
    args = shlex.split(example["commands"]["record_json"])
    assert args[0] == "distillery"
    result = invoke(*args[1:])
    assert result.exit_code == 0, result.output
    return last_json(result.stdout)


@pytest.fixture(scope="module")
def small_spec(example):
    """The example's spec with a tiny student and its own registered-model name."""
    from student_support import tiny_config

    spec = yaml.safe_load(Path(example["spec"]).read_text())
    spec["student"] = tiny_config().model_dump(mode="json")
    spec["registry"] = {**spec.get("registry", {}), "model_name": f"cli-test-{uuid.uuid4().hex[:8]}"}
    path = Path(example["dir"]) / "spec-small.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(example, recorded, small_spec):
    out = Path(example["dir"]) / "student"
    result = invoke("train", small_spec, "--traces", f"{example['traces']}@1", "--out", out)
    assert result.exit_code == 0, result.output
    return {"out": out, "result": result}


# ---------------------------------------------------------------------------------------------
# example + record
# ---------------------------------------------------------------------------------------------

def test_example_builds_a_spec_inputs_and_teachers_and_a_second_call_reuses_them(example):
    root = Path(example["dir"])
    assert example["reused"]["teachers"] is True  # the cached teachers, found by fingerprint
    assert Path(example["spec"]) == root / "spec.yaml" and Path(example["yolo_weights"]).is_file()
    assert (Path(example["inputs"]) / "requests.jsonl").is_file() and Path(example["documents"]).is_file()
    assert example["images"] > 0 and example["requests"] >= example["images"]
    again = invoke("example", root)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == example["commands"]["record"]  # stdout: exactly the command
    assert "reused world and teachers" in again.stderr


def test_the_printed_record_command_records_every_input(example, recorded):
    assert recorded["written"] == example["requests"] and recorded["quarantined"] == 0
    assert recorded["traces"] == example["traces"] and recorded["version"] >= 1
    assert set(recorded["node_seconds"]) == {"detector", "retriever", "reasoner"}  # what each node cost
    assert all(s > 0 for s in recorded["node_seconds"].values()) and recorded["usage"] == {}  # no API node


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def test_train_on_a_pinned_version_prints_epochs_agreement_and_the_version_read(trained):
    result, out = trained["result"], trained["out"]
    assert (Path(out) / "spec.yaml").is_file()  # the spec travels with the student (eval reads it)
    assert "epoch 1/" in result.output and "agreement with the teacher" in result.output
    assert "answer_em" in result.output and "map50" in result.output
    report = last_json(result.stdout)
    assert report["traces_version"] == 1 and Path(report["out_dir"]) == out
    assert set(report["metrics"]["agreement"]) == {"detector", "retriever", "reasoner"}
    assert json.loads((out / "lineage.json").read_text())["traces_version"] == 1
    assert (out / "model.safetensors").is_file()


def test_train_on_policy_resumes_the_finished_offline_run_and_reports_its_teacher_calls(example, small_spec,
                                                                                          trained, tmp_path):
    """`--on-policy --resume` on a finished offline run: no offline epoch again (the run key ignores
    training.on_policy), then the rounds, their teacher calls counted in the output and the JSON."""
    spec = yaml.safe_load(small_spec.read_text())
    spec.setdefault("training", {})["on_policy"] = {"rounds": 2, "samples_per_round": 6, "steps_per_round": 2}
    path = tmp_path / "spec-onpolicy.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = Path(shutil.copytree(trained["out"], tmp_path / "student"))
    result = invoke("train", path, "--traces", f"{example['traces']}@1", "--out", out, "--resume", "--on-policy")
    assert result.exit_code == 0, result.output
    assert "on-policy: 2 round(s)" in result.output and "teacher calls" in result.output
    metrics = last_json(result.stdout)["metrics"]
    assert metrics["steps"] == last_json(trained["result"].stdout)["metrics"]["steps"]  # no offline step again
    op = metrics["on_policy"]
    assert op["rounds"] == 2 and op["scored"] + op["skipped"] == op["answered"] and op["teacher_calls"] == op["scored"]
    # 6 answers a round, or none where the tiny example's LLM teacher never finishes an answer (said so)
    assert op["answered"] == 12 or (op["answered"] == 0 and "no training record has a usable" in result.output)
    assert (out / "checkpoints_onpolicy").is_dir()


def test_train_on_policy_under_torchrun_exits_2_saying_why(example, small_spec):
    result = invoke("train", small_spec, "--traces", example["traces"], "--on-policy", "--nproc-per-node", "2")
    assert_clean_error(result, "--on-policy", "one process")


@pytest.mark.parametrize("suffix", ["@x", "@0", "@99", "-missing.lance"])
def test_bad_traces_exit_2_naming_them(example, recorded, suffix):
    traces = example["traces"].removesuffix(".lance") + suffix if suffix.endswith(".lance") else \
        example["traces"] + suffix
    result = invoke("train", example["spec"], "--traces", traces, "--out", Path(example["dir"]) / "never")
    assert_clean_error(result, "--traces", traces)
    assert not (Path(example["dir"]) / "never" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_report(example, trained):
    args = ("eval", trained["out"], "--workdir", example["dir"], "--preset", "tiny")
    table = invoke(*args)
    assert table.exit_code == 0, table.output
    as_json = invoke(*args, "--json")
    assert as_json.exit_code == 0, as_json.output
    return {"table": table, "report": json.loads(as_json.stdout)}  # stdout is one JSON object


def test_eval_of_a_folder_prints_the_table_and_the_json_report(folder_report, trained):
    out = folder_report["table"].stdout
    for text in ("student vs teacher", "student vs truth", "teacher vs truth", "retained",
                 "detector", "retriever", "reasoner", "answer exact match by question type"):
        assert text in out, text
    report = folder_report["report"]
    assert REPORT_KEYS <= set(report) and report["split"] == "test" and report["preset"] == "tiny"
    assert report["model"] == str(trained["out"]) and report["n_records"] > 0
    assert set(report["student_vs_teacher"]) == {"detector", "retriever", "reasoner"}


def test_eval_of_a_registry_uri_pulls_the_same_student(example, trained, small_spec, folder_report):
    from distillery.cli import resolve_student
    from distillery.flows.spec import load_spec
    from distillery.registry.models import log_and_register

    spec = load_spec(small_spec)
    mv = log_and_register(trained["out"], spec, {"answer_agreement": 0.0})
    uri = f"models:/{spec.registry.model_name}/{mv.version}"
    result = invoke("eval", uri, "--workdir", example["dir"], "--preset", "tiny", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == uri and str(report["registry"]["version"]) == str(mv.version)
    assert report["student_vs_teacher"] == folder_report["report"]["student_vs_teacher"]  # same weights
    folder, pulled = resolve_student(f"runs:/{mv.run_id}/student", Path(example["dir"]) / "dl-runs")
    assert pulled is None
    assert (folder / "model.safetensors").read_bytes() == (trained["out"] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("what", ["missing-folder", "not-a-student", "unknown-uri", "unknown-name", "bad-split"])
def test_eval_bad_input_exits_2_with_one_line(example, what):
    root = Path(example["dir"])
    target = {"missing-folder": str(root / "no-such-student"), "not-a-student": str(root / "world"),
              "unknown-uri": "models:/no-such-model@champion", "unknown-name": "no-such-model",
              "bad-split": str(root / "world")}[what]
    extra = ["--split", "dev"] if what == "bad-split" else []
    result = invoke("eval", target, "--workdir", root, "--preset", "tiny", *extra)
    assert_clean_error(result, "dev" if what == "bad-split" else target)


# ---------------------------------------------------------------------------------------------
# eval on a user's own held-out inputs (the generic path)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs_report(example, trained):
    """The example's printed eval command, run as printed: the student on the held-out split of
    the example's world, whose labels are a COCO annotations.json and labelled request lines; the
    spec makes eval record that split's traces first."""
    args = shlex.split(example["commands"]["eval"])
    assert args[0] == "distillery" and "--inputs" in args
    result = invoke(*args[1:], "--json")
    assert result.exit_code == 0, result.output
    return {"args": args, "report": json.loads(result.stdout)}


def test_eval_on_held_out_inputs_reports_truth_and_retained(inputs_report, example, folder_report):
    report = inputs_report["report"]
    assert REPORT_KEYS - {"split", "preset"} <= set(report) and report["labels"]["labelled"] == report["n_records"]
    assert set(report["student_vs_truth"]) == {"detector", "retriever", "reasoner"}
    assert report["inputs"] == str(Path(example["dir"]) / "world" / "test")
    assert report["student_vs_teacher"] == folder_report["report"]["student_vs_teacher"]  # the demo path is this path


def test_eval_on_inputs_without_their_traces_says_how_to_record_them(example, trained, inputs_report, tmp_path):
    inputs = Path(example["dir"]) / "world" / "test"
    student = Path(shutil.copytree(trained["out"], tmp_path / "student"))
    (student / "spec.yaml").unlink()  # a student folder without the spec training saved beside it
    result = invoke("eval", student, "--inputs", inputs)
    assert_clean_error(result, "--traces", f"distillery record SPEC --inputs {inputs}")
    missing = tmp_path / "none.lance"
    result = invoke("eval", student, "--inputs", inputs, "--traces", missing)  # no spec with the student
    assert_clean_error(result, f"trace store {missing}", f"distillery record SPEC --inputs {inputs} --traces {missing}")
    traces = inputs_report["args"][inputs_report["args"].index("--traces") + 1]
    result = invoke("eval", student, "--inputs", inputs, "--traces", traces, "--json")  # now recorded
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["spec"] is None  # the student's lineage named the teacher graph


def test_eval_with_a_bad_label_file_names_file_and_line(example, trained, tmp_path):
    shutil.copytree(Path(example["dir"]) / "world" / "test", tmp_path / "held-out")
    path = tmp_path / "held-out" / "requests.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "documents": "meaning-pump"})
    path.write_text("\n".join(lines) + "\n")
    result = invoke("eval", trained["out"], "--inputs", tmp_path / "held-out", "--traces", tmp_path / "t.lance",
                    "--spec", example["spec"])
    assert_clean_error(result, f"{path} line 3: 'documents' must be a list")
    assert not (tmp_path / "t.lance").exists()  # refused before any teacher ran
