"""The trainer: checkpoints, exact resume (simulated and a real
SIGKILL), DDP on two CPU processes (gloo), and a real student trained from a real trace store.

The loop tests use a tiny stand-in module (forward + loss + save_pretrained, with dropout so the
RNG state matters); the last tests train the real ``MultimodalStudent`` through ``train``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from distillery.students.training.checkpoint import latest_checkpoint
from distillery.students.training.config import TrainConfig
from distillery.students.training.trainer import Trainer

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# A stand-in student: what the loop needs and nothing more
# ---------------------------------------------------------------------------------------------

class TinyStudent(nn.Module):
    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))

    def forward(self, batch):
        return {"head": {"y": self.net(batch["x"])}}  # (B, 2)

    def loss(self, batch, outputs=None):
        outputs = outputs if outputs is not None else self(batch)
        per_node = {"head": nn.functional.mse_loss(outputs["head"]["y"], batch["y"])}
        return per_node["head"], {k: v.detach() for k, v in per_node.items()}

    def save_pretrained(self, out_dir):
        save_model(self, str(Path(out_dir) / "model.safetensors"))


class Points(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0):
        w = torch.randn(4, 2, generator=torch.Generator().manual_seed(123))  # the same task for every split
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))  # (N, 4)
        self.y = self.x @ w  # (N, 2)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def config(**kw) -> TrainConfig:
    return TrainConfig(**({"epochs": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2,
                           "checkpoint_every": 3, "seed": 7, "device": "cpu"} | kw))


def run(out_dir, cfg=None, *, resume=False, callback=None, dropout=0.2, n=26, ctx=None, progress=False,
        model_cls=None):
    torch.manual_seed(cfg.seed if cfg else 7)
    model = (model_cls or TinyStudent)(dropout)
    trainer = Trainer(model, Points(n), Points(8, seed=1), cfg or config(), out_dir, ctx=ctx,
                      callback=callback, progress=progress)
    trainer.run(resume=resume)
    return trainer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


class Crash(RuntimeError):
    pass


def crash_at(step: int):
    def cb(event):
        if event["event"] == "step" and event["step"] == step:
            raise Crash(f"killed at step {step}")
    return cb


# ---------------------------------------------------------------------------------------------
# The loop, checkpoints, resume
# ---------------------------------------------------------------------------------------------

def test_loop_learns_and_writes_weights_only_checkpoints(tmp_path):
    events = []
    t = run(tmp_path, callback=events.append)
    hist = t.state.history
    assert [h["epoch"] for h in hist] == [1, 2, 3] and t.state.step == t.total_steps == 21  # ceil(26/4) * 3
    assert hist[-1]["val_loss/total"] < hist[0]["val_loss/total"]
    assert set(hist[0]) == {"epoch", "step", "train_loss/total", "train_loss/head", "val_loss/total", "val_loss/head"}
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("epoch") == 3 and kinds.count("step") == 21
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000018", "step_00000021"]  # every 3 steps + the last, 2 kept, no tmp
    state = torch.load(tmp_path / "checkpoints/step_00000021/state.pt", weights_only=True)
    assert state["loop"]["step"] == 21 and "optimizer" in state and "rng" in state
    saved = load_file(str(tmp_path / "checkpoints/step_00000021/model.safetensors"))
    assert_same_weights(saved, t.model.state_dict())


def test_each_epoch_prints_a_table_of_losses_per_node(tmp_path, capsys):
    t = run(tmp_path, config(epochs=2), progress=True)
    out = capsys.readouterr().out
    assert "epoch 1/2 - step 7/14" in out and "epoch 2/2 - step 14/14" in out
    last = t.state.history[-1]
    assert f"{last['train_loss/head']:.4f}" in out and f"{last['val_loss/head']:.4f}" in out


# 7 steps per epoch: killed mid-epoch 1 (last checkpoint at step 3), or in epoch 2 with the last
# checkpoint at the end of epoch 1 (step 7: the resumed run starts with that epoch's summary)
@pytest.mark.parametrize("kill_at, every", [(5, 3), (9, 7)])
def test_interrupted_run_resumes_to_exactly_the_same_weights(tmp_path, kill_at, every):
    straight = run(tmp_path / "a", config(checkpoint_every=every))
    with pytest.raises(Crash):
        run(tmp_path / "b", config(checkpoint_every=every), callback=crash_at(kill_at))
    resumed_events = []
    resumed = run(tmp_path / "b", config(checkpoint_every=every), resume=True, callback=resumed_events.append)
    assert resumed_events[0]["resumed"] and resumed_events[0]["step"] == (kill_at // every) * every
    assert_same_weights(weights(straight.model), weights(resumed.model))
    assert resumed.state.history == straight.state.history  # same losses, epoch by epoch


def test_max_steps_caps_the_run_and_resume_of_a_finished_run_changes_nothing(tmp_path):
    t = run(tmp_path, config(max_steps=10))
    assert t.state.step == 10 and len(t.state.history) == 2  # epoch 2 ends early at step 10
    before = weights(t.model)
    again = run(tmp_path, config(max_steps=10), resume=True)
    assert again.state.step == 10
    assert_same_weights(before, weights(again.model))


def test_resume_refuses_a_checkpoint_of_a_different_run(tmp_path):
    run(tmp_path, config(epochs=1))
    with pytest.raises(ValueError, match="different run"):
        run(tmp_path, config(epochs=2), resume=True)


def test_loader_workers_do_not_change_the_weights(tmp_path):
    assert_same_weights(weights(run(tmp_path / "a").model), weights(run(tmp_path / "b", config(num_workers=2)).model))


def test_resume_with_no_checkpoint_starts_from_scratch(tmp_path):
    a, b = run(tmp_path / "a"), run(tmp_path / "b", resume=True)
    assert_same_weights(weights(a.model), weights(b.model))


# -- a real kill: SIGKILL a training process mid-way, resume here ---------------------------------

def _train_slowly(out_dir: str) -> None:
    """Subprocess body: the same run as ``run``, a checkpoint every step, slowed down so the
    parent can kill it mid-way."""
    run(Path(out_dir), config(checkpoint_every=1, keep_checkpoints=50),
        callback=lambda e: time.sleep(0.15) if e["event"] == "step" else None)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_train; test_train._train_slowly(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "b")],
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            ckpt = latest_checkpoint(tmp_path / "b")
            if ckpt is not None and int(ckpt.name.split("_")[1]) >= 8:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the training process ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    killed_at = int(latest_checkpoint(tmp_path / "b").name.split("_")[1])
    assert 8 <= killed_at < 21
    resumed = run(tmp_path / "b", config(checkpoint_every=1, keep_checkpoints=50), resume=True)
    straight = run(tmp_path / "a", config(checkpoint_every=1, keep_checkpoints=50))
    assert_same_weights(weights(straight.model), weights(resumed.model))


# ---------------------------------------------------------------------------------------------
# DDP: two CPU processes on gloo
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, real: dict) -> None:
    """One torchrun-style process: the env variables torchrun sets, then the stand-in loop and a
    real ``train`` run; each rank saves the weights it ended with."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from distillery.flows.spec import Spec
    from distillery.students.training.train import train
    from distillery.students.training.trainer import setup_distributed

    cfg = config(batch_size=4, epochs=2)
    ctx = setup_distributed(cfg)
    assert ctx.distributed and torch.distributed.get_backend() == "gloo"
    t = run(Path(out_dir) / "tiny", cfg, dropout=0.0, n=32, ctx=ctx)
    save_model(t.model, str(Path(out_dir) / f"tiny-rank{rank}.safetensors"))
    result = train(Spec.model_validate_json(real["spec"]), real["traces"], out_dir=Path(out_dir) / "student",
                   init_from=real["init_from"], replay=real["replay"], progress=False)
    save_model(result.model, str(Path(out_dir) / f"student-rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_ddp_on_two_cpu_processes_keeps_ranks_identical_and_averages_gradients(tmp_path, real_setup, trained):
    from dataclasses import replace

    from distillery.teachers.records import make_input_id
    from distillery.teachers.store import TraceStore

    # the real part is a continual run: store v2, warm start from the v1 student, v1 inputs replayed
    old = TraceStore(real_setup["traces"]).read(version=1)
    replay = [replace(r, question="old " + r.question, input_id=make_input_id(r.image_bytes, "old " + r.question))
              for r in old]
    # with batch echoing (text-only steps leave the vision encoder unused: DDP must allow it)
    spec = real_setup["spec"].model_copy(update={"training": real_config(epochs=1, replay_fraction=1.0,
                                                                         text_echo=1)})
    real = {"spec": spec.model_dump_json(), "traces": real_setup["traces"] + "@2", "replay": replay,
            "init_from": str(trained[0].out_dir)}
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), real), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"tiny-rank{r}.safetensors")) for r in (0, 1))
    assert_same_weights(r0, r1)
    # two ranks x 4 records per step == one process x 8 records per step (same order, mean loss)
    single = run(tmp_path / "single", config(batch_size=8, epochs=2), dropout=0.0, n=32)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-6)
    assert latest_checkpoint(tmp_path / "tiny") is not None  # rank 0 wrote checkpoints
    # the real student: same weights (BatchNorm statistics included) on both ranks, one student written
    s0, s1 = (load_file(str(tmp_path / f"student-rank{r}.safetensors")) for r in (0, 1))
    assert_same_weights(s0, s1)
    assert_same_weights(s0, load_file(str(tmp_path / "student" / "model.safetensors")))
    lineage = json.loads((tmp_path / "student" / "lineage.json").read_text())
    assert lineage["world_size"] == 2 and lineage["traces_version"] == 2 and lineage["num_records"] == 5
    assert lineage["num_replay"] >= 1 and lineage["init_from"] == str(trained[0].out_dir)
    assert lineage["steps"] >= 2  # a second step after a backward: DDP saw every parameter used


