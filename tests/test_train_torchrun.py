"""Training on several processes through torchrun: `distillery train --nproc-per-node 2` runs two
CPU processes on gloo under `torch.distributed.run`, ends where one process with the same global
batch ends (within tolerance: BatchNorm sees each rank's half batch), and a 2-process run killed
with SIGKILL mid-way leaves no process behind and resumes from its checkpoint to the very weights
of the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from distillery.students.training.checkpoint import latest_checkpoint

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TRAINING = {"epochs": 6, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 1,
            "keep_checkpoints": 50, "val_fraction": 0.0, "agreement_every": 0, "device": "cpu", "seed": 3,
            "onnx_export": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A spec YAML and a trace store of 8 records (4 images, each under two ids)."""
    from student_support import make_records, tiny_config, write_graph

    from distillery.flows.spec import load_spec
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.records import make_input_id
    from distillery.teachers.store import TraceStore

    root = tmp_path_factory.mktemp("torchrun")
    spec = load_spec(write_graph(root))
    spec = spec.model_copy(update={"student": tiny_config(), "training": type(spec.training)(**TRAINING)})
    fp = TeacherGraph(spec.teachers).fingerprint
    recs = [replace(r, graph_fingerprint=fp) for r in make_records()]
    recs += [replace(r, input_id=make_input_id(r.image_bytes, r.question + " again")) for r in recs]
    TraceStore(root / "traces.lance").append(recs)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return {"root": root, "spec": spec, "spec_path": path, "traces": str(root / "traces.lance")}


def train_cmd(setup, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distillery.cli", "train", str(setup["spec_path"]), "--traces", setup["traces"],
            "--out", str(out), *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(TESTS)}


@pytest.fixture(scope="module")
def two_procs(setup):
    out = setup["root"] / "two"
    done = subprocess.run(train_cmd(setup, out, "--nproc-per-node", "2"), env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def test_two_gloo_processes_under_torchrun_end_where_one_process_does(setup, two_procs):
    from distillery.students.training.train import train

    out, printed = two_procs
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["world_size"] == 2 and lineage["num_train"] == 8
    assert printed["out_dir"] == str(out.resolve()) and (out / "train_result.json").is_file()
    # one process with the same global batch (2 ranks x 2 records = 4 records a step)
    spec = setup["spec"]
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"batch_size": 4})})
    single = train(spec, setup["traces"], out_dir=setup["root"] / "one", progress=False)
    assert single.lineage["world_size"] == 1 and single.lineage["steps"] == lineage["steps"] == 12
    two = json.loads((out / "train_result.json").read_text())
    assert two["history"][0]["train_loss/total"] == pytest.approx(single.history[0]["train_loss/total"], rel=0.05)
    assert two["history"][-1]["train_loss/total"] == pytest.approx(single.history[-1]["train_loss/total"],
                                                                   rel=0.15)
    # the weights: far closer to the 1-process run's than another seed's run is
    other = train(spec.model_copy(update={"training": spec.training.model_copy(update={"seed": 4})}),
                  setup["traces"], out_dir=setup["root"] / "other-seed", progress=False)
    names = [n for n, _ in single.model.named_parameters()]  # BatchNorm's running statistics aside
    two_w = load_file(str(out / "model.safetensors"))
    ref = single.model.state_dict()
    drift, seed_gap = (relative_distance(w, ref, names) for w in (two_w, other.model.state_dict()))
    assert drift < 0.2 * seed_gap, f"2 processes vs 1: {drift:.4f}; another seed: {seed_gap:.4f}"


def relative_distance(a: dict, b: dict, names: list[str]) -> float:
    """||a - b|| / ||b|| over the named tensors."""
    num = sum(float((a[n].float() - b[n].float()).pow(2).sum()) for n in names)
    return (num / sum(float(b[n].float().pow(2).sum()) for n in names)) ** 0.5


def test_a_killed_two_process_run_leaves_nothing_behind_and_resumes_to_the_same_weights(setup, two_procs):
    out = setup["root"] / "killed"
    proc = subprocess.Popen(train_cmd(setup, out, "--nproc-per-node", "2"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, tree = time.time() + 240, []
        while time.time() < deadline and proc.poll() is None:
            tree = psutil.Process(proc.pid).children(recursive=True) or tree
            ckpt = latest_checkpoint(out)
            if ckpt is not None and int(ckpt.name.split("_")[1]) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        tree = psutil.Process(proc.pid).children(recursive=True)
        cmds = [p.cmdline() for p in tree]
        ranks = [c for c in cmds if "distillery.flows.train" in c and "torch.distributed.run" not in c]
        assert len(ranks) == 2 and any("torch.distributed.run" in c for c in cmds), cmds  # agent + 2 ranks
        proc.send_signal(signal.SIGKILL)  # the CLI: its torchrun agent and both ranks must go with it
        proc.wait(10)
    finally:
        proc.kill()
    gone, alive = psutil.wait_procs(tree, timeout=20)
    assert alive == [], f"left behind: {[p.cmdline() for p in alive]}"
    killed_at = int(latest_checkpoint(out).name.split("_")[1])
    assert 3 <= killed_at < 12
    resumed = subprocess.run(train_cmd(setup, out, "--nproc-per-node", "2", "--resume"), env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight, again = (load_file(str(d / "model.safetensors")) for d in (two_procs[0], out))
    assert straight.keys() == again.keys()
    for k in straight:
        assert torch.equal(straight[k], again[k]), f"{k} differs after the resume"


def test_the_launch_command_is_torchrun_with_the_spec_s_processes_nodes_and_rendezvous(setup):
    from distillery.flows.launch import torchrun_command

    spec = setup["spec"]
    one = torchrun_command(spec.model_copy(update={"training": spec.training.model_copy(
        update={"nproc_per_node": 4})}), "p.json", "out")
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=4" in one and "--standalone" in one
    assert one[-3:] == ["-m", "distillery.flows.train", "p.json"]
    training = type(spec.training).model_validate(spec.training.model_dump() | {
        "nproc_per_node": 8, "nnodes": "2", "rdzv_endpoint": "10.0.0.1:29400"})
    two = torchrun_command(spec.model_copy(update={"training": training}), "p.json", "out")
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400"} <= set(two)
    assert "--standalone" not in two
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        type(spec.training).model_validate(spec.training.model_dump() | {"nnodes": "2"})
