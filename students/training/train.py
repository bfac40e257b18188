"""Train the student on a named version of the trace store and write it out.

``train`` reads the records of one store version (the exact version read is kept for lineage),
splits them by IMAGE (sha256 of the image bytes, so an image asked about with several questions
never sits on both sides), mixes in replayed older records for continual runs, builds the
student from the spec (or warm-starts it from a saved one), runs the ``Trainer`` and writes the
student folder:

    out_dir/model.safetensors  config.json  tokenizer files   (the student: no pickle)
    out_dir/metrics.json       final validation losses and agreement with the teacher per node
    out_dir/lineage.json       traces uri + version, graph fingerprint, spec hash, record counts
    out_dir/checkpoints/       resumable checkpoints (``resume=True`` continues from the latest)

Under torchrun every process calls ``train`` the same way; only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from distillery.students.model.config import StudentConfig
from distillery.students.training.config import TrainConfig
from distillery.students.training.trainer import Callback, Dist, Trainer, seed_everything, setup_distributed, unflatten
from distillery.teachers.base import NodeConfig
from distillery.teachers.inputs import InputsConfig
from distillery.teachers.records import TeacherRecord


class Spec(Protocol):
    """What training reads of a spec (``distillery.flows.spec.Spec`` has it): the teacher graph
    (which records are its, what the heads predict), the student and the training settings."""

    name: str
    teachers: Mapping[str, NodeConfig]
    inputs: InputsConfig
    student: StudentConfig
    training: TrainConfig

    def topological_order(self) -> list[str]: ...


# ---------------------------------------------------------------------------------------------
# Data: read one version, split by image (no leakage), replay
# ---------------------------------------------------------------------------------------------

@dataclass
class Traces:
    """The records ``train`` read, and exactly where from."""

    uri: str
    version: int
    fingerprint: str
    records: list[TeacherRecord]


def usable(record: TeacherRecord) -> bool:
    """Ok records, and records quarantined by a node error that still carry the image and the
    upstream nodes' outputs (the failed node is left out of that record's loss only)."""
    if record.status == "ok":
        return True
    return bool((record.reason or "").startswith("node_error:") and record.image_bytes and record.outputs)


def read_traces(spec: Spec, traces: str, version: int | None = None, ctx: Dist | None = None) -> Traces:
    """The usable records of ``traces`` (``URI`` or ``URI@VERSION``) at one pinned version,
    recorded by this spec's teacher graph (its fingerprint). Under DDP every rank reads the
    version rank 0 pinned, even if a commit lands in between."""
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.store import TraceStore, parse_traces_ref

    uri, ref_version = parse_traces_ref(str(traces))
    if version is not None and ref_version is not None and version != ref_version:
        raise ValueError(f"traces {traces!r} names version {ref_version} but version={version} was asked")
    store = TraceStore(uri)
    pinned = version if version is not None else ref_version if ref_version is not None else store.version
    if pinned is None:
        raise ValueError(f"trace store {uri} holds no commit yet: record traces first")
    if ctx is not None and ctx.distributed:
        shared = torch.tensor([pinned], device=ctx.device)
        dist.broadcast(shared, src=0)
        pinned = int(shared.item())
    fingerprint = TeacherGraph(spec.teachers).fingerprint
    records = [r for r in store.read(version=pinned, fingerprint=fingerprint, status=None) if usable(r)]
    if not records:
        raise ValueError(f"trace store {uri} at version {pinned} holds no usable record for this spec's "
                         f"teacher graph (fingerprint {fingerprint}); record traces with this spec first")
    return Traces(str(uri), int(pinned), fingerprint, records)


def image_key(record: TeacherRecord) -> str:
    """What identifies an image: sha256 of its bytes (falls back to its path, then input id)."""
    if record.image_bytes:
        return hashlib.sha256(record.image_bytes).hexdigest()
    return record.image_path or record.input_id


def _bucket(key: str) -> float:
    """A stable number in [0, 1) from a key (independent of the seed, so splits never move)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / 16**15