# ---------------------------------------------------------------------------------------------
# The real student, through ``train``, from a real trace store
# ---------------------------------------------------------------------------------------------

def real_config(**kw) -> TrainConfig:
    return TrainConfig(**({"epochs": 2, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 1,
                           "keep_checkpoints": 10, "val_fraction": 0.3, "agreement_every": 0, "device": "cpu",
                           "seed": 3} | kw))


@pytest.fixture(scope="module")
def real_setup(tmp_path_factory):
    """A spec over tiny graph files, and a Lance trace store with two versions: v1 holds three
    scenes plus a record whose llm node failed (same image as scene 0, another question); v2
    adds a fourth scene."""
    from dataclasses import replace

    from student_support import make_records, tiny_config, write_graph

    from distillery.flows.spec import load_spec
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.records import make_input_id
    from distillery.teachers.store import TraceStore

    root = tmp_path_factory.mktemp("real")
    spec = load_spec(write_graph(root))
    spec = spec.model_copy(update={"student": tiny_config(), "training": real_config()})
    fp = TeacherGraph(spec.teachers).fingerprint
    recs = [replace(r, graph_fingerprint=fp) for r in make_records()]
    q = "is any box red ?"
    failed = replace(recs[0], input_id=make_input_id(recs[0].image_bytes, q), question=q, status="quarantined",
                     reason="node_error:reasoner", detail="boom", errors={"reasoner": "boom"},
                     outputs={k: v for k, v in recs[0].outputs.items() if k != "reasoner"})
    store = TraceStore(root / "traces.lance")
    assert store.append(recs[:3] + [failed]) == 1 and store.append(recs[3:]) == 2
    return {"root": root, "spec": spec, "traces": str(root / "traces.lance")}


