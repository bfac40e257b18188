"""TeacherGraph: the spec's teacher nodes as a DAG, loaded once, run node by node over shards.

A graph is the ``teachers:`` part of a spec: node name -> node config. Templates cite
``{request.question}`` or ``{node.field}`` and nothing else (no attribute access, no code); the
references define the DAG, checked here before any model loads (``topological_order``). The record
loop calls ``run_node`` once per (node, shard) in topological order; this module knows nothing
about Prefect, so it is tested (and benchmarked) as plain Python.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from typing import Any

from distillery.teachers.base import (TRANSIENT_ERRORS, ItemError, NodeConfig, NodeInput, RetryableError, TeacherNode,
                                      node_class)
from distillery.teachers.records import Request

REQUEST_FIELDS = frozenset({"question", "image_path", "input_id"})
_REF = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Teachers = Mapping[str, NodeConfig]  # node name -> config: the spec's teachers part


class SpecError(ValueError):
    """A spec that cannot run; the message names the node and the field."""


def references(teachers: Teachers, node: str) -> list[tuple[str, str, str]]:
    """(template field, source, source field) for every ``{source.field}`` in the node."""
    cfg = teachers[node]
    refs = []
    for fname in cfg.TEMPLATE_FIELDS:
        for ref in _REF.findall(getattr(cfg, fname).replace("{{", "").replace("}}", "")):
            parts = ref.strip().split(".")
            if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
                raise SpecError(f"teachers.{node}.{fname}: bad reference {{{ref}}}; "
                                "use {request.question} or {node_name.field}")
            refs.append((fname, parts[0], parts[1]))
    return refs


def dependencies(teachers: Teachers, node: str) -> set[str]:
    return {src for _, src, _ in references(teachers, node) if src != "request"}


def topological_order(teachers: Teachers) -> list[str]:
    """The nodes, each after the nodes it cites; a SpecError names the node and field of a bad
    name, an unknown node or field, or a cycle."""
    for node in teachers:
        if not _NAME.match(node) or node == "request":
            raise SpecError(f"teachers.{node}: node names must be identifiers, not 'request'")
        for fname, src, field in references(teachers, node):
            where = f"teachers.{node}.{fname}"
            if src == "request":
                if field not in REQUEST_FIELDS:
                    raise SpecError(f"{where}: request has no field {field!r} "
                                    f"(known: {', '.join(sorted(REQUEST_FIELDS))})")
            elif src not in teachers:
                raise SpecError(f"{where}: references unknown node {src!r}")
            elif field not in teachers[src].OUTPUT_FIELDS:
                known = ", ".join(sorted(teachers[src].OUTPUT_FIELDS))
                raise SpecError(f"{where}: node {src!r} has no output field {field!r} (known: {known})")
    sorter = TopologicalSorter({n: dependencies(teachers, n) for n in teachers})
    try:
        return list(sorter.static_order())
    except CycleError as e:
        cycle = " -> ".join(e.args[1])
        raise SpecError(f"teachers: cycle between nodes: {cycle}") from None


def nodes_of_type(teachers: Teachers, kind: str) -> list[str]:
    """The graph's nodes of one type (``yolo``, ``rag``, ``llm``, ...), in topological order."""
    return [n for n in topological_order(teachers) if teachers[n].type == kind]


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


@dataclass
class NodeResult:
    """One node's result for one input: an output, or the reason it failed."""

    output: dict[str, Any] | None
    error: str | None
    seconds: float
    retry: bool = False  # the error is worth another try in a later run (RetryableError)