def split_by_image(records: Sequence[TeacherRecord], val_fraction: float) -> tuple[list, list]:
    """Train/validation split by a hash of each record's IMAGE (sha256 of its bytes).

    Records sharing an image (different questions) always land on the same side, so no image
    seen in training is validated on. With two or more images and ``val_fraction > 0`` the
    validation side is never empty (the lowest-hash image goes there)."""
    keys = {image_key(r) for r in records}
    val_keys = {k for k in keys if _bucket(k) < val_fraction}
    if val_fraction > 0 and not val_keys and len(keys) > 1:
        val_keys = {min(keys, key=_bucket)}
    train = [r for r in records if image_key(r) not in val_keys]
    val = [r for r in records if image_key(r) in val_keys]
    return train, val


def mix_replay(train: list, val: list, replay: Sequence[TeacherRecord] | None) -> tuple[list, int]:
    """Add the older records to the training side, except any whose image is in the validation
    split or whose input is already among the records (draw the sample beforehand, e.g. with
    ``students.continual.replay_sample`` and ``training.replay_fraction``)."""
    if not replay:
        return train, 0
    val_images = {image_key(r) for r in val}
    seen = {r.input_id for r in itertools.chain(train, val)}
    picked = []
    for r in replay:
        if usable(r) and image_key(r) not in val_images and r.input_id not in seen:
            seen.add(r.input_id)
            picked.append(r)
    return train + picked, len(picked)


@dataclass
class Split:
    """The records a run trains and validates on."""

    train: list[TeacherRecord]
    val: list[TeacherRecord]
    num_replay: int = 0


def make_split(records: list[TeacherRecord], val_fraction: float, replay: Sequence[TeacherRecord] | None = None,
               only_ids: Collection[str] | None = None) -> Split:
    """Split by image, keep only ``only_ids`` (the records new since the last run) on both
    sides, and add the replayed records to the training side (never a validation image)."""
    train, val = split_by_image(records, val_fraction)
    if only_ids is not None:
        keep = set(only_ids)
        train, val_new = [r for r in train if r.input_id in keep], [r for r in val if r.input_id in keep]
    else:
        val_new = val
    train, n_replay = mix_replay(train, val, replay)
    if not train:
        raise ValueError(f"no training records: {len(records)} usable records, "
                         f"{len(only_ids) if only_ids is not None else 'all'} selected, {len(val)} held out")
    return Split(train, val_new, n_replay)


# ---------------------------------------------------------------------------------------------
# The student: warm start, outputs
# ---------------------------------------------------------------------------------------------

def warm_start(model: torch.nn.Module, init_from: str | Path) -> dict[str, int]:
    """Continual distillation: copy every tensor of a saved student whose name and shape match
    (heads whose size changed, e.g. a grown knowledge base, keep their fresh init)."""
    path = Path(init_from) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"init_from {init_from}: no model.safetensors there (not a saved student)")
    saved, own = load_file(str(path)), model.state_dict()
    for k in [k for k in saved if k not in own and k.endswith((".weight", ".bias"))]:
        alt = ".base_layer.".join(k.rsplit(".", 1))  # LoRA: a saved (merged) X.weight is X.base_layer.weight here
        if alt in own:
            saved[alt] = saved.pop(k)
    same = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(same, strict=False)
    return {"copied": len(same), "kept_fresh": len(own) - len(same)}


