"""Pulling students out of the registry, and answering from a pulled folder.

    pull("shapes-demo@champion", Path("students/shapes"))       # self-contained folder
    predict_dir(Path("students/shapes"), "img.png", "How many hazards?")
    pull_champion(spec, workdir)                                 # the champion a continual run starts from

A pulled folder answers with no MLflow server: ``student/`` (the saved student), ``MLmodel``,
``registry.json`` (name, version, aliases, tags, run id) and, when its run logged one, the
``spec.yaml`` it was distilled with (``distillery eval`` finds its teacher graph there).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillery.students.serving.folder import student_dir

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

# MLflow is imported by the functions that use the registry, not here: answering from a pulled
# folder (``predict_dir``, ``distillery predict``) must not pay for it (~1 s, ~150 MB).


def model_uri_of(model_ref: str) -> str:
    """``NAME``, ``NAME@ALIAS``, ``NAME/VERSION`` or a ``models:/`` URI -> a ``models:/`` URI.

    A bare NAME means its champion, or its newest version when no champion is set."""
    import mlflow

    from distillery.registry.config import CHAMPION
    from distillery.registry.models import alias_version

    if model_ref.startswith("models:/"):
        return model_ref
    if "@" in model_ref or "/" in model_ref:
        return f"models:/{model_ref}"
    client = mlflow.MlflowClient()
    if alias_version(client, model_ref, CHAMPION) is not None:
        return f"models:/{model_ref}@{CHAMPION}"
    versions = client.search_model_versions(f"name = '{model_ref}'")
    if not versions:
        raise LookupError(f"model {model_ref!r}: no registered versions")
    return f"models:/{model_ref}/{max(int(v.version) for v in versions)}"


def resolve_version(model_uri: str) -> ModelVersion:
    """The registered version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names."""
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = model_uri.removeprefix("models:/")
    client = mlflow.MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = ref.partition("/")
        if not version.isdigit():
            raise ValueError(f"{model_uri}: use NAME, NAME@ALIAS or NAME/VERSION")
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise LookupError(f"{model_uri}: not in the registry at {mlflow.get_tracking_uri()} ({e.message})") from None


def pull(model_ref: str, to: str | Path, tracking_uri: str | None = None) -> Path:
    """Download a registered student into ``to``: a folder that answers with no MLflow server.

    Layout: ``to/student/`` (model.safetensors, config.json, tokenizer and report files),
    ``to/MLmodel`` (signature, requirements) and ``to/registry.json`` (name, version, aliases,
    tags, run id). Replaces an earlier pull in ``to``; refuses any other non-empty folder.
    tracking_uri: the registry to pull from (see ``use_store``)."""
    import mlflow

    from distillery.registry.models import use_store

    to = Path(to)
    use_store(tracking_uri)
    if to.exists() and any(to.iterdir()) and not (to / "registry.json").exists():
        raise FileExistsError(f"{to}: not empty and not an earlier pull; choose an empty folder")
    mv = resolve_version(model_uri_of(model_ref))
    to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=to.parent, prefix=f".{to.name}-") as tmp:
        src = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=f"{tmp}/dl"))
        staged = Path(tmp) / "pulled"
        shutil.copytree(src / STUDENT_ARTIFACT, staged / "student")
        shutil.copy2(src / "MLmodel", staged / "MLmodel")
        (staged / "registry.json").write_text(json.dumps(_registry_info(mv), indent=2))
        _download_spec(mv.run_id, staged)
        if to.exists():
            shutil.rmtree(to)
        staged.rename(to)
    return to


def _download_spec(run_id: str | None, into: Path) -> None:
    """The run's ``spec.yaml`` into ``into`` (best effort: a run may have logged none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return
    try:
        got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SPEC_FILE, dst_path=str(into / ".spec"))
    except (MlflowException, OSError):
        return
    shutil.move(got, into / SPEC_FILE)
    shutil.rmtree(into / ".spec", ignore_errors=True)


