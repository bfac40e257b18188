"""The spec: one YAML file, validated by pydantic models that are also the flow parameters.

```yaml
name: shapes-demo                 # registered model name
inputs: {default_question: "How many objects?"}
teachers:                         # the DAG: references in templates define the edges
  detector: {type: yolo, weights: yolo.pt, task: segment}
  retriever: {type: rag, documents: kb.jsonl, query: "{request.question}"}
  reasoner: {type: llm, model: llm/, prompt: "{detector.summary} {retriever.context} {request.question}"}
```

Templates cite ``{request.question}`` or ``{node.field}`` and nothing else: no attribute access,
no code. ``load_spec`` resolves relative paths against the spec file's folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from registry.config import RegistryConfig
from students.config import StudentConfig
from students.train_config import TrainConfig
from teachers.llm import LLMConfig
from teachers.rag import RagConfig
from teachers.yolo import YoloConfig

NodeSpec = Annotated[Union[YoloConfig, RagConfig, LLMConfig], Field(discriminator="type")]
REQUEST_FIELDS = frozenset({"question", "image_path", "input_id"})
_REF = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """A spec that cannot run; the message names the node and the field."""


class InputsConfig(BaseModel):
    """How inputs are read and checked before any teacher sees them."""

    model_config = ConfigDict(extra="forbid")
    default_question: str | None = Field(None, description="Question for image-only folders.")
    max_pixels: int = Field(40_000_000, ge=1, description="Refuse larger images (decompression bombs).")
    max_question_chars: int = Field(2000, ge=1, description="Refuse longer questions.")


class RecordConfig(BaseModel):
    """How the record flow maps work onto Prefect tasks."""

    model_config = ConfigDict(extra="forbid")
    shard_size: int = Field(128, ge=1, description="Inputs per (node, shard) task and per commit (a crash loses at most one shard in flight).")
    retries: int = Field(2, ge=0, description="Task retries on transient (whole-shard) errors.")
    retry_delay_s: float = Field(1.0, ge=0)


class Spec(BaseModel):
    """A whole distillation: the teacher graph, the student, training and registry settings."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Registered model name (letters, digits, '-', '_').")
    inputs: InputsConfig = Field(default_factory=InputsConfig)
    teachers: dict[str, NodeSpec] = Field(description="Teacher nodes by name.")
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

    @model_validator(mode="after")
    def _graph_ok(self) -> "Spec":
        self.topological_order()  # raises SpecError naming the node and field
        return self

    # -- the DAG ------------------------------------------------------------------------------
    def references(self, node: str) -> list[tuple[str, str, str]]:
        """(template field, source, source field) for every ``{source.field}`` in the node."""
        cfg = self.teachers[node]
        refs = []
        for fname in cfg.TEMPLATE_FIELDS:
            for ref in _REF.findall(getattr(cfg, fname).replace("{{", "").replace("}}", "")):
                parts = ref.strip().split(".")
                if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
                    raise SpecError(
                        f"teachers.{node}.{fname}: bad reference {{{ref}}}; "
                        "use {request.question} or {node_name.field}"
                    )
                refs.append((fname, parts[0], parts[1]))
        return refs

    def dependencies(self, node: str) -> set[str]:
        return {src for _, src, _ in self.references(node) if src != "request"}

    def topological_order(self) -> list[str]:
        for node, cfg in self.teachers.items():
            if not _NAME.match(node) or node == "request":
                raise SpecError(f"teachers.{node}: node names must be identifiers, not 'request'")
            for fname, src, field in self.references(node):
                where = f"teachers.{node}.{fname}"
                if src == "request":
                    if field not in REQUEST_FIELDS:
                        raise SpecError(f"{where}: request has no field {field!r} "
                                        f"(known: {', '.join(sorted(REQUEST_FIELDS))})")
                elif src not in self.teachers:
                    raise SpecError(f"{where}: references unknown node {src!r}")
                elif field not in self.teachers[src].OUTPUT_FIELDS:
                    known = ", ".join(sorted(self.teachers[src].OUTPUT_FIELDS))
                    raise SpecError(f"{where}: node {src!r} has no output field {field!r} (known: {known})")
        sorter = TopologicalSorter({n: self.dependencies(n) for n in self.teachers})
        try:
            return list(sorter.static_order())
        except CycleError as e:
            cycle = " -> ".join(e.args[1])
            raise SpecError(f"teachers: cycle between nodes: {cycle}") from None

    def teacher_hash(self) -> str:
        """Hash of the teacher part of the spec (configs only; see TeacherGraph.fingerprint)."""
        blob = json.dumps({k: v.model_dump(mode="json") for k, v in self.teachers.items()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def spec_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def render_template(template: str, context: dict[str, dict]) -> str:
    """Fill ``{source.field}`` from ``context[source][field]``; ``{{``/``}}`` are literal braces.

    Lists render one item per line; anything else with ``str``."""

    def value(m: re.Match) -> str:
        src, field = m.group(1).strip().split(".")
        v = context[src][field]
        if isinstance(v, (list, tuple)):
            return "\n".join(str(x) for x in v)
        return str(v)

    parts = template.split("{{")
    out = []
    for p in parts:
        out.append("}".join(_REF.sub(value, q) for q in p.split("}}")))
    return "{".join(out)


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
    from teachers.base import NODE_TYPES

    cls = NODE_TYPES.get(node.get("type"))
    if cls is None:
        return  # validation reports the unknown type
    for fname in cls.config_cls.PATH_FIELDS:
        value = node.get(fname)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            node[fname] = str((base / value).resolve())