@pytest.fixture(scope="module")
def trained(real_setup):
    from distillery.students.training.train import train

    events = []
    result = train(real_setup["spec"], real_setup["traces"] + "@1", out_dir=real_setup["root"] / "student",
                   callback=events.append)
    return result, events


def test_train_writes_a_student_with_metrics_and_the_lineage_of_the_version_read(real_setup, trained):
    from student_support import SCENES, png

    from distillery.students.serving.predictor import StudentPredictor

    result, events = trained
    out = real_setup["root"] / "student"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "metrics.json", "lineage.json"):
        assert (out / name).is_file(), name
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["traces_version"] == result.traces_version == 1  # not the latest (2)
    assert lineage["num_records"] == 4 and result.num_train + result.num_val == 4  # node-failed record kept
    assert lineage["graph_fingerprint"] and lineage["spec_hash"] == real_setup["spec"].spec_hash()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["val_loss"]) == {"total", "detector", "retriever", "reasoner"}
    assert {"map50", "map50_95", "mask_iou"} <= set(metrics["agreement"]["detector"])
    assert {"top1", "recall@2"} <= set(metrics["agreement"]["retriever"])
    assert {"answer_em", "token_kl"} <= set(metrics["agreement"]["reasoner"])
    assert [e["event"] for e in events].count("epoch") == 2 and len(result.history) == 2
    assert result.history[-1]["agreement/reasoner/answer_em"] == metrics["agreement"]["reasoner"]["answer_em"]
    assert_same_weights(load_file(str(out / "model.safetensors")), weights(result.model))
    w, h, objects, question, _ = SCENES[0]
    pred = StudentPredictor.load(out).predict([{"image": png(w, h, objects), "question": question}])
    assert {"detector", "retriever", "reasoner", "answer"} <= set(pred[0])


def test_warm_start_copies_every_tensor_whose_shape_still_fits(real_setup, trained):
    from student_support import make_records, tiny_config

    from distillery.students.model.student import MultimodalStudent
    from distillery.students.model.schema import build_schema
    from distillery.students.training.train import warm_start

    saved = load_file(str(trained[0].out_dir / "model.safetensors"))
    schema = build_schema(real_setup["spec"], make_records())
    model = MultimodalStudent(tiny_config(), schema)
    assert warm_start(model, trained[0].out_dir) == {"copied": len(saved), "kept_fresh": 0}
    assert_same_weights(saved, weights(model))
    schema.nodes["retriever"]["doc_ids"].append("a-new-document")  # the knowledge base grew
    grown = MultimodalStudent(tiny_config(), schema)
    counts = warm_start(grown, trained[0].out_dir)
    assert counts["kept_fresh"] >= 1 and counts["copied"] == len(saved) - counts["kept_fresh"]
    assert torch.equal(grown.state_dict()["vision.stem.0.weight"], saved["vision.stem.0.weight"])
    with pytest.raises(FileNotFoundError, match="not a saved student"):
        warm_start(grown, real_setup["root"])


def test_real_student_killed_mid_run_resumes_to_the_same_weights(real_setup, trained):
    from distillery.students.training.train import train

    out = real_setup["root"] / "resumed"
    with pytest.raises(Crash):
        train(real_setup["spec"], real_setup["traces"], version=1, out_dir=out, progress=False,
              callback=crash_at(3))
    result = train(real_setup["spec"], real_setup["traces"], version=1, out_dir=out, progress=False, resume=True)
    assert_same_weights(weights(trained[0].model), weights(result.model))
    assert result.history == trained[0].history
