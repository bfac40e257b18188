"""`distillery demo`: the whole platform on a synthetic world, on this machine, offline.

Stages run in order and each one is skipped when its output is already there (a warm run reuses
the world, the teachers and the recorded traces): world -> teachers -> record -> train ->
evaluate -> register -> pull and predict. The report (printed, and ``report.json`` in the
workdir) holds every figure and the paths a user needs to rerun a stage by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from distillery import runtime
from distillery.demo.spec import PRESETS, write_spec  # noqa: F401 - the demo's spec; callers import it from here

console = Console(stderr=True)


@dataclass
class DemoReport:
    workdir: str
    preset: str
    teacher: str = "llm"  # the reasoner: in process (llm), or also as a black box (openai)
    stages: list[dict] = field(default_factory=list)  # name, seconds, status
    figures: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - t0, 2)
        self.stages.append({"name": name, "seconds": seconds})
        console.print(f"[green]{name} done[/green] in {seconds:.1f} s")
        return result

    def write(self) -> Path:
        path = Path(self.workdir) / "report.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, default=str))
        os.replace(tmp, path)
        return path


def default_workdir() -> Path:
    return runtime.data_dir() / "demo"


def prepare_workdir(workdir: Path, fresh: bool = False) -> Path:
    """Create the demo workdir (marked as one); ``fresh``: delete it first, only if it is a demo's."""
    workdir = Path(workdir).resolve()
    marker = workdir / ".distillery-demo"
    if fresh and workdir.exists():
        if not marker.exists():
            raise ValueError(f"--fresh: {workdir} is not a demo workdir (no {marker.name}); refusing to delete it")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return workdir


TEACHERS = ("llm", "openai")


def run_demo(workdir: Path | None = None, preset: str = "full", fresh: bool = False,
             train_teachers: bool = False, teacher: str = "llm") -> DemoReport:
    """Run every stage; returns the report (also written to ``workdir/report.json``).

    teacher: ``llm`` (the reasoner in process: the standard demo); ``openai``: the standard demo,
    then the reasoner as a black box behind an OpenAI-compatible server on 127.0.0.1, distilled
    from its top-k log-probs and from its text only (``demo.blackbox``; figures under ``black_box``)."""
    if teacher not in TEACHERS:
        raise ValueError(f"--teacher {teacher!r}: choose one of {', '.join(TEACHERS)}")
    workdir = prepare_workdir(Path(workdir or default_workdir()), fresh)
    runtime.configure()
    t_start = time.perf_counter()
    rep = DemoReport(workdir=str(workdir), preset=preset, teacher=teacher)

    from distillery.demo.teachers import ensure_teachers
    from distillery.demo.world import WorldConfig, build_world

    world = rep.stage("world", lambda: build_world(WorldConfig.preset(preset), workdir / "world"))
    teachers = rep.stage("teachers", lambda: ensure_teachers(world, preset, workdir / "teachers",
                                                             retrain=train_teachers))
    rep.figures["teachers"] = teachers.metrics
    spec_path = write_spec(workdir / "spec.yaml", f"shapes-{preset}", teachers.yolo_weights,
                           world.kb_path, teachers.llm_dir, preset)
    rep.paths.update(spec=str(spec_path), world=str(world.root))

    from distillery.flows.record import run_record
    from distillery.flows.spec import load_spec

    spec = load_spec(spec_path)
    traces = {split: str(workdir / f"traces-{split}.lance") for split in ("train", "test")}
    for split in ("train", "test"):
        inputs = world.split_dir(split)
        summary = rep.stage(f"record ({split})", lambda: run_record(spec, inputs, traces[split]))
        rep.figures[f"record_{split}"] = {k: summary[k] for k in ("written", "skipped", "quarantined", "by_reason", "version")}
        rep.paths[f"inputs_{split}"] = str(inputs)
        rep.paths[f"traces_{split}"] = traces[split]
        rep.commands[f"record_{split}"] = f"distillery record {spec_path} --inputs {inputs} --traces {traces[split]}"

    from distillery.flows.distill import distill_flow

    result = rep.stage("distill (train -> evaluate -> register -> promote)", lambda: distill_flow(
        spec=spec, inputs=str(world.split_dir("train")), traces=traces["train"],
        eval_inputs=str(world.split_dir("test")), eval_traces=traces["test"], workdir=str(workdir / "runs")))
    reg = result["registered"]
    model_ref = (f"{reg['model_name']}@champion" if reg["promoted"] or _is_champion(reg)
                 else f"{reg['model_name']}/{reg['version']}")
    rep.figures["student"] = {"fidelity_vs_teacher": result.get("fidelity") or _logged(reg["run_id"], "fidelity"),
                              "retained": result.get("retained") or _logged(reg["run_id"], "eval.retained"),
                              "registered": reg, "registered_uri": f"models:/{model_ref}",
                              "train": result.get("train"), "reused": result.get("reused", False)}
    rep.stage("pull and predict", lambda: _pull_and_predict(rep, model_ref, world, workdir))
    rep.figures["speed"] = rep.stage("speed (student vs teacher graph, batch 1)",
                                     lambda: _speed(Path(rep.paths["pulled_student"]), spec, world))
    if teacher == "openai":
        from distillery.demo.blackbox import run_blackbox

        run_blackbox(rep, world, teachers, preset, workdir)
    rep.figures["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    rep.commands["read_traces"] = (f"python -c \"import lance; print(lance.dataset('{traces['train']}')"
                                   ".to_table().to_pandas().head())\"")
    rep.commands["mlflow_ui"] = f"mlflow ui --backend-store-uri {_tracking_uri()} --host 127.0.0.1"
    rep.commands["prefect_ui"] = f"PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')} prefect server start"
    path = rep.write()
    print_report(rep, path)
    return rep


