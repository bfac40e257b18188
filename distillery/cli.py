"""The `distillery` command: thin wrappers over the flows and the rooms' plain functions."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console
from rich.table import Table

from distillery import runtime
from distillery.cli_train import _fail, _load_spec, console, train

app = typer.Typer(help="Distill a whole AI pipeline into one small multimodal student.",
                  no_args_is_help=True, add_completion=False)
app.command()(train)  # distillery/cli_train.py


@app.command()
def record(
    spec: Path = typer.Argument(..., help="Spec YAML (teacher graph)."),
    inputs: Path = typer.Option(..., "--inputs", help="Folder of images, optionally with requests.jsonl."),
    traces: Optional[str] = typer.Option(None, "--traces", help="Trace store URI (default: next to the spec)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    runner: Optional[Literal["local", "dask"]] = typer.Option(
        None, "--runner", help="Where the node tasks run: local (this process) or dask (Dask worker "
                               "processes, each loading the graph once). Default: the spec's record.runner."),
    dask_address: Optional[str] = typer.Option(
        None, "--dask-address", help="Scheduler of an existing Dask cluster (tcp://host:8786; implies "
                                     "--runner dask). Without it, --runner dask starts a LocalCluster."),
    dask_workers: Optional[int] = typer.Option(
        None, "--dask-workers", min=1, help="Worker processes of that LocalCluster (default: the spec's, 2)."),
) -> None:
    """Run the teacher graph over inputs (the Prefect `record` flow) and store the traces."""
    runtime.configure()
    s = _load_spec(spec)
    uri = traces or str(spec.resolve().parent / "traces.lance")
    from pydantic import ValidationError

    from distillery.flows.record import run_record, with_runner

    try:
        s = with_runner(s, runner, dask_address, dask_workers)
    except ValidationError as e:
        _fail("; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors()))
    summary = run_record(s, inputs, uri, show_progress=not as_json)
    if as_json:
        keys = ("written", "skipped", "quarantined", "to_retry", "by_reason", "traces", "version", "seconds",
                "node_seconds", "usage")
        print(json.dumps({k: summary[k] for k in keys}))
    else:
        print_record_summary(summary)


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
    from distillery.teachers.record import cost_rows

    rows = cost_rows(summary)
    if rows:
        cost = Table(title="cost per teacher node")
        for col in rows[0]:
            cost.add_column(col.replace("_", " "), justify="left" if col == "node" else "right")
        for row in rows:
            cost.add_row(*("-" if v is None else str(v) for v in row.values()))
        Console().print(cost)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where everything goes (default: user data dir)."),
    preset: str = typer.Option("full", "--preset", help="full (meets the quality floors) or tiny (CI, quick look)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the workdir first and rebuild everything."),
    train_teachers: bool = typer.Option(False, "--train-teachers", help="Retrain the demo teachers instead of using the shipped weights."),
    teacher: str = typer.Option("llm", "--teacher", help="llm (the reasoner in process) or openai (then also the "
                                "reasoner as a black box behind an OpenAI-compatible server on 127.0.0.1, distilled "
                                "from its top-k log-probs and from its text only)."),
) -> None:
    """Run the whole platform on a synthetic world: world, teachers, record, train, register, predict."""
    import os

    from distillery.demo.pipeline import default_workdir, prepare_workdir

    if preset not in ("full", "tiny"):
        console.print(f"[red]--preset {preset!r}: choose full or tiny[/red]")
        raise typer.Exit(2)
    if teacher not in ("llm", "openai"):
        console.print(f"[red]--teacher {teacher!r}: choose llm or openai[/red]")
        raise typer.Exit(2)
    try:  # (before Prefect starts: --fresh deletes the workdir, Prefect's home with it)
        wd = prepare_workdir(workdir or default_workdir(), fresh)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    # Prefect and MLflow keep their state in the workdir so the UIs show this demo's runs.
    os.environ.setdefault("PREFECT_HOME", str(wd / "prefect"))
    runtime.configure()
    from distillery.demo.pipeline import run_demo

    with runtime.local_prefect():
        run_demo(wd, preset=preset, train_teachers=train_teachers, teacher=teacher)


# NAME, NAME@ALIAS or NAME/VERSION: a registry reference (as `distillery pull` takes them).
_REGISTRY_REF = re.compile(r"^[A-Za-z0-9][\w.-]*(@[\w.-]+|/\d+)?$")
# A logged model's own id (MLflow 3), not a registered name: downloaded, not pulled.
_LOGGED_MODEL = re.compile(r"^models:/m-[0-9a-f]{32}(/.*)?$")
EVAL_SPLITS = ("train", "val", "test")


def resolve_student(model_uri: str, tmp: Path, tracking_uri: str | None = None,
                    workdir: Path | None = None) -> tuple[Path, dict | None]:
    """The student folder ``model_uri`` names, and the registry info of a pulled one (else None).

    A folder (trained or pulled) is used as is; ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    (or NAME, NAME@ALIAS, NAME/VERSION) are pulled with ``registry.pull.pull`` into ``tmp``;
    ``runs:/RUN_ID/student`` and ``models:/m-...`` (a logged model) are downloaded into ``tmp``.
    The MLflow store: ``tracking_uri``, else the demo's (``$MLFLOW_TRACKING_URI``, else
    ``workdir/runs/mlflow.db``). Raises FileNotFoundError / LookupError / ValueError (or MLflow's
    error) for bad input."""
    from distillery.registry.config import RegistryConfig
    from distillery.registry.pull import download_logged, pull
    from distillery.students.serving.folder import student_dir

    path = Path(model_uri).expanduser()
    if path.is_dir():
        return student_dir(path), None
    if path.exists():
        raise FileNotFoundError(f"{model_uri}: a file, not a student folder")
    is_uri = model_uri.startswith(("models:/", "runs:/"))
    if not is_uri and not _REGISTRY_REF.match(model_uri):
        raise FileNotFoundError(f"{model_uri}: no such student folder, and not a model URI (models:/NAME@ALIAS, "
                                "models:/NAME/VERSION, runs:/RUN_ID/student)")
    store = tracking_uri or RegistryConfig().resolve_tracking_uri((workdir or Path.cwd()) / "runs")
    if model_uri.startswith("runs:/") or _LOGGED_MODEL.match(model_uri):
        return download_logged(model_uri, tmp, tracking_uri=store), None
    try:
        folder = pull(model_uri, tmp / "pulled", tracking_uri=store)
    except LookupError as e:
        raise LookupError(f"{e}{'' if is_uri else ' (and no student folder of that name)'}") from None
    return student_dir(folder), json.loads((folder / "registry.json").read_text())


@app.command("eval")
def evaluate(
    model_uri: str = typer.Argument(..., help="A student folder, or an MLflow model URI: models:/NAME@ALIAS, "
                                    "models:/NAME/VERSION, runs:/RUN_ID/student."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Held-out inputs folder with its labels "
                                          "(answer/type/documents on requests.jsonl lines, a COCO "
                                          "annotations.json); without it, a split of the demo world."),
    traces: Optional[str] = typer.Option(None, "--traces", help="With --inputs: the trace store of those "
                                         "inputs, URI[@VERSION]."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="With --inputs: the teacher graph's spec (default: "
                                        "the spec.yaml saved with the student); inputs missing from --traces "
                                        "are then recorded first."),
    split: str = typer.Option("test", "--split", help="Demo world split to evaluate on: train, val or test."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Demo workdir with (or to receive) the world, "
                                           "teachers and traces (default: the demo's)."),
    preset: str = typer.Option("full", "--preset", help="Demo world: full or tiny."),
    seed: Optional[int] = typer.Option(None, "--seed", help="A fresh world drawn with this seed (held out)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store a models:/ or runs:/ "
                                               "URI is read from (default: $MLFLOW_TRACKING_URI, else "
                                               "WORKDIR/runs/mlflow.db)."),
    log: bool = typer.Option(False, "--log", help="Also log the report to MLflow (metrics, bar chart, JSON)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object instead of a table."),
) -> None:
    """Evaluate a student on held-out inputs (or the demo world): student vs teacher, vs truth, teacher vs truth, retained."""
    if inputs is None and split not in EVAL_SPLITS:
        _fail(f"--split {split!r}: choose one of {', '.join(EVAL_SPLITS)}")
    if inputs is None and preset not in ("full", "tiny"):
        _fail(f"--preset {preset!r}: choose full or tiny")
    if inputs is not None and not traces:
        _fail(f"--inputs {inputs}: give --traces, the trace store of those inputs (record it with distillery "
              f"record SPEC --inputs {inputs} --traces URI, or give --spec and eval records it)")
    runtime.configure()
    from mlflow.exceptions import MlflowException

    from distillery.demo.pipeline import default_workdir
    from distillery.demo.teachers import AssetError
    from distillery.flows.spec import SpecError

    # the store a registry URI is pulled from: the demo's, else the one `distillery distill SPEC` uses
    wd = workdir or (default_workdir() if inputs is None else spec.parent if spec else Path.cwd())
    wd = wd.expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="distillery-eval-") as tmp:
        try:
            folder, pulled = resolve_student(model_uri, Path(tmp), tracking_uri, wd)
        except (FileNotFoundError, FileExistsError, LookupError, ValueError, MlflowException) as e:
            msg = str(getattr(e, "message", None) or e)
            _fail(f"distillery eval: {msg}" if model_uri in msg else f"distillery eval {model_uri}: {msg}")
        if pulled is not None:
            typer.echo(f"{model_uri}: {pulled['name']} version {pulled['version']} "
                       f"(pulled from {pulled['tracking_uri']})", err=True)
        # With --json, stdout carries the JSON object only: the table and logs go to stderr.
        quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
        try:
            with quiet:
                if inputs is None:
                    from distillery.demo.fidelity import run_eval

                    report = run_eval(str(folder), split, workdir=wd, preset=preset, seed=seed, log=log)
                else:
                    report = eval_inputs(folder, inputs, str(traces), spec, log)
        except (ValueError, FileNotFoundError, LookupError, AssetError, SpecError) as e:
            _fail(f"distillery eval {model_uri}: {e}")
    report["model"] = model_uri
    report["student_dir"] = None if pulled is not None else str(folder)
    if pulled is not None:
        report["registry"] = {k: pulled.get(k) for k in ("name", "version", "aliases", "model_uri", "tracking_uri")}
    if as_json:
        print(json.dumps(report, default=str))


def saved_spec(folder: Path) -> Path | None:
    """The spec saved with a student: ``spec.yaml`` in its folder (the train flow writes it), or
    beside it in a pulled folder (``registry.pull`` fetches its run's)."""
    if (folder / "spec.yaml").is_file():
        return folder / "spec.yaml"
    pulled = (folder.parent / "registry.json").is_file()
    return folder.parent / "spec.yaml" if pulled and (folder.parent / "spec.yaml").is_file() else None


def eval_inputs(folder: Path, inputs: Path, traces: str, spec_path: Path | None, log: bool) -> dict:
    """``distillery eval STUDENT --inputs DIR --traces URI``: the generic evaluation (the spec
    given, else the student's saved one, else its lineage's teacher graph), a table, MLflow."""
    from pydantic import ValidationError

    from distillery.flows.spec import load_spec
    from distillery.registry.tracking import log_evaluation
    from distillery.students.evaluation.fidelity import evaluate_inputs, print_table

    spec_path = spec_path or saved_spec(folder)
    try:
        spec = load_spec(spec_path) if spec_path else None
    except ValidationError as e:
        raise ValueError(f"invalid spec {spec_path}: {e}") from None
    report = evaluate_inputs(folder, inputs, traces, spec)
    report["spec"] = str(spec_path) if spec_path else None
    print_table(report, title=f"{folder} on {inputs}")
    if log:
        report["mlflow_run_id"] = log_evaluation(report)
    return report


@app.command()
def example(
    directory: Path = typer.Argument(..., help="Folder to build the example in (reused if already there)."),
    as_json: bool = typer.Option(False, "--json", help="Print paths and commands as one JSON object."),
) -> None:
    """Build a small offline example and print the `distillery record` command that runs on it.

    DIR gets a tiny world (images, requests, documents), tiny teachers trained here, a spec; reruns reuse them."""
    runtime.configure()
    from distillery.demo.example import build_example

    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the command (or the JSON) only
            ex = build_example(directory)
    except FileExistsError as e:  # a folder in the way (e.g. DIR/world holding something else)
        _fail(f"distillery example {directory}: {e}")
    if as_json:
        print(json.dumps(ex))
        return
    reused = [k for k, v in ex["reused"].items() if v]
    typer.echo(f"example in {ex['dir']}: {ex['images']} images, {ex['requests']} requests "
               f"({'reused ' + ' and '.join(reused) if reused else 'built'} in {ex['seconds']:.0f} s). "
               "Record the teacher graph's traces with (add --json for a JSON summary):", err=True)
    print(ex["commands"]["record"])
    typer.echo(f"then train and evaluate the student:\n  {ex['commands']['train']}\n  {ex['commands']['eval']}",
               err=True)


@app.command()
def distill(
    spec: Path = typer.Argument(..., help="Spec YAML."),
    inputs: Path = typer.Option(..., "--inputs", help="Inputs to record and train on."),
    traces: Optional[str] = typer.Option(None, "--traces", help="Trace store URI (default: next to the spec)."),
    eval_inputs: Optional[Path] = typer.Option(None, "--eval-inputs", help="Held-out inputs for evaluation."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Students and local MLflow store."),
    no_warm_start: bool = typer.Option(False, "--no-warm-start", help="Train from scratch even if a champion exists."),
    on_policy: Optional[bool] = typer.Option(None, "--on-policy/--no-on-policy", help="Add the on-policy rounds "
                                             "after the offline epochs (default: the spec's training.on_policy)."),
) -> None:
    """Record -> train -> evaluate -> register -> promote (the Prefect `distill` flow, locally)."""
    runtime.configure()
    s = _load_spec(spec)
    from distillery.flows.distill import distill_flow

    base = spec.resolve().parent
    with runtime.local_prefect():
        result = distill_flow(spec=s, inputs=str(inputs), traces=traces or str(base / "traces.lance"),
                              eval_inputs=str(eval_inputs) if eval_inputs else None,
                              workdir=str(workdir or base / "runs"), warm_start=not no_warm_start,
                              on_policy=on_policy)
    print(json.dumps(result, default=str))


@app.command()
def pull(
    model: str = typer.Argument(..., help="NAME, NAME@ALIAS, NAME/VERSION or models:/ URI."),
    to: Path = typer.Option(..., "--to", help="Folder to write the self-contained student into."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI)."),
) -> None:
    """Download a registered student into a folder that answers with no MLflow server."""
    runtime.configure()
    from distillery.registry.pull import pull as do_pull

    console.print(f"pulled into {do_pull(model, to, tracking_uri=tracking_uri)}")


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A pulled folder or a student folder."),
    image: Path = typer.Option(..., "--image", help="Image file."),
    question: str = typer.Option(..., "--question", help="Question text."),
    backend: str = typer.Option("auto", "--backend", help="auto (the torch-free runtime on ONNX Runtime where "
                                "the folder has the export, int8 first; else torch), runtime, ort (the ORT-format "
                                "graphs), torch, onnx or onnx-int8."),
) -> None:
    """Answer one image + question with a student folder (JSON out). Without torch where the
    folder has ONNX graphs (docs/runtime.md)."""
    runtime.configure()
    from distillery.registry.pull import predict_dir

    try:
        print(json.dumps(predict_dir(model_dir, image, question, backend=backend), default=str))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


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

    from distillery.flows.deployments import build_deployments

    base = spec.resolve().parent
    deps = build_deployments(s, str(inputs.resolve()), traces or str(base / "traces.lance"),
                             str((workdir or base / "runs").resolve()), cron,
                             str(eval_inputs.resolve()) if eval_inputs else None)
    with runtime.local_prefect():  # PREFECT_API_URL's server, else a local one that dies with this process
        prefect_serve(*deps)


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
