"""`distillery train` (offline epochs, then the on-policy rounds with --on-policy), and the small
helpers every `distillery` command shares (one plain error line, the spec loader, the console).
``distillery/cli.py`` registers the command on the app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

from distillery import runtime

console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    """Bad input: one plain line on stderr (no traceback, no wrapping) and exit ``code``."""
    typer.echo(f"Error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def _load_spec(path: Path):
    from pydantic import ValidationError

    from distillery.flows.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except (SpecError, ValidationError) as e:
        console.print(f"[red]invalid spec {path}:[/red]\n{e}")
        raise typer.Exit(2) from None


def train(
    spec: Path = typer.Argument(..., help="Spec YAML."),
    traces: Optional[str] = typer.Option(None, "--traces", help="Trace store URI[@VERSION] (default: next to the spec)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Student folder (default: next to the spec)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Warm-start from a saved student."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, help="Processes on this "
                                                 "machine, one per GPU (default: the spec's training.nproc_per_node); "
                                                 "above 1 the trainer runs under torchrun."),
    nnodes: Optional[str] = typer.Option(None, "--nnodes", help="Machines in the run (N or MIN:MAX); each runs "
                                         "this same command."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="host:port of the rendezvous on "
                                                "the first machine (several machines)."),
    on_policy: Optional[bool] = typer.Option(None, "--on-policy/--no-on-policy", help="After the offline epochs, "
                                             "on-policy rounds: the student answers training inputs, the teacher "
                                             "LLM node scores its tokens, the student learns from that "
                                             "(training.on_policy; default: as the spec says)."),
) -> None:
    """Train the student on a trace-store version (progress bar, per-epoch metrics); on several
    processes or machines through torchrun (--nproc-per-node, --nnodes, --rdzv-endpoint); with
    --on-policy, then the on-policy rounds (their teacher calls counted, timed and stored)."""
    runtime.configure()
    from distillery.flows.train import with_on_policy

    s = with_on_policy(_load_spec(spec), on_policy)
    launch = {k: v for k, v in {"nproc_per_node": nproc_per_node, "nnodes": nnodes,
                                "rdzv_endpoint": rdzv_endpoint}.items() if v is not None}
    if launch:
        try:
            s = s.model_copy(update={"training": type(s.training).model_validate(s.training.model_dump() | launch)})
        except ValueError as e:
            _fail(f"distillery train: {e}")
    if s.training.on_policy.enabled and s.training.launched:
        _fail("distillery train --on-policy: the on-policy rounds run in one process (not under torchrun yet); "
              "drop --nproc-per-node/--nnodes or --on-policy")
    from distillery.students.training.train import train as run_train

    from distillery.teachers.store import TraceStore, parse_traces_ref

    uri = traces or str(spec.resolve().parent / "traces.lance")
    try:
        store_uri, version = parse_traces_ref(uri)
        if TraceStore(store_uri).version is None:
            raise ValueError(f"trace store {store_uri} holds no commit yet (missing or empty): record traces "
                             f"first (distillery record {spec} --inputs PATH --traces {store_uri})")
    except ValueError as e:
        _fail(f"--traces {uri}: {e}")
    out_dir = out or spec.resolve().parent / "student"
    if s.training.launched:
        _train_launched(s, uri, out_dir, resume, init_from)
        return
    try:
        result = run_train(s, uri, None, out_dir, resume=resume, init_from=init_from, progress=True)
    except ValueError as e:  # a version the store lacks, no usable record for this graph, ...
        _fail(f"distillery train --traces {uri}: {e}")
    console.print(f"student written to {result.out_dir} from {result.traces_uri}@{result.traces_version} "
                  f"({result.num_train} train / {result.num_val} val records, {result.seconds:.0f} s)",
                  soft_wrap=True)
    if "on_policy" in result.metrics:
        print_on_policy(result.metrics["on_policy"])
    print(json.dumps({"out_dir": str(result.out_dir), "traces_version": result.traces_version,
                      "metrics": result.metrics}, default=str))


def _train_launched(s, uri: str, out_dir: Path, resume: bool, init_from: Optional[Path]) -> None:
    """``distillery train`` as a torchrun process group (``flows.launch``); its summary printed."""
    from distillery.flows.launch import launch
    from distillery.flows.train import read_result

    cfg = s.training
    console.print(f"training under torchrun: {cfg.nproc_per_node} process(es) per node, {cfg.nnodes} node(s)")
    try:
        launch(s, {"traces": uri, "out_dir": str(out_dir.resolve()), "resume": resume,
                   "init_from": str(init_from.resolve()) if init_from else None})
    except RuntimeError as e:
        _fail(str(e), code=1)
    try:
        result = read_result(out_dir)
    except FileNotFoundError:  # another machine's processes held rank 0, and this one's folder is not shared
        console.print(f"this machine's processes are done; rank 0 wrote the student on its machine ({out_dir})")
        return
    console.print(f"student written to {result['out_dir']} from {result['traces_uri']}@{result['traces_version']}"
                  f" ({result['seconds']:.0f} s)", soft_wrap=True)
    print(json.dumps({"out_dir": result["out_dir"], "traces_version": result["traces_version"],
                      "metrics": result["metrics"]}, default=str))


def print_on_policy(summary: dict) -> None:
    """One line for the on-policy phase: rounds, answers scored, teacher calls and their time."""
    if "fallback" in summary:
        console.print(f"[yellow]on-policy: not run[/yellow] ({summary['fallback']}); the student is the offline one",
                      soft_wrap=True)
        return
    if not summary["answered"]:
        console.print(f"[yellow]on-policy: no training record has a usable {summary['node']!r} answer[/yellow] "
                      "(every one truncated, empty or failed): nothing was scored", soft_wrap=True)
    console.print(f"on-policy: {summary['rounds']} round(s), {summary['scored']}/{summary['answered']} student "
                  f"answers scored by teacher node {summary['node']!r}: {summary['teacher_calls']} teacher calls "
                  f"({summary['teacher_seconds']:.1f} s), {summary['cached']} read back from the trace store, "
                  f"{summary['on_policy_steps']}/{summary['steps']} steps on-policy", soft_wrap=True)