def pull_champion(spec: Any, workdir: str | Path) -> dict[str, Any] | None:
    """The spec's current champion pulled into ``workdir/champion``: its version, its student
    folder and the trace-store version it was trained on (None when unknown); None when the
    model has no champion."""
    from distillery.registry.config import CHAMPION

    name = spec.registry.model_name or spec.name
    try:
        mv = resolve_version(f"models:/{name}@{CHAMPION}")
    except LookupError:
        return None
    folder = pull(f"{name}/{mv.version}", Path(workdir) / "champion")
    version = mv.tags.get("traces_version")
    return {"version": mv.version, "dir": str(folder / "student"),
            "traces_version": int(version) if version and version.isdigit() else None}


def load_predictor(model: str | Path, device: str = "cpu", tracking_uri: str | None = None):
    """A StudentPredictor for a student folder (trained or pulled) or a registry reference
    (``NAME``, ``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...``), pulled into a temporary folder."""
    from distillery.students.serving.predictor import StudentPredictor

    if Path(model).is_dir():
        return StudentPredictor.load(student_dir(model), device=device)
    with tempfile.TemporaryDirectory(prefix="distillery-pull-") as tmp:
        folder = pull(str(model), Path(tmp) / "pulled", tracking_uri=tracking_uri)
        return StudentPredictor.load(student_dir(folder), device=device)


SPEC_FILE = "spec.yaml"  # the spec a distillation's run logged (registry.tracking.log_spec)
STUDENT_ARTIFACT = Path("artifacts") / "student"  # where a logged pyfunc student keeps the folder


def download_logged(model_uri: str, to: str | Path, tracking_uri: str | None = None) -> Path:
    """The student folder of a logged (not necessarily registered) model: ``runs:/RUN_ID/student``
    or ``models:/m-...`` (MLflow 3's logged-model id), downloaded into ``to``."""
    import mlflow

    from distillery.registry.models import use_store

    use_store(tracking_uri)
    dl = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(Path(to) / "download")))
    inner = next((d for d in (dl / STUDENT_ARTIFACT, dl / "student" / STUDENT_ARTIFACT) if d.is_dir()), dl)
    return student_dir(inner)


def _registry_info(mv: ModelVersion) -> dict[str, Any]:
    import mlflow

    return {"name": mv.name, "version": mv.version, "aliases": list(mv.aliases or []),
            "tags": dict(mv.tags), "run_id": mv.run_id, "source": mv.source,
            "model_uri": f"models:/{mv.name}/{mv.version}", "tracking_uri": mlflow.get_tracking_uri()}


def predict_dir(folder: str | Path, image: str | Path | bytes, question: str, backend: str = "auto") -> dict:
    """Answer one request from a pulled (or trained) student folder; JSON-serializable result.

    ``backend``: ``auto`` (default): the torch-free runtime (``students.serving.runtime``) where
    the folder has current ONNX graphs, int8 first, else the torch student; ``runtime`` (the
    runtime, failing where it cannot run), ``ort`` (the runtime on the ORT-format graphs);
    ``torch``, ``onnx``, ``onnx-int8`` as ``StudentPredictor.load`` (torch-side)."""
    from distillery.images import image_source
    from distillery.students.serving.graphs import runtime_ready

    image = str(image) if isinstance(image, Path) else image
    model_dir = student_dir(folder)
    request = {"image": image_source(image, where="--image"), "question": question}
    if backend in ("runtime", "ort") or (backend == "auto" and runtime_ready(model_dir)):
        from distillery.students.serving.runtime import StudentRuntime

        return StudentRuntime.load(model_dir, graphs="ort" if backend == "ort" else "auto").predict([request])[0]
    from distillery.students.serving.predictor import StudentPredictor

    predictor = StudentPredictor.load(model_dir, device="cpu", backend=backend)
    return predictor.predict([request])[0]
