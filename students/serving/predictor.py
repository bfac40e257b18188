"""Run a saved student: image + question in, every teacher node's output (teacher-shaped) out.

    predictor = StudentPredictor.load("out/student")
    predictor.predict([{"image": "scene.png", "question": "How many hazards are there?"}])
    -> [{"detector": {"boxes": [[x1, y1, x2, y2], ...], "classes": [...], "scores": [...],
                      "labels": [...], "masks": [COCO RLE, ...], ...},
         "retriever": {"ids": [...], "scores": [...]},
         "reasoner": {"answer": "2"},
         "answer": "2"}]

Images may be a path, bytes, or a base64 string (a ``data:`` URL too). One forward pass per batch
gives every head's output; the answer is decoded greedily from the [answer] task (no reasoning
trace), stopped at eos, a stop string or the length limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distillery import runtime
from distillery.students.data import batch_to, prepare_requests

from distillery.students.model.student import MultimodalStudent
from distillery.text import parse_output


BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
class StudentPredictor:
    def __init__(self, model: MultimodalStudent, tokenizer, device: str | torch.device = "cpu", runner=None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.runner = runner  # an OnnxStudent, or None: the torch model runs
        self.backend = "torch" if runner is None else "onnx-int8" if runner.int8 else "onnx"

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> "StudentPredictor":
        """A saved student, its BatchNorms folded into the convs (inference only).

        ``backend``: ``torch``; ``onnx`` (ONNX Runtime on the CPU, ``students/onnx.py``: the graphs
        in ``model_dir/onnx``, exported now if missing or stale); ``onnx-int8`` (its int8
        graphs, written by training); ``auto`` (default): on the CPU with onnxruntime installed,
        the int8 graphs where the folder holds current ones, else the float ones, else torch."""
        from distillery.students.serving import onnx

        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        model = MultimodalStudent.from_pretrained(model_dir, map_location=device).fuse_for_inference()
        on_cpu = torch.device(device).type == "cpu"
        meta = onnx.read_meta(model_dir) if on_cpu and onnx.available() else None  # current graphs, or None
        if backend.startswith("onnx"):
            if not on_cpu:
                raise ValueError(f"backend {backend!r} runs on the CPU, not on {device}")
            if not onnx.available():
                raise ValueError(f"backend {backend!r} needs onnxruntime (pip install onnxruntime)")
            if meta is None:
                onnx.export_onnx(model_dir)
                meta = onnx.read_meta(model_dir)
            if backend == "onnx-int8" and not onnx.has_int8(model_dir, meta):
                raise ValueError(f"{model_dir}: no int8 graphs (training writes them; "
                                 "students.onnx.export_onnx(dir, calibration=...) by hand)")
        elif backend == "auto":
            backend = "torch" if meta is None else "onnx-int8" if onnx.has_int8(model_dir, meta) else "onnx"
        runner = None if backend == "torch" else onnx.OnnxStudent(
            Path(model_dir) / onnx.ONNX_DIR, model.cfg, model.schema.text["eos_ids"], int8=backend == "onnx-int8",
            meta=meta)
        return cls(model, model.tokenizer, device, runner)

    @classmethod
    def from_model(cls, model: MultimodalStudent) -> "StudentPredictor":
        """Wrap a model in memory (e.g. during training); it stays on its device."""
        return cls(model, model.text_tokenizer(), next(model.parameters()).device)

    def prepare(self, requests: list[dict]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        """Requests -> a model batch (no targets) on the predictor's device, and each image's
        original (height, width)."""
        return prepare_requests(requests, self.model.cfg, self.model.schema, self.tokenizer, self.device)

    @torch.inference_mode()
    def predict(self, requests: list[dict]) -> list[dict[str, Any]]:
        """One JSON-serializable dict per request: {node: teacher-shaped output, "answer": str}."""
        if not requests:
            return []
        # On ONNX Runtime, torch only glues (input tensors, peaks, NMS, masks): one thread does that
        # faster than two (15 vs 39 ms a request at batch 1 with the other core busy).
        with runtime.torch_threads(1 if self.runner is not None else None):
            return self._predict(requests)

    def _predict(self, requests: list[dict]) -> list[dict[str, Any]]:
        was_training = self.model.training
        if was_training:  # (toggling walks every module: 2 ms an image at batch 1, so only when needed)
            self.model.eval()
        heads = self.model.heads
        try:
            batch, sizes = self.prepare(requests)

            def post_conv(raw: dict) -> dict[str, list]:  # the heads that read only the image
                return {name: [heads[name].postprocess(raw[name], i, size) for i, size in enumerate(sizes)]
                        for name in raw}

            if self.runner is not None:  # the detections are post-processed while the text graph runs
                raw, conv = self.runner.run(batch, on_conv=post_conv)
            else:
                raw = batch_to(self.model.predict_raw(batch), "cpu")
                conv = post_conv({n: raw[n] for n, h in heads.items() if not h.reads_text})
        finally:
            if was_training:
                self.model.train()
        for name, head in heads.items():
            if head.generative:
                raw[name]["answer"] = [self.decode_answer(ids, head.node) for ids in raw[name]["answer_ids"]]
        results = []
        for i, size in enumerate(sizes):
            res = {name: conv[name][i] if name in conv else head.postprocess(raw[name], i, size)
                   for name, head in heads.items()}
            answers = [res[name]["answer"] for name, h in heads.items() if h.generative]
            if answers:
                res["answer"] = answers[-1]  # the last llm node in the graph: the final answer
            results.append(res)
        return results

    def decode_answer(self, ids: list[int], node: dict) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return parse_output(text, node.get("think_start", "<think>"), node.get("think_end", "</think>"),
                            node.get("stop", []))[1]
