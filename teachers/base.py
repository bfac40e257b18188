"""The teacher-node interface and the registry of node types.

A node type is a thin adapter around one real library (Ultralytics, sentence-transformers + FAISS,
transformers). It is made of two classes:

* a pydantic ``NodeConfig`` subclass: the node's settings in the spec. It is light (no heavy
  imports) so a spec validates in milliseconds, before any model loads. It declares which of its
  fields are *templates* (``TEMPLATE_FIELDS``: strings that may cite ``{request.question}`` or
  ``{other_node.field}``) and which fields its output offers to templates (``OUTPUT_FIELDS``).
* a ``TeacherNode`` subclass: loads the model once (``load``) and runs it on a batch
  (``run``), returning one output dict (or one exception) per input.

Node types are looked up by key (``yolo``, ``rag``, ``llm``) in ``NODE_TYPES``; a spec can never
name an import path (a spec typed into the Prefect UI must not be able to run code). Every module
of the ``distillery.teachers.nodes`` package registers itself when that package is imported, so a
new node type is one new file there. ``parse_nodes`` turns a spec's ``teachers:`` mapping into
configs of the registered types, and ``AnyNodeConfig`` is the type a spec gives its nodes: its
JSON schema (the Prefect UI's form) offers every registered type.
"""

from __future__ import annotations

import hashlib
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationError
from pydantic_core import InitErrorDetails


class NodeConfig(BaseModel):
    """Settings shared by every node type. Subclasses add a ``type: Literal[...]`` field."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = ()
    """Names of string fields that are templates over the request and upstream outputs."""
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset()
    """Keys of the node's output dict that downstream templates may cite."""
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()
    """Fields holding a local path (or a hub id); relative paths resolve against the spec file."""

    batch_size: int = 16
    """Inputs per call to the underlying model."""

    def identity(self) -> dict[str, str]:
        """What the node's model *is*, for the graph fingerprint: file hashes for local paths,
        the id itself (plus revision where the type has one) for hub ids."""
        out: dict[str, str] = {}
        for name in self.PATH_FIELDS:
            value = getattr(self, name)
            if value:
                out[name] = path_identity(str(value))
        return out


class ItemError(Exception):
    """An input this node refuses (e.g. a prompt longer than the model's context).

    Returned (not raised) in place of an output; the graph quarantines that input only."""


class RetryableError(ItemError):
    """An input the node could not do this time (a server that kept failing or timing out for it):
    returned like an ItemError, so the input is recorded with its reason (status ``retry``), and
    the next run of the same inputs tries it again, replacing that record."""


class TransientError(Exception):
    """A failure of the whole batch that a retry may cure (a model server that timed out, a lost
    connection). Raised, not returned: the (node, shard) task fails and Prefect retries it,
    instead of quarantining every input of the batch."""


TRANSIENT_ERRORS = (TransientError, ConnectionError, TimeoutError)


@dataclass
class NodeInput:
    """What one node sees for one input: the request's image and the rendered templates."""

    input_id: str
    image: Image.Image | None
    texts: dict[str, str] = field(default_factory=dict)  # template field name -> rendered text


class TeacherNode(ABC):
    """One loaded teacher model. ``run`` must return one entry per input, in order."""

    config_cls: ClassVar[type[NodeConfig]]

    def __init__(self, name: str, config: NodeConfig):
        self.name = name
        self.config = config

    @abstractmethod
    def load(self) -> None:
        """Load weights once per run (not per batch)."""

    @abstractmethod
    def run(self, batch: list[NodeInput]) -> list[dict[str, Any] | ItemError]:
        """Run the model on a batch; numpy arrays in the output are stored as binary tensors."""


NODE_TYPES: dict[str, type[TeacherNode]] = {}


def register_node(key: str):
    """Class decorator: make a node type available to specs under ``key``."""

    def wrap(cls: type[TeacherNode]) -> type[TeacherNode]:
        if key in NODE_TYPES and NODE_TYPES[key] is not cls:
            raise ValueError(f"node type {key!r} is already registered by {NODE_TYPES[key]}")
        NODE_TYPES[key] = cls
        return cls

    return wrap


def node_class(key: str) -> type[TeacherNode]:
    """Look a node type up by key, failing with the list of known keys."""
    try:
        return NODE_TYPES[key]
    except KeyError:
        known = ", ".join(sorted(NODE_TYPES)) or "(none registered)"
        raise KeyError(f"unknown teacher node type {key!r}; known types: {known}") from None


