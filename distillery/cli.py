"""The `distillery` command: thin wrappers over the flows and the rooms' plain functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from distillery import runtime

app = typer.Typer(help="Distill a whole AI pipeline into one small multimodal student.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


def _load_spec(path: Path):
    from pydantic import ValidationError

    from distillery.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except (SpecError, ValidationError) as e:
        console.print(f"[red]invalid spec {path}:[/red]\n{e}")
        raise typer.Exit(2) from None


@app.command()
def record(
    spec: Path = typer.Argument(..., help="Spec YAML (teacher graph)."),
    inputs: Path = typer.Option(..., "--inputs", help="Folder of images, optionally with requests.jsonl."),
    traces: Optional[str] = typer.Option(None, "--traces", help="Trace store URI (default: next to the spec)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Run the teacher graph over inputs (the Prefect `record` flow) and store the traces."""
    runtime.configure()
    s = _load_spec(spec)
    uri = traces or str(spec.resolve().parent / "traces.lance")
    summary = run_record_flow(s, inputs, uri, show_progress=not as_json)
    if as_json:
        keys = ("written", "skipped", "quarantined", "by_reason", "traces", "version")
        print(json.dumps({k: summary[k] for k in keys}))
    else:
        print_record_summary(summary)


def run_record_flow(spec, inputs: Path, traces: str, show_progress: bool = True) -> dict:
    """Run the record flow in this process (Prefect's ephemeral server), with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.record import add_progress_listener, record_flow

    with Progress(TextColumn("recording"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not show_progress) as bar:
        task_id = bar.add_task("record", total=None)
        add_progress_listener(lambda done, total: bar.update(task_id, completed=done, total=total))
        return record_flow(spec=spec, inputs=str(inputs), traces=traces)


def print_record_summary(summary: dict) -> None:
    table = Table(title=f"record: {summary['traces']} @ version {summary['version']}")
    table.add_column("outcome")
    table.add_column("inputs", justify="right")
    table.add_row("written", str(summary["written"]))
    table.add_row("already recorded (skipped)", str(summary["skipped"]))
    table.add_row("quarantined", str(summary["quarantined"]))
    for reason, n in sorted(summary["by_reason"].items()):
        table.add_row(f"  {reason}", str(n))
    Console().print(table)
    for q in summary.get("quarantined_inputs", [])[:20]:
        console.print(f"  [yellow]quarantined[/yellow] {q['image']}: {q['detail']}")


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where everything goes (default: user data dir)."),
    preset: str = typer.Option("full", "--preset", help="full (meets the quality floors) or tiny (CI, quick look)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the workdir first and rebuild everything."),
    train_teachers: bool = typer.Option(False, "--train-teachers", help="Retrain the demo teachers instead of using the shipped weights."),
) -> None:
    """Run the whole platform on a synthetic world: world, teachers, record, train, register, predict."""
    import os

    from demo.pipeline import default_workdir

    wd = (workdir or default_workdir()).resolve()
    if preset not in ("full", "tiny"):
        console.print(f"[red]--preset {preset!r}: choose full or tiny[/red]")
        raise typer.Exit(2)
    # Prefect and MLflow keep their state in the workdir so the UIs show this demo's runs.
    os.environ.setdefault("PREFECT_HOME", str(wd / "prefect"))
    runtime.configure()
    from demo.pipeline import run_demo

    run_demo(wd, preset=preset, fresh=fresh, train_teachers=train_teachers)


@app.command()
def train(
    spec: Path = typer.Argument(..., help="Spec YAML."),
    traces: Optional[str] = typer.Option(None, "--traces", help="Trace store URI[@VERSION] (default: next to the spec)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Student folder (default: next to the spec)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Warm-start from a saved student."),
) -> None:
    """Train the student on a trace-store version (progress bar, per-epoch metrics)."""
    runtime.configure()
    s = _load_spec(spec)
    from students.train import train as run_train

    uri = traces or str(spec.resolve().parent / "traces.lance")
    out_dir = out or spec.resolve().parent / "student"
    result = run_train(s, uri, None, out_dir, resume=resume, init_from=init_from, progress=True)
    console.print(f"student written to {result.out_dir} from {result.traces_uri}@{result.traces_version} "
                  f"({result.num_train} train / {result.num_val} val records, {result.seconds:.0f} s)")
    print(json.dumps({"out_dir": str(result.out_dir), "traces_version": result.traces_version,
                      "metrics": result.metrics}, default=str))


@app.command()
def distill(
    spec: Path = typer.Argument(..., help="Spec YAML."),
    inputs: Path = typer.Option(..., "--inputs", help="Inputs to record and train on."),
    traces: Optional[str] = typer.Option(None, "--traces", help="Trace store URI (default: next to the spec)."),
    eval_inputs: Optional[Path] = typer.Option(None, "--eval-inputs", help="Held-out inputs for evaluation."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Students and local MLflow store."),
    no_warm_start: bool = typer.Option(False, "--no-warm-start", help="Train from scratch even if a champion exists."),
) -> None:
    """Record -> train -> evaluate -> register -> promote (the Prefect `distill` flow, locally)."""
    runtime.configure()
    s = _load_spec(spec)
    from flows.distill import distill_flow

    base = spec.resolve().parent
    result = distill_flow(spec=s, inputs=str(inputs), traces=traces or str(base / "traces.lance"),
                          eval_inputs=str(eval_inputs) if eval_inputs else None,
                          workdir=str(workdir or base / "runs"), warm_start=not no_warm_start)
    print(json.dumps(result, default=str))


@app.command()
def pull(
    model: str = typer.Argument(..., help="NAME, NAME@ALIAS, NAME/VERSION or models:/ URI."),
    to: Path = typer.Option(..., "--to", help="Folder to write the self-contained student into."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI)."),
) -> None:
    """Download a registered student into a folder that answers with no MLflow server."""
    runtime.configure()
    from registry.models import pull as do_pull

    console.print(f"pulled into {do_pull(model, to, tracking_uri=tracking_uri)}")


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A pulled folder or a student folder."),
    image: Path = typer.Option(..., "--image", help="Image file."),
    question: str = typer.Option(..., "--question", help="Question text."),
) -> None:
    """Answer one image + question with a student folder (JSON out)."""
    runtime.configure()
    from registry.models import predict_dir

    print(json.dumps(predict_dir(model_dir, image, question), default=str))


@app.command()
def serve(
    spec: Path = typer.Argument(..., help="Spec YAML."),
    inputs: Path = typer.Option(..., "--inputs", help="Inputs folder the deployments record from."),
    traces: Optional[str] = typer.Option(None, "--traces", help="Trace store URI (default: next to the spec)."),
    eval_inputs: Optional[Path] = typer.Option(None, "--eval-inputs", help="Held-out inputs."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Students and local MLflow store."),
    cron: str = typer.Option("0 3 * * *", "--cron", help="Schedule of the recurring distillation."),
) -> None:
    """Serve the deployments (distill/manual, distill/recurring on a cron, train/local) from this process.

    Point PREFECT_API_URL at a Prefect server (`prefect server start`) to trigger them from its UI."""
    runtime.configure()
    s = _load_spec(spec)
    from prefect import serve as prefect_serve

    from flows.deployments import build_deployments

    base = spec.resolve().parent
    deps = build_deployments(s, str(inputs.resolve()), traces or str(base / "traces.lance"),
                             str((workdir or base / "runs").resolve()), cron,
                             str(eval_inputs.resolve()) if eval_inputs else None)
    prefect_serve(*deps)


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