class TeacherGraph:
    """The nodes of ``teachers`` (a spec's teachers part), loaded once, run node by node."""

    def __init__(self, teachers: Teachers):
        self.teachers = dict(teachers)
        self.order = topological_order(self.teachers)
        self.nodes: dict[str, TeacherNode] = {
            name: node_class(cfg.type)(name, cfg) for name, cfg in self.teachers.items()
        }
        self._loaded = False
        self._loaded_nodes: set[str] = set()
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """Hash of the teacher configs and each model's identity (weights hash or hub id)."""
        if self._fingerprint is None:
            ident = {
                name: {"config": cfg.model_dump(mode="json"), "identity": cfg.identity()}
                for name, cfg in self.teachers.items()
            }
            blob = json.dumps(ident, sort_keys=True).encode()
            self._fingerprint = hashlib.sha256(blob).hexdigest()[:32]
        return self._fingerprint

    def load(self) -> "TeacherGraph":
        """Load every model once; later calls are free."""
        if not self._loaded:
            for name in self.order:
                self.nodes[name].load()
            self._loaded = True
        return self

    def node_inputs(self, name: str, requests: list[Request], upstream: list[dict[str, dict]],
                    images: list | None = None) -> list[NodeInput]:
        """Build the node's inputs: the image plus each template rendered over the request and
        the upstream outputs of the same input."""
        cfg = self.teachers[name]
        items = []
        for i, (req, up) in enumerate(zip(requests, upstream)):
            ctx = {"request": req.context(), **up}
            texts = {f: render_template(getattr(cfg, f), ctx) for f in cfg.TEMPLATE_FIELDS}
            img = images[i] if images is not None else None
            items.append(NodeInput(input_id=req.input_id, image=img, texts=texts))
        return items

    def run_node(self, name: str, requests: list[Request], upstream: list[dict[str, dict]],
                 images: list | None = None) -> list[NodeResult]:
        """Run one node over a shard in batches of its ``batch_size``.

        ``upstream[i]`` maps node name -> output for input i (only nodes that succeeded). If a
        whole batch raises, each input is retried alone so that one bad input fails alone."""
        self.load()
        node = self.nodes[name]
        items = self.node_inputs(name, requests, upstream, images)
        results: list[NodeResult] = []
        bs = max(1, node.config.batch_size)
        for start in range(0, len(items), bs):
            results.extend(self._run_batch(node, items[start:start + bs]))
        return results

    def score_node(self, name: str, requests: list[Request], upstream: list[dict[str, dict]],
                   continuations: list[list[int]]) -> tuple[list[str], list[dict[str, Any]], float]:
        """The node's teacher-forced view of given continuations (on-policy distillation: the
        student's answers): each input's prompt is rendered through the node's templates from the
        request and the recorded upstream outputs, exactly as in recording, then the node's
        ``score`` gives its top-k log-probs at every position of the continuation. Loads this
        node alone. Returns (rendered prompts, scores, seconds). A node type that cannot score
        (no ``score`` method, e.g. a server without prompt log-probs) raises NotImplementedError."""
        node = self.nodes[name]
        if not callable(getattr(node, "score", None)):
            raise NotImplementedError(f"node {name!r} (type {self.teachers[name].type}) cannot score a given "
                                      "continuation (no teacher-forced log-probs)")
        if name not in self._loaded_nodes and not self._loaded:
            node.load()
            self._loaded_nodes.add(name)
        prompts = [item.texts["prompt"] for item in self.node_inputs(name, requests, upstream)]
        t0 = time.perf_counter()
        scores = node.score(prompts, continuations) if prompts else []
        return prompts, scores, time.perf_counter() - t0

    @staticmethod
    def _run_batch(node: TeacherNode, batch: list[NodeInput]) -> list[NodeResult]:
        t0 = time.perf_counter()
        try:
            outs = node.run(batch)
            if len(outs) != len(batch):
                raise RuntimeError(f"node {node.name!r} returned {len(outs)} outputs for {len(batch)} inputs")
        except TRANSIENT_ERRORS:
            raise  # the whole (node, shard) task is retried; no input is blamed for it
        except Exception:
            if len(batch) == 1:
                return [NodeResult(None, _describe(node.name, batch[0]), time.perf_counter() - t0)]
            return [r for item in batch for r in TeacherGraph._run_batch(node, [item])]
        per = (time.perf_counter() - t0) / len(batch)
        return [
            NodeResult(None, f"{node.name}: {o}", per, isinstance(o, RetryableError)) if isinstance(o, ItemError)
            else NodeResult(o, None, per) for o in outs
        ]


def _describe(node: str, item: NodeInput) -> str:
    last = traceback.format_exc().strip().splitlines()[-1]
    return f"{node}: failed on input {item.input_id}: {last}"
