"""The training loop: any module with ``forward(batch)`` and ``loss(batch, outputs)``.

Reads top to bottom: ``Trainer`` (AdamW + linear warmup / cosine decay, grad clipping,
AMP on CUDA, DDP, checkpoints, exact resume) -> the per-epoch summary line.

Devices, processes (torchrun: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, nccl on CUDA, gloo on CPU,
only rank 0 writes or prints) and the loaders whose order is a function of (seed, epoch,
position) are in ``students/distributed.py``.

Exact resume: a checkpoint (``students/checkpoint.py``) holds the weights, the optimizer,
scheduler, scaler and RNG states and the data position (epoch + batches done). Each epoch's order
comes from ``seed + epoch`` alone and the loaders never draw on the global RNG, so a resumed run
skips the consumed batches and ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, default_collate

from distillery.runtime import resolve_device
from distillery.students.training.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from distillery.students.data import batch_to as to_device
from distillery.students.training.distributed import (Dist, make_loaders, seed_everything,  # noqa: F401  (re-exported)
                                                      setup_distributed)
from distillery.students.training.config import TrainConfig

Callback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # in the current epoch (on this rank)
    loss_sums: dict[str, float] = field(default_factory=dict)  # current epoch, this rank
    loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def deterministic(on: bool):
    """Deterministic kernels (warn-only) for the block, then the process's previous setting:
    multi-threaded CPU reductions otherwise differ in the last bits from run to run."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16 (with a GradScaler); None on CPU or with amp off."""
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (weights), not vectors (biases, norms) - as nanoGPT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Trainer:
    """One training run of any module with ``forward(batch)`` and ``loss(batch, outputs)``
    (returning ``(total, {node: detached loss})``): the real student, or a stand-in in tests.

    ``agreement(model) -> {node: {metric: value}}`` (optional) runs on rank 0 at epoch ends."""

    def __init__(self, model: torch.nn.Module, train_ds: Dataset, val_ds: Dataset | None, cfg: TrainConfig,
                 out_dir: str | Path, *, ctx: Dist | None = None, collate_fn: Callable | None = None,
                 batch_to: Callable = to_device, callback: Callback | None = None, progress: bool = True,
                 agreement: Callable[[torch.nn.Module], dict] | None = None, run_key: str = ""):
        from transformers import get_cosine_schedule_with_warmup

        self.cfg, self.ctx = cfg, ctx or Dist(device=resolve_device(cfg.device))
        self.out_dir, self.run_key = Path(out_dir), run_key
        self.batch_to, self.callback, self.progress, self.agreement = batch_to, callback, progress, agreement
        self.model = model.to(self.ctx.device)
        self.ddp = self.model
        if self.ctx.distributed:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # echo steps leave the vision encoder without gradients: DDP must allow unused parameters
            self.ddp = DistributedDataParallel(self.model, device_ids=ids,
                                               find_unused_parameters=cfg.text_echo > 0)
        self.train_loader, self.val_loader = make_loaders(train_ds, val_ds, cfg, self.ctx, collate_fn)
        self.collate_fn = collate_fn or default_collate
        self.steps_per_epoch = math.ceil(self.train_loader.sampler.num_samples / cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError("no training records: the training split is empty")
        self.total_steps = min(cfg.epochs * self.steps_per_epoch, cfg.max_steps or math.inf)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           fused=self.ctx.device.type in ("cuda", "cpu") or None)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, min(cfg.warmup_steps, self.total_steps),
                                                         self.total_steps)
        self.amp_dtype = amp_dtype(cfg, self.ctx.device)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = LoopState()

    # -- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> LoopState:
        """Train to ``total_steps`` (from the latest checkpoint when ``resume``)."""
        if resume and (ckpt := latest_checkpoint(self.out_dir)) is not None:
            self.restore(ckpt)
        self.emit({"event": "start", "step": self.state.step, "total_steps": self.total_steps,
                   "epochs": self.epochs, "resumed": self.state.step > 0})
        with self.progress_bar() as bar, deterministic(self.cfg.deterministic):
            self.bar = bar
            for epoch in range(self.state.epoch, self.epochs):
                self.train_epoch(epoch)
                self.end_epoch(epoch)
                if self.state.step >= self.total_steps:
                    break
        self.emit({"event": "end", "step": self.state.step, "history": self.state.history})
        return self.state

    def train_epoch(self, epoch: int) -> None:
        """The epoch's batches from ``state.batches_done`` on (its order is fixed by seed+epoch)."""
        self.ddp.train()
        self.train_loader.sampler.set_position(epoch, self.state.batches_done)
        self.train_loader.generator.manual_seed(self.cfg.seed + epoch)
        if hasattr(self.train_loader.dataset, "set_epoch"):  # per-epoch augmentation draws
            self.train_loader.dataset.set_epoch(epoch)
        self.state.epoch = epoch
        for _, batch in self.train_loader:
            if self.state.step >= self.total_steps:
                break
            losses = self.train_step(batch)
            st = self.state
            st.step, st.batches_done, st.loss_count = st.step + 1, st.batches_done + 1, st.loss_count + 1
            for k, v in losses.items():
                st.loss_sums[k] = st.loss_sums.get(k, 0.0) + v
            if st.step % self.cfg.checkpoint_every == 0 or st.step == self.total_steps:
                self.checkpoint()
            self.bar.update(self.bar_task, completed=st.step, loss=losses["total"])
            self.emit({"event": "step", "step": st.step, "total_steps": self.total_steps, "epoch": epoch + 1,
                       "loss": losses, "lr": self.scheduler.get_last_lr()[0]})

    def train_step(self, batch: Any) -> dict[str, float]:
        """Forward (through DDP), loss, backward, clip, step; then ``text_echo`` text-only steps,
        each on a fresh random batch (``echo_batch``). Returns the full step's losses as floats."""
        batch = self.batch_to(batch, self.ctx.device)
        total, per_node = self.optimize(batch)
        for j in range(self.cfg.text_echo if getattr(self.model, "echoes", False) else 0):
            self.optimize(self.batch_to(self.echo_batch(j), self.ctx.device), echo=True)
        self.scheduler.step()
        return {"total": float(total.detach())} | {k: float(v) for k, v in per_node.items()}

    def echo_batch(self, j: int) -> Any:
        """The j-th text-only batch of this step: records drawn at random from this process's
        share of the training split, by a generator seeded with (seed, step, j, rank), so that a
        resumed run draws exactly what the uninterrupted one did."""
        dataset = self.train_loader.dataset
        share = range(self.ctx.rank, len(dataset), self.ctx.world_size)
        g = torch.Generator().manual_seed(hash((self.cfg.seed, self.state.step, j, self.ctx.rank)) % 2**63)
        picks = torch.randint(len(share), (self.cfg.batch_size,), generator=g).tolist()
        return self.collate_fn([dataset[share[i]] for i in picks])

    def optimize(self, batch: Any, echo: bool = False) -> tuple[torch.Tensor, dict]:
        """One optimizer step (a full pass, or a text-only one with ``echo``); the schedule is not
        advanced. Returns the loss and the per-node losses."""
        autocast = (torch.autocast(self.ctx.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else nullcontext())
        with autocast:
            outputs = self.ddp(batch, echo=True) if echo else self.ddp(batch)
            total, per_node = self.model.loss(batch, outputs)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, per_node

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Validation loss (all ranks), agreement (rank 0), one history row, a printed summary.

        A row is flat (MLflow metrics, a Prefect table, a pandas frame take it as is):
        ``epoch``, ``step``, ``train_loss/<node>``, ``val_loss/<node>`` (``<node>`` includes
        ``total``), ``agreement/<node>/<metric>``."""
        st = self.state
        self.sync_buffers()
        row: dict[str, Any] = {"epoch": epoch + 1, "step": st.step}
        row |= {f"train_loss/{k}": v / max(st.loss_count, 1) for k, v in st.loss_sums.items()}
        row |= {f"val_loss/{k}": v for k, v in self.validate().items()}
        last = st.step >= self.total_steps or epoch + 1 == self.epochs
        every = self.cfg.agreement_every
        if self.agreement is not None and self.ctx.is_main and (last or (every and (epoch + 1) % every == 0)):
            row |= {f"agreement/{node}/{m}": v for node, ms in self.measure_agreement().items()
                    for m, v in ms.items() if m != "n"}
        st.history.append(row)
        st.epoch, st.batches_done, st.loss_sums, st.loss_count = epoch + 1, 0, {}, 0
        self.print_epoch(row)
        self.emit({"event": "epoch", **row, "epochs": self.epochs})
        return row

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics, loss balancer) everywhere. DDP broadcasts them
        before each forward, so after the last one every rank's differ: validation and the saved
        student must all see the same ones."""
        if self.ctx.distributed:
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean validation loss per node over the whole split (shards summed across ranks)."""
        if self.val_loader is None:
            return {}
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        with self.rng_untouched():
            for n, batch in self.val_loader:
                batch = self.batch_to(batch, self.ctx.device)
                total, per_node = self.model.loss(batch, self.model(batch))
                for k, v in {"total": total, **per_node}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * n
                sums["_n"] = sums.get("_n", 0.0) + torch.tensor(float(n), device=self.ctx.device)
        self.model.train()
        keys = sorted(sums)
        vec = torch.stack([torch.as_tensor(sums[k], device=self.ctx.device) for k in keys])  # (K,)
        if self.ctx.distributed:
            dist.all_reduce(vec)
        vals = dict(zip(keys, vec.tolist()))
        n = vals.pop("_n")
        return {k: v / n for k, v in vals.items()}

    def rng_untouched(self):
        """Evaluation must not move the RNG that training (and a resume) relies on."""
        return torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else [])

    def measure_agreement(self) -> dict[str, dict[str, float]]:
        self.model.eval()
        with torch.no_grad(), self.rng_untouched():
            out = self.agreement(self.model)
        self.model.train()
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self) -> None:
        if self.ctx.is_main:
            path = save_checkpoint(self.out_dir / "checkpoints", self.model, self.payload(), self.cfg.keep_checkpoints)
            self.emit({"event": "checkpoint", "step": self.state.step, "path": str(path)})

    def payload(self) -> dict[str, Any]:
        """Everything but the weights, as tensors/numbers/strings (``weights_only`` loadable)."""
        return {"loop": asdict(self.state), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(), "run_key": self.run_key, "world_size": self.ctx.world_size,
                "total_steps": self.total_steps}

    def restore(self, path: Path) -> None:
        payload = load_checkpoint(path, self.model, self.ctx.device)
        theirs = (payload["run_key"], payload["total_steps"], payload["world_size"])
        ours = (self.run_key, self.total_steps, self.ctx.world_size)
        if theirs != ours:
            raise ValueError(f"{path}: checkpoint of a different run (run key, steps, processes: {theirs} vs "
                             f"{ours}: data, spec or launch changed); use a new out_dir or drop --resume")
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = LoopState(**payload["loop"])
        set_rng_state(payload["rng"])

    # -- output --------------------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:
        if self.callback is not None and self.ctx.is_main:
            self.callback(event)

    def progress_bar(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                       disable=not (self.progress and self.ctx.is_main))
        self.bar_task = bar.add_task("train", total=self.total_steps, completed=self.state.step, loss=float("nan"))
        return bar

    def print_epoch(self, row: dict[str, Any]) -> None:
        if self.progress and self.ctx.is_main:
            self.bar.console.print(epoch_table(row, self.epochs, self.total_steps))


def unflatten(row: dict[str, Any]) -> dict[str, Any]:
    """A history row as ``{"train_loss": {node: v}, "val_loss": {node: v}, "agreement":
    {node: {metric: v}}}`` (plus epoch and step)."""
    out: dict[str, Any] = {"train_loss": {}, "val_loss": {}, "agreement": {}}
    for key, v in row.items():
        kind, _, rest = key.partition("/")
        if kind in ("train_loss", "val_loss"):
            out[kind][rest] = v
        elif kind == "agreement":
            node, _, metric = rest.partition("/")
            out["agreement"].setdefault(node, {})[metric] = v
        else:
            out[key] = v
    return out


def epoch_table(row: dict[str, Any], epochs: int, total_steps: int):
    """A rich table for one epoch: per node, train loss, validation loss, agreement."""
    from rich.table import Table

    r = unflatten(row)
    table = Table(title=f"epoch {row['epoch']}/{epochs} - step {row['step']}/{total_steps}", title_justify="left")
    for col in ("node", "train loss", "val loss", "agreement with the teacher"):
        table.add_column(col, justify="left" if col in ("node", "agreement with the teacher") else "right")
    for node in [n for n in r["train_loss"] if n != "total"] + ["total"]:
        agree = "  ".join(f"{m} {v:.3f}" for m, v in r["agreement"].get(node, {}).items())
        cells = [r[key].get(node) for key in ("train_loss", "val_loss")]
        table.add_row(node, *("-" if v is None else f"{v:.4f}" for v in cells), agree)
    return table
