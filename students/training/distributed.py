"""Devices, processes and data loaders for the training loop (``students/trainer.py``).

Launched by torchrun, every process runs the same loop: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
pick the shard and the device (nccl on CUDA, gloo on CPU); only rank 0 writes or prints. The
loaders' order is a function of (seed, epoch, position) alone, which is what makes a resume exact.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from distillery.runtime import resolve_device
from distillery.students.training.config import TrainConfig


# ---------------------------------------------------------------------------------------------
# Devices and processes
# ---------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place in the run (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local)
    if device.type == "cuda" and cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------------------------------
# Loaders with a resumable order
# ---------------------------------------------------------------------------------------------

class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffle from ``seed + epoch``, one shard per rank) that can start
    part-way into an epoch: ``set_position(epoch, batches_done)``."""

    def __init__(self, dataset: Dataset, ctx: Dist, seed: int, batch_size: int, shuffle: bool):
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed)
        self.batch_size, self.skip = batch_size, 0

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = batches_done * self.batch_size

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


class Counted:
    """A collate function that also says how many records the batch holds: ``(n, batch)``."""

    def __init__(self, collate_fn: Callable | None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: list) -> tuple[int, Any]:
        return len(items), self.collate_fn(items)


def make_loaders(train_ds: Dataset, val_ds: Dataset | None, cfg: TrainConfig, ctx: Dist,
                 collate_fn: Callable | None) -> tuple[DataLoader, DataLoader | None]:
    """Loaders whose order depends only on (seed, epoch, position). Their own generator keeps
    them from drawing on the global RNG, which dropout (and a resume) must find untouched.
    Each yields ``(n, batch)``: the records in the batch, and the collated batch."""
    def loader(ds: Dataset, shuffle: bool) -> DataLoader:
        sampler = ResumableSampler(ds, ctx, cfg.seed, cfg.batch_size, shuffle)
        # Workers are spawned, not forked: Lance (the trace store) and Prefect's threads are not
        # fork-safe, and a forked worker dies at shutdown in a process that has used them.
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=Counted(collate_fn),
                          num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed),
                          pin_memory=ctx.device.type == "cuda", persistent_workers=False,
                          multiprocessing_context="spawn" if cfg.num_workers > 0 else None)

    return loader(train_ds, True), (loader(val_ds, False) if val_ds is not None and len(val_ds) else None)
