"""Training on several processes or machines through torchrun (``torch.distributed.run``).

PyTorch's own launcher starts the process group, not a hand-rolled spawn: one process per GPU
(``--nproc-per-node``), elastic restarts (``--max-restarts``, each resuming from the latest
checkpoint), and several machines joining a c10d rendezvous (``--nnodes``, ``--rdzv-endpoint``;
every machine runs the same command). Each process runs ``python -m distillery.flows.train
PARAMS.json``, i.e. ``flows.train.run_training``: the trainer reads ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``, joins with nccl on GPUs and gloo on CPU, and only rank 0 logs to MLflow and writes
the student and ``train_result.json``.

```python
launch(spec, {"traces": "traces.lance", "out_dir": "student", ...})  # returns when the group is done
```
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from distillery.flows.spec import Spec
from distillery.prefect_server import die_with

WORKER_MODULE = "distillery.flows.train"  # what every torchrun process runs (``python -m``)


def rendezvous_id(spec: Spec, out_dir: str) -> str:
    """The same id on every machine of one run (the spec and the output folder name it)."""
    return hashlib.sha256(f"{spec.spec_hash()}:{Path(out_dir).name}".encode()).hexdigest()[:16]


def torchrun_command(spec: Spec, params_file: str | Path, out_dir: str) -> list[str]:
    """The torchrun command line for ``spec.training``'s processes, nodes and restarts."""
    cfg = spec.training
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc_per_node}",
           f"--nnodes={cfg.nnodes}", f"--max-restarts={cfg.max_restarts}"]
    if cfg.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
                f"--rdzv-id={rendezvous_id(spec, out_dir)}"]
    else:
        cmd.append("--standalone")  # one machine: a local rendezvous on a free port
    return cmd + ["-m", WORKER_MODULE, str(params_file)]


def launch(spec: Spec, params: dict[str, Any]) -> None:
    """Run the train step as a torchrun process group and wait for it; the group's processes
    die with this one. ``params``: ``flows.train.run_training``'s keyword arguments (JSON-able).
    Raises ``RuntimeError`` with the exit status when the group fails (after its restarts)."""
    with tempfile.TemporaryDirectory(prefix="distillery-torchrun-") as tmp:
        params_file = Path(tmp) / "params.json"
        params_file.write_text(json.dumps({"spec": spec.model_dump(mode="json"), "params": params}))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if spec.training.device == "cpu" or not _has_cuda():
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.training.nproc_per_node)))
        proc = subprocess.Popen(torchrun_command(spec, params_file, params["out_dir"]), env=env,
                                preexec_fn=die_with(os.getpid()))
        try:
            code = proc.wait()
        except BaseException:  # interrupted: stop the group (torchrun passes SIGTERM on to its workers)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        raise RuntimeError(f"torchrun training ({spec.training.nproc_per_node} process(es) per node, "
                           f"{spec.training.nnodes} node(s)) exited with status {code}; resume with the same "
                           "command (the latest checkpoint in the output folder is kept)")


def worker_params(path: str | Path) -> tuple[Spec, dict[str, Any]]:
    """(spec, run_training kwargs) from the file ``launch`` wrote; a torchrun restart resumes."""
    data = json.loads(Path(path).read_text())
    params = dict(data["params"])
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        params["resume"] = True  # the group was restarted after a failure: continue, don't start over
    return Spec.model_validate(data["spec"]), params


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
