"""The spec: one YAML file, validated by pydantic models that are also the flow parameters.

```yaml
name: shapes-demo                 # registered model name
inputs: {default_question: "How many objects?"}
teachers:                         # the DAG: references in templates define the edges
  detector: {type: yolo, weights: yolo.pt, task: segment}
  retriever: {type: rag, documents: kb.jsonl, query: "{request.question}"}
  reasoner: {type: llm, model: llm/, prompt: "{detector.summary} {retriever.context} {request.question}"}
```

The spec composes the configs each package defines for itself: the teacher nodes (each node
type's config, registered by key in ``distillery.teachers.nodes``), how inputs are read and
recorded (``teachers``), the student and its training (``students``), the registry. It lives here,
above them all, because it is what a flow takes. Templates cite ``{request.question}`` or
``{node.field}`` and nothing else: no attribute access, no code (``teachers.graph``).
``load_spec`` resolves relative paths against the spec file's folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import distillery.teachers.nodes  # noqa: F401  (registers every node type)
from distillery.registry.config import RegistryConfig
from distillery.students.model.config import StudentConfig
from distillery.students.training.config import TrainConfig
from distillery.teachers.base import NODE_TYPES, AnyNodeConfig, parse_nodes
from distillery.teachers.graph import SpecError, topological_order
from distillery.teachers.inputs import InputsConfig
from distillery.teachers.record import RUNNER_FIELDS, RecordConfig

__all__ = ["Spec", "SpecError", "load_spec"]


TEACHERS_EXAMPLE = {"detector": {"type": "yolo", "weights": "yolo.pt", "task": "segment"},
                    "retriever": {"type": "rag", "documents": "kb.jsonl", "query": "{request.question}"},
                    "reasoner": {"type": "llm", "model": "llm/",
                                 "prompt": "{detector.summary} {retriever.context} {request.question}"}}
"""The teacher graph of the module docstring: the example a form's JSON editor shows."""


class Spec(BaseModel):
    """A whole distillation: the teacher graph, the student, training and registry settings."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Registered model name (letters, digits, '-', '_').")
    inputs: InputsConfig = Field(default_factory=InputsConfig)
    teachers: dict[str, AnyNodeConfig] = Field(
        description="Teacher nodes by name; each node's `type` picks its settings "
                    f"({', '.join(sorted(NODE_TYPES))}). A deployment's form shows each of its nodes' fields; "
                    "to add or remove a node, switch this field to JSON (its menu: Use JSON Input), e.g. "
                    + json.dumps(TEACHERS_EXAMPLE, separators=(", ", ": ")),
        examples=[TEACHERS_EXAMPLE])
    record: RecordConfig = Field(default_factory=RecordConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    training: TrainConfig = Field(default_factory=TrainConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError(f"name {v!r}: use letters, digits, '-', '_', '.' (max 100)")
        return v

    @field_validator("teachers", mode="before")
    @classmethod
    def _node_types(cls, v):
        return parse_nodes(v)  # each node by its registered type; errors name node and field

    @model_validator(mode="after")
    def _graph_ok(self) -> "Spec":
        self.topological_order()  # raises SpecError naming the node and field
        return self

    def topological_order(self) -> list[str]:
        """The teacher nodes, each after the nodes its templates cite."""
        return topological_order(self.teachers)

    def spec_hash(self) -> str:
        # where recording runs (local or Dask) changes no record: not part of the spec's identity
        blob = json.dumps(self.model_dump(mode="json", exclude={"record": set(RUNNER_FIELDS)}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def load_spec(path: str | Path) -> Spec:
    """Read a spec YAML (``yaml.safe_load``), resolve relative paths, validate.

    Raises SpecError with the file name on YAML errors; pydantic's ValidationError (which
    names the node and the field) on invalid content."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read spec: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping")
    base = path.resolve().parent
    for node in (raw.get("teachers") or {}).values():
        if isinstance(node, dict):
            _resolve_paths(node, base)
    return Spec.model_validate(raw)


def _resolve_paths(node: dict, base: Path) -> None:
    cls = NODE_TYPES.get(node.get("type"))
    if cls is None:
        return  # validation reports the unknown type
    for fname in cls.config_cls.PATH_FIELDS:
        value = node.get(fname)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            node[fname] = str((base / value).resolve())