def parse_nodes(nodes: Any) -> Any:
    """A spec's ``teachers:`` mapping with each node's dict validated by its type's config class
    (node configs are passed through). Errors name the node and field (``teachers.NODE.FIELD``
    once inside a spec); anything but a mapping is returned for pydantic to refuse."""
    if not isinstance(nodes, dict):
        return nodes
    out, errors = {}, []
    for name, node in nodes.items():
        if isinstance(node, dict):
            kind = node.get("type")
            if kind not in NODE_TYPES:
                known = ", ".join(sorted(NODE_TYPES)) or "(none registered)"
                errors.append(InitErrorDetails(type="value_error", loc=(name, "type"), input=kind, ctx={
                    "error": ValueError(f"unknown teacher node type {kind!r}; known types: {known}")}))
                continue
            try:
                node = NODE_TYPES[kind].config_cls.model_validate(node)
            except ValidationError as e:
                errors += [InitErrorDetails(type=d["type"], loc=(name, *d["loc"]), input=d["input"],
                                            ctx=d.get("ctx", {})) for d in e.errors()]
                continue
        out[name] = node
    if errors:
        raise ValidationError.from_exception_data("teachers", errors)
    return out


class _RegisteredTypes:
    """JSON schema of a node: one of the registered types' configs (read when a schema is made)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        configs = [NODE_TYPES[k].config_cls for k in sorted(NODE_TYPES)]
        return {"oneOf": [handler(c.__pydantic_core_schema__) for c in configs],
                "discriminator": {"propertyName": "type"}}


AnyNodeConfig = Annotated[SerializeAsAny[NodeConfig], _RegisteredTypes]
"""A node config of any registered type (validate the mapping with ``parse_nodes`` first)."""


def node_form_schema(teachers_schema: dict[str, Any], nodes: dict[str, NodeConfig]) -> dict[str, Any]:
    """The JSON schema of a spec's ``teachers:`` with one property per node of ``nodes``, each the
    schema of that node's type (its fields, defaults and descriptions).

    A form (Prefect's UI) renders an object's ``properties`` as fields and a bare mapping (only
    ``additionalProperties``, the node names being the user's) as one JSON editor; a deployment
    knows its spec's nodes, so its form can show each node's fields. ``teachers_schema`` is the
    schema made from ``AnyNodeConfig`` (the registered types under ``additionalProperties``), kept
    for nodes added later; the result is a new dict."""
    variants = {v.get("properties", {}).get("type", {}).get("const"): v
                for v in teachers_schema.get("additionalProperties", {}).get("oneOf", [])}
    properties = {}
    for name, node in nodes.items():
        kind = getattr(node, "type", None)
        if kind not in variants:
            return dict(teachers_schema)  # a type the schema does not offer: keep the JSON editor
        properties[name] = {**variants[kind], "title": name,
                            "description": f"`{kind}` node. " + (variants[kind].get("description") or "")}
    return {**teachers_schema, "properties": properties}


# (resolved path) -> (size, mtime_ns, inode, time it was hashed in ns, sha256): a file's hash is
# reused while its stat is unchanged, as git's index and DVC's state do. A file changed within
# RACY_NS of being hashed could change again with the same stat (timestamps are coarse), so its
# hash is never reused (git's "racy" rule).
_HASHES: dict[str, tuple[int, int, int, int, str]] = {}
RACY_NS = 2_000_000_000


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes; remembered in this process while the file's size, mtime and
    inode stay the same (a rerun's graph fingerprint re-reads none of the teachers' ~100 MB)."""
    key = str(Path(path).resolve())
    st = os.stat(key)
    known = _HASHES.get(key)
    if known is not None and known[:3] == (st.st_size, st.st_mtime_ns, st.st_ino) \
            and st.st_mtime_ns < known[3] - RACY_NS:
        return known[4]
    hashed_at = time.time_ns()
    h = hashlib.sha256()
    with open(key, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _HASHES[key] = (st.st_size, st.st_mtime_ns, st.st_ino, hashed_at, h.hexdigest())
    return h.hexdigest()


def forget_file_hashes() -> None:
    """Forget the hashes ``sha256_file`` remembers (what a new process starts with)."""
    _HASHES.clear()


def path_identity(value: str) -> str:
    """sha256 of a file, or of a folder's files (names + contents), or the string for hub ids."""
    p = Path(value)
    if p.is_file():
        return "sha256:" + sha256_file(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(sha256_file(f).encode())
        return "sha256-dir:" + h.hexdigest()
    return "id:" + value