def run_key(spec: Spec, data: Traces, split: Split, ctx: Dist, init_from: str | Path | None) -> str:
    """What a checkpoint must match to be resumed: the exact records, the student and training
    settings, the warm start and the number of processes."""
    ids = hashlib.sha256(" ".join([r.input_id for r in split.train] + ["|"] + [r.input_id for r in split.val])
                         .encode()).hexdigest()
    blob = json.dumps({"traces": [data.uri, data.version, data.fingerprint], "records": ids,
                       "world": ctx.world_size, "student": spec.student.model_dump(mode="json"),
                       # the on-policy rounds come after: a run that adds them resumes the offline checkpoints
                       "training": spec.training.model_dump(mode="json", exclude={"on_policy"}),
                       "init_from": str(init_from) if init_from else None}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last epoch's losses and the last agreement measured, nested per node."""
    last = unflatten(history[-1]) if history else unflatten({})
    measured = [unflatten(h)["agreement"] for h in history]
    agreement = next((a for a in reversed(measured) if a), {})
    return {"train_loss": last["train_loss"], "val_loss": last["val_loss"], "agreement": agreement,
            "epochs": last.get("epoch", 0), "steps": last.get("step", 0)}


SPEC_FILE = "spec.yaml"  # the spec the student was distilled with, beside it (eval reads it)


def write_spec(out_dir: Path, spec: Spec) -> Path | None:
    """The spec as ``out_dir/spec.yaml`` (tmp + rename), when it is a pydantic spec."""
    import yaml

    if not hasattr(spec, "model_dump"):
        return None
    path = Path(out_dir) / SPEC_FILE
    tmp = path.with_name(f".{SPEC_FILE}.tmp")
    tmp.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
    return path


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (tmp + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    tmp.replace(path)


@dataclass
class TrainResult:
    """What a training run produced; everything the CLI, the flow and the registry need."""

    out_dir: Path  # the saved student
    traces_uri: str
    traces_version: int  # the exact store version read (lineage)
    metrics: dict[str, Any]  # train_loss / val_loss {node: v}, agreement {node: {metric: v}}
    history: list[dict[str, Any]]  # one flat row per epoch (see Trainer.end_epoch)
    num_train: int
    num_val: int
    num_replay: int
    seconds: float
    lineage: dict[str, Any] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)  # the trained student, in memory


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def train(spec: Spec, traces: str, version: int | None = None, out_dir: str | Path | None = None, *,
          resume: bool = False, init_from: str | Path | None = None,
          replay: Sequence[TeacherRecord] | None = None, only_ids: Collection[str] | None = None,
          progress: bool = True, callback: Callback | None = None) -> TrainResult:
    """Distill the teacher graph's traces into the student and save it in ``out_dir``.

    traces: store URI, or ``URI@VERSION``; version: the store version (default: the latest; the
    version actually read is recorded). resume: continue from ``out_dir/checkpoints``.
    init_from: a saved student to warm-start from. replay: older records to mix into training
    (as given). only_ids: train and validate only on these input ids (continual runs: the new
    records). callback: receives every progress event (rank 0)."""
    from distillery.students.data import TraceDataset, batch_to, collate
    from distillery.students.evaluation.metrics import evaluate_student
    from distillery.students.model.student import MultimodalStudent
    from distillery.students.model.schema import build_schema, load_tokenizer

    if out_dir is None:
        raise ValueError("train: out_dir is required (the folder the student is written to)")
    t0, out_dir, cfg = time.perf_counter(), Path(out_dir), spec.training
    ctx = setup_distributed(cfg)
    data = read_traces(spec, traces, version, ctx)
    split = make_split(data.records, cfg.val_fraction, replay, only_ids)
    schema = build_schema(spec, data.records)
    tokenizer = load_tokenizer(schema)
    datasets = [TraceDataset(recs, schema, spec.student, tokenizer, train=is_train) if recs else None
                for recs, is_train in ((split.train, True), (split.val, False))]
    seed_everything(cfg.seed)
    model = MultimodalStudent(spec.student, schema)
    model.tokenizer = tokenizer
    if init_from is not None:
        warm_start(model, init_from)
    agreement = (lambda m: evaluate_student(m, split.val, schema)) if split.val else None
    trainer = Trainer(model, *datasets, cfg, out_dir, ctx=ctx, collate_fn=collate, batch_to=batch_to,
                      callback=callback, progress=progress, agreement=agreement,
                      run_key=run_key(spec, data, split, ctx, init_from))
    state = trainer.run(resume=resume)
    metrics = final_metrics(state.history) | {"num_train": len(split.train), "num_val": len(split.val)}
    if cfg.on_policy.enabled:
        phase = on_policy_phase(spec, data, split, trainer, datasets[0], resume=resume, callback=callback)
        metrics |= {"agreement_offline": metrics["agreement"]} | phase if "agreement" in phase else phase
    lineage = make_lineage(spec, data, split, ctx, init_from, state.step)
    if "on_policy" in metrics:  # the rounds' scores live in the trace store beside the records
        kept = ("node", "rounds", "teacher_calls", "fallback")
        lineage["on_policy"] = {k: metrics["on_policy"].get(k) for k in kept} | {
            "scores_uri": f"{data.uri.rstrip('/')}/_scores.lance"}
    if ctx.is_main:
        model.save_pretrained(out_dir)
        write_json(out_dir / "metrics.json", metrics)
        write_json(out_dir / "lineage.json", lineage)
        write_spec(out_dir, spec)
        if cfg.onnx_export:
            export_student_onnx(out_dir, [{"image": r.image_bytes, "question": r.question} for r in split.train[:64]])
    if ctx.distributed:
        dist.barrier()
    return TrainResult(out_dir, data.uri, data.version, metrics, state.history, len(split.train), len(split.val),
                       split.num_replay, time.perf_counter() - t0, lineage, model)


def on_policy_phase(spec: Spec, data: Traces, split: Split, trainer: Trainer, train_ds, *, resume: bool,
                    callback: Callback | None) -> dict[str, Any]:
    """The on-policy rounds after the offline epochs (``students.training.onpolicy``), scored by the
    spec's teacher LLM node through the graph, with the trace store's score table as the cache.
    Returns ``{"on_policy": summary, "agreement": after the rounds, "agreement_offline": before}``."""
    from dataclasses import asdict

    from distillery.students.data import TraceDataset, collate
    from distillery.students.training.onpolicy import Scorer, run_onpolicy, scoring_node
    from distillery.teachers.graph import TeacherGraph
    from distillery.teachers.store import TraceStore

    op = spec.training.on_policy
    graph = TeacherGraph(spec.teachers)
    node = scoring_node(graph.teachers, op)
    if train_ds.schema.nodes[node].get("cross_tokenizer"):
        reason = (f"node {node!r}: the student has its own tokenizer (student.tokenizer), so the teacher cannot "
                  "score its tokens")
        warnings.warn(f"on-policy distillation skipped, the student is the offline one: {reason}", stacklevel=2)
        return {"on_policy": {"node": node, "fallback": reason}}
    scorer = Scorer(graph, TraceStore(data.uri).scores, node, data.fingerprint)
    make = lambda recs: TraceDataset(recs, train_ds.schema, train_ds.cfg, train_ds.tok, train=False)  # noqa: E731
    key = hashlib.sha256(f"{trainer.run_key}|{op.model_dump_json()}".encode()).hexdigest()[:16]
    try:
        summary = run_onpolicy(trainer, split.train, scorer, op, seed=spec.training.seed, offline=train_ds,
                               make_dataset=make, collate=collate, run_key=key, resume=resume, callback=callback)
    except NotImplementedError as e:  # a teacher that cannot score given tokens (a black-box server)
        message = f"on-policy distillation skipped, the student is the offline one: {e}"
        warnings.warn(message, stacklevel=2)
        return {"on_policy": {"node": node, "fallback": str(e)}}
    out: dict[str, Any] = {"on_policy": asdict(summary)}
    if trainer.agreement is not None and trainer.ctx.is_main:
        measured = trainer.measure_agreement()
        out["agreement"] = {n: {m: v for m, v in ms.items() if m != "n"} for n, ms in measured.items()}
    return out


def export_student_onnx(out_dir: Path, calibration: list[dict]) -> None:
    """The ONNX Runtime graphs beside the saved student (and the int8 graphs, calibrated on
    ``calibration``); a failure leaves the student usable on torch and says why (the export is a
    deployment convenience, not the model)."""
    from distillery.students.serving import onnx

    try:
        onnx.export_onnx(out_dir, calibration)
    except Exception as e:  # noqa: BLE001 -- any exporter error: keep the trained student
        warnings.warn(f"{out_dir}: ONNX export failed, the student runs on torch only ({type(e).__name__}: {e})",
                      stacklevel=2)


def make_lineage(spec: Spec, data: Traces, split: Split, ctx: Dist, init_from: str | Path | None,
                 steps: int) -> dict[str, Any]:
    """Where the student came from (``lineage.json``; the registry copies it into its tags)."""
    return {"traces_uri": data.uri, "traces_version": data.version, "graph_fingerprint": data.fingerprint,
            "spec_name": spec.name, "spec_hash": spec.spec_hash(), "num_records": len(data.records),
            "num_train": len(split.train), "num_val": len(split.val), "num_replay": split.num_replay,
            "split": "sha256(image bytes)", "init_from": str(init_from) if init_from else None,
            "seed": spec.training.seed, "world_size": ctx.world_size, "steps": steps,
            "created_at": datetime.now(timezone.utc).isoformat()}
