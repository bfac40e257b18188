"""TeacherGraph: the spec's teacher nodes as a DAG, loaded once, run node by node over shards.

The record flow calls ``run_node`` once per (node, shard) in topological order; this module
knows nothing about Prefect, so it is tested (and benchmarked) as plain Python.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass
from typing import Any

from distillery.spec import Spec, render_template
from teachers.base import TRANSIENT_ERRORS, ItemError, NodeInput, TeacherNode, node_class
from teachers.records import Request


@dataclass
class NodeResult:
    """One node's result for one input: an output, or the reason it failed."""

    output: dict[str, Any] | None
    error: str | None
    seconds: float


class TeacherGraph:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.order = spec.topological_order()
        self.nodes: dict[str, TeacherNode] = {
            name: node_class(cfg.type)(name, cfg) for name, cfg in spec.teachers.items()
        }
        self._loaded = False
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """Hash of the teacher configs and each model's identity (weights hash or hub id)."""
        if self._fingerprint is None:
            ident = {
                name: {"config": cfg.model_dump(mode="json"), "identity": cfg.identity()}
                for name, cfg in self.spec.teachers.items()
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
        cfg = self.spec.teachers[name]
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
            NodeResult(None, f"{node.name}: {o}", per) if isinstance(o, ItemError) else NodeResult(o, None, per)
            for o in outs
        ]


def _describe(node: str, item: NodeInput) -> str:
    last = traceback.format_exc().strip().splitlines()[-1]
    return f"{node}: failed on input {item.input_id}: {last}"