def _pull_and_predict(rep: DemoReport, model_ref: str, world, workdir: Path) -> None:
    """Pull the registered student into a folder and answer one test image from it."""
    from distillery.registry.pull import predict_dir, pull

    first = json.loads(world.requests_path("test").read_text().splitlines()[0])
    image = world.split_dir("test") / first["image"]
    folder = pull(model_ref, workdir / "pulled")
    answer = predict_dir(folder, image, first["question"])
    rep.figures["prediction"] = {"image": str(image), "question": first["question"], "answer": answer.get("answer"),
                                 "ground_truth": first["answer"]}  # the request line's label
    rep.paths["pulled_student"] = str(folder)
    rep.commands["predict"] = (f"distillery predict {folder} --image {image} --question \"{first['question']}\"")
    rep.commands["pull"] = f"distillery pull {model_ref} --to ./student"


def _is_champion(reg: dict) -> bool:
    """Whether the registered version holds ``champion`` (a warm run reuses an earlier promotion)."""
    from mlflow import MlflowClient

    from distillery.registry.config import CHAMPION
    from distillery.registry.models import alias_version

    mv = alias_version(MlflowClient(), reg["model_name"], CHAMPION)
    return mv is not None and str(mv.version) == str(reg["version"])


def _logged(run_id: str | None, prefix: str) -> dict[str, dict[str, float]] | None:
    """A reused student's per-node figures, read back from its MLflow run: ``PREFIX.NODE.METRIC``
    (``fidelity``: vs the teacher; ``eval.retained``: retained accuracy)."""
    import mlflow

    if not run_id:
        return None
    out: dict[str, dict[str, float]] = {}
    for key, value in mlflow.get_run(run_id).data.metrics.items():
        if key.startswith(prefix + ".") and key.count(".") == prefix.count(".") + 2:
            node, metric = key[len(prefix) + 1:].split(".")
            out.setdefault(node, {})[metric] = value
    return out or None


def _speed(student: Path, spec, world, n: int = 8, rounds: int = 5) -> dict[str, float]:
    """Per-image latency at batch 1 of the pulled student and of the whole teacher graph, on the
    CPU, on a few test images: the speed-up is the median of ``rounds`` alternating rounds
    (``students.efficiency.paired_speedup``; ``python -m benchmarks.student`` measures more)."""
    import statistics

    from distillery.students.evaluation.efficiency import paired_speedup

    reqs = world.annotations("test")["requests"][:n]
    images = [world.split_dir("test") / r["image"] for r in reqs]
    res = paired_speedup(student, spec, images, [r["question"] for r in reqs], rounds=rounds, device="cpu")
    sp, gp = res["student_parameters"], res["graph_parameters"]
    out = {"student_ms_b1": round(statistics.median(res["student_s"]) * 1e3, 2),
           "graph_ms_b1": round(statistics.median(res["graph_s"]) * 1e3, 2),
           "speedup_batch1": round(res["speedup"], 1), "speedup_rounds": [round(x, 1) for x in res["speedups"]],
           "param_ratio": round(gp / max(sp, 1), 1), "student_parameters": sp, "graph_parameters": gp,
           "student_backend": res["backend"]}
    console.print(f"student ({res['backend']}) {out['student_ms_b1']} ms/img vs graph {out['graph_ms_b1']} ms/img: "
                  f"{out['speedup_batch1']}x faster (median of {res['rounds']} alternating rounds), "
                  f"{out['param_ratio']}x fewer parameters")
    return out


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def print_report(rep: DemoReport, path: Path) -> None:
    from rich.table import Table

    table = Table(title="distillery demo")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for s in rep.stages:
        table.add_row(s["name"], f"{s['seconds']:.1f}")
    Console().print(table)
    Console().print_json(json.dumps(rep.figures, default=str))
    for name, cmd in rep.commands.items():
        Console().print(f"[bold]{name}[/bold]: {cmd}")
    Console().print(f"report: {path}")
