"""Typed config for the MLflow registry: where students are logged and when `champion` moves.

```yaml
registry:
  tracking_uri: null            # null: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
  experiment: null              # null: the spec name
  model_name: null              # null: the spec name
  gate: {answer_agreement: 0.9} # every metric must reach its minimum
  gate_metric_for_comparison: answer_agreement   # and must not be worse than the champion's
```
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

CHALLENGER = "challenger"  # alias on the newest registered version
CHAMPION = "champion"  # alias on the version that passed the promotion gate

# What the logged pyfunc model needs at load time (pinned to the installed versions): the
# torch-free runtime's packages (students/serving/runtime.py) and MLflow's own; a student logged
# without ONNX graphs runs on torch and needs TORCH_PACKAGES too.
RUNTIME_PACKAGES = ("mlflow", "onnxruntime", "numpy", "pillow", "tokenizers", "pycocotools", "pandas")
TORCH_PACKAGES = ("torch", "torchvision", "transformers", "safetensors", "pydantic", "timm")


class RegistryConfig(BaseModel):
    """Where students are logged and when the champion alias moves."""

    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI. None: $MLFLOW_TRACKING_URI if set, else a local "
        "SQLite store sqlite:///<workdir>/mlflow.db with artifacts in <workdir>/mlartifacts.")
    experiment: str | None = Field(None, description="MLflow experiment name; None = the spec name.")
    model_name: str | None = Field(None, description="Registered model name; None = the spec name.")
    gate: dict[str, float] = Field(
        default_factory=dict, description="Promotion gate: metric -> minimum value (higher is "
        "better), e.g. {answer_agreement: 0.9}. Every metric must be present and reach its minimum.")
    gate_metric_for_comparison: str | None = Field(
        None, description="Metric on which the candidate must not be worse than the current "
        "champion (same evaluation set). None = the first gate metric; no gate = no comparison.")
    pip_requirements: list[str] | None = Field(
        None, description="Requirements written with the logged model. None = the installed "
        "versions of the student's runtime packages, pinned (explicit = fast log_model).")
    log_system_metrics: bool = Field(True, description="Log CPU/GPU/memory usage during training.")

    @field_validator("model_name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError(f"model_name {v!r}: use letters, digits, '-', '_', '.' (max 100)")
        return v

    @field_validator("gate")
    @classmethod
    def _gate_ok(cls, v: dict[str, float]) -> dict[str, float]:
        for metric in v:
            if not re.fullmatch(r"[A-Za-z0-9_./-]+", metric):
                raise ValueError(f"gate metric {metric!r}: use letters, digits, '_', '.', '/', '-'")
        return v

    # -- resolved values ----------------------------------------------------------------------------
    def resolve_tracking_uri(self, workdir: str | Path | None = None) -> str:
        """The tracking URI to use: this config, then $MLFLOW_TRACKING_URI, then local SQLite."""
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if workdir is None:
            from distillery.runtime import data_dir

            workdir = data_dir()
        folder = Path(workdir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    def comparison_metric(self) -> str | None:
        return self.gate_metric_for_comparison or next(iter(self.gate), None)

    def requirements(self, torch: bool = False) -> list[str]:
        """``pip_requirements`` when set, else the runtime's packages pinned to the installed
        versions; with ``torch`` (a student without ONNX graphs) the torch student's too."""
        if self.pip_requirements is not None:
            return list(self.pip_requirements)
        reqs = []
        for pkg in RUNTIME_PACKAGES + (TORCH_PACKAGES if torch else ()):
            try:
                reqs.append(f"{pkg}=={metadata.version(pkg)}")
            except metadata.PackageNotFoundError:
                reqs.append(pkg)
        return reqs


def artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment: a folder beside a SQLite store (never ./mlruns);
    None for a tracking server, which decides (e.g. its proxied S3 bucket)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if not db.is_absolute():  # sqlite:///relative.db
        db = Path.cwd() / db
    return (db.parent / "mlartifacts").resolve().as_uri()
