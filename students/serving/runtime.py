"""The student without torch: a student folder's ONNX graphs on ONNX Runtime, JSON out.

What ``distillery predict``, the served MLflow model and a user's own app run, on a laptop, a
server, a Raspberry Pi (ONNX Runtime's aarch64 wheels) or, from the ORT-format graphs, a phone.
It needs onnxruntime, numpy, Pillow, tokenizers and pycocotools (the masks' RLE); never torch,
transformers, Prefect or MLflow (``tests/test_runtime.py`` runs it where importing
those fails)::

    from distillery.students.serving.runtime import StudentRuntime

    student = StudentRuntime.load("pulled/student")           # reads two JSON files, nothing else
    student.answer("scene.png", "How many hazards are there?")
    -> {"detector": {"boxes": [[x1, y1, x2, y2], ...], "labels": [...], "scores": [...],
                     "masks": [COCO RLE, ...], ...},
        "retriever": {"ids": [...], "scores": [...]}, "reasoner": {"answer": "2"}, "answer": "2"}

The same JSON as the torch backend (``predictor.StudentPredictor``): both decode the heads'
outputs with ``students.model.arrays``. Loading is lazy: the graphs and the tokenizer are opened
by the first request, the greedy-step graph only when an answer needs a second token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from distillery.images import read_image
from distillery.students.model.arrays import (detection_counts, detection_thresholds, detections, documents,
                                             image_array, peaks)
from distillery.students.serving.graphs import (GRAPH_SETS, ONNX_DIR, RUNTIME_NODE_TYPES, graph_files,  # noqa: F401
                                                read_meta)
from distillery.text import parse_output

TEXT_NODE_TYPES = ("llm", "openai")  # generative: their answer is decoded from the [answer] task


def _detection_counts(raw: dict[str, Any], grid: int, conf: float, **kw) -> dict[str, np.ndarray]:
    """``detection_counts``, leaving each image's peaks in ``raw["peaks"]`` for its detections."""
    raw["peaks"] = [peaks(c, grid, conf) for c in np.asarray(raw["cls"], np.float32)]
    return detection_counts(raw, grid, conf, found=raw["peaks"], **kw)


# How the runtime computes a text graph input that a conv head's outputs give (the export's
# ``meta["prefix"]``: node -> kind and arguments), on numpy beside the graphs. Each may leave what
# it found in the node's raw outputs for the post-processing (the detector's peaks).
PREFIX_KINDS = {"detection_counts": _detection_counts}


def text_feed(meta: dict[str, Any], vis: list[np.ndarray], question_ids: np.ndarray,
              question_mask: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The text graph's inputs from the vision graph's outputs ``vis`` and the question (the
    conv heads' prefix inputs computed on numpy, ``PREFIX_KINDS``), and the conv heads' raw
    outputs by node."""
    raw: dict[str, dict[str, Any]] = {}
    for (node, key), value in zip(meta["vision_outputs"], vis):
        raw.setdefault(node, {})[key] = value
    feed = {"p16": vis[-1], "question_ids": question_ids, "question_mask": question_mask}
    for node, spec in meta.get("prefix", {}).items():
        args = {k: v for k, v in spec.items() if k != "kind"}
        if spec.get("kind") not in PREFIX_KINDS:
            raise ValueError(f"ONNX graphs: node {node!r}'s text inputs are of kind {spec.get('kind')!r}, which this "
                             f"runtime does not compute (it knows {', '.join(PREFIX_KINDS)})")
        feed |= {f"{node}.{k}": v for k, v in PREFIX_KINDS[spec["kind"]](raw[node], **args).items()}
    return feed, raw


def kv_names(n_layers: int) -> list[str]:
    return [f"{kind}{i}" for i in range(n_layers) for kind in ("k", "v")]


def greedy_decode(logits: np.ndarray, step, pos: np.ndarray, eos_ids: list[int], limit: int,
                  done: np.ndarray | None = None) -> list[list[int]]:
    """Greedy decoding from the first token's logits (B, V); ``step(tokens (B,), positions (B,))``
    returns the next logits (the caller keeps the cache). A row stops at an eos id (cut from it),
    every row at ``limit`` tokens; ``done`` (B,) marks rows that need no more tokens. (The torch
    student's loop is ``students.model.decoding.greedy_decode``, the same rule on tensors.)"""
    eos = np.asarray(list(eos_ids))
    done = np.zeros(logits.shape[0], bool) if done is None else done.copy()
    tokens = []
    for t in range(limit):
        nxt = logits.argmax(-1)  # (B,)
        tokens.append(nxt)
        done |= np.isin(nxt, eos)
        if t == limit - 1 or bool(done.all()):
            break
        logits = step(nxt, pos + t)
    rows = []
    for row in np.stack(tokens, 1).tolist():
        cut = next((j for j, tok in enumerate(row) if tok in eos_ids), len(row))
        rows.append(row[:cut])
    return rows


class GraphRunner:
    """The export's vision, text and step graphs on ONNX Runtime (CPU): a numpy batch (images,
    question_ids, question_mask) in, every head's raw outputs out, as numpy arrays.

    ``run(batch, on_conv)`` uses the second core at batch 1: the text graph runs on a worker
    thread (ONNX Runtime releases the GIL) while ``on_conv`` (the detection post-processing: peaks,
    NMS, masks, RLE) works on the vision graph's outputs in the calling thread."""

    def __init__(self, files: dict[str, Path], meta: dict[str, Any], eos_ids: list[int], max_answer_tokens: int,
                 threads: int | None = None, vision_threads: int | None = None):
        import onnxruntime as ort

        self.meta, self.eos_ids, self.max_answer_tokens = meta, list(eos_ids), int(max_answer_tokens)
        self._ort, self._files, self._threads = ort, files, threads
        # Threads: the convolutions gain from a second core (the vision graph runs alone: 1.53 vs
        # 1.78 ms at batch 1); the text graph's small operators do not (waking a thread for each
        # costs more than it brings), and it shares the cores with ``on_conv``.
        self.vision = self._session(files["vision"], vision_threads or threads or min(2, os.cpu_count() or 1))
        self.text = self._session(files["text"], threads or 1)
        self._text_inputs = {i.name for i in self.text.get_inputs()}  # the exporter drops inputs never read
        self._step = None
        self.keys = [tuple(k) for k in meta["outputs"]]
        self.kv = kv_names(int(meta["n_layers"]))
        self._pool = None

    def _session(self, path: Path, threads: int):
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        # Idle ONNX Runtime threads spin-wait by default and take the cores from the PIL and numpy
        # work between runs (decoding, post-processing): 26 ms instead of 10 a request.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return self._ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    @property
    def step_session(self):
        """The greedy-step graph, opened when an answer first needs a second token."""
        if self._step is None:
            self._step = self._session(self._files["step"], self._threads or 1)
        return self._step

    @step_session.setter
    def step_session(self, session) -> None:
        self._step = session

    def _text_pool(self):
        """The text graph's worker thread, made on first use (and again in a forked child, which
        inherits the pool but not its thread)."""
        if self._pool is None or self._pool[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            self._pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="onnx-text"))
        return self._pool[1]

    def run(self, batch: dict[str, np.ndarray], on_conv=None, max_new_tokens: int | None = None) -> tuple[dict, Any]:
        """(raw outputs of every head, ``on_conv(conv_raw)``'s result or None); generative heads'
        outputs carry ``answer_ids`` (one token-id list per input, eos cut)."""
        vis = self.vision.run(None, {"images": batch["images"]})
        feed, raw = text_feed(self.meta, vis, batch["question_ids"], batch["question_mask"])
        feed = {k: v for k, v in feed.items() if k in self._text_inputs}
        done = None
        if on_conv is None:
            out = self.text.run(None, feed)
        else:
            pending = self._text_pool().submit(self.text.run, None, feed)
            try:
                done = on_conv(raw)  # (only the conv heads' outputs so far)
            finally:
                out = pending.result()
        for (node, key), value in zip(self.keys, out):
            raw.setdefault(node, {})[key] = value
        n_q, at = out[len(self.keys)], len(self.keys) + 1
        per_answer = 4 + len(self.kv)  # first, logits, cache seg and valid, keys and values
        for ans in self.meta["answers"]:
            first, logits, *cache = out[at:at + per_answer]
            at += per_answer
            raw[ans["node"]]["answer_ids"] = self._greedy(first, logits, n_q, cache, ans, max_new_tokens)
        return raw, done

    def _greedy(self, first: np.ndarray, logits: np.ndarray, n_q: np.ndarray, cache: list[np.ndarray], ans: dict,
                max_new_tokens: int | None) -> list[list[int]]:
        """The text graph chose the first token and ran the step after it; go on from there."""
        seg = np.full((first.shape[0], 1), ans["index"], dtype=np.int64)
        state = list(cache)

        def step(tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
            feed = {"tokens": tokens.astype(np.int64), "pos": pos.astype(np.int64), "seg": seg, "past_seg": state[0],
                    "past_valid": state[1], **{f"past_{n}": t for n, t in zip(self.kv, state[2:])}}
            out, *state[:] = self.step_session.run(None, feed)
            return out

        limit = min(max_new_tokens or self.max_answer_tokens, self.max_answer_tokens)
        firsts = first.tolist()
        ended = np.isin(first, np.asarray(self.eos_ids))
        rest = greedy_decode(logits, step, n_q + ans["length"] + 1, self.eos_ids, limit - 1,
                             done=ended) if limit > 1 else [[] for _ in firsts]
        return [[] if f in self.eos_ids else [f] + r for f, r in zip(firsts, rest)]


class StudentRuntime:
    """A student folder (trained or pulled; a phone bundle of graphs, tokenizer and JSON too)
    answering image + question requests on ONNX Runtime, without torch. ``graphs``: ``auto``
    (int8 first), ``int8``, ``float`` or ``ort`` (the int8 graphs in ORT format)."""

    def __init__(self, folder: str | Path, graphs: str = "auto", threads: int | None = None):
        folder = Path(folder)
        self.folder = folder / "student" if (folder / "student" / "config.json").is_file() else folder
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"student folder {self.folder}: no config.json (not a student folder)")
        if not (self.folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"student folder {self.folder}: no tokenizer.json (a fast tokenizer's file)")
        config = json.loads((self.folder / "config.json").read_text())
        self.cfg, self.schema = config["student"], config["schema"]
        self.meta = read_meta(self.folder)
        if self.meta is None:
            raise ValueError(f"{self.folder}: no current ONNX graphs in {ONNX_DIR}/ (export them: "
                             "distillery.students.serving.onnx.export_onnx, or run the torch backend)")
        unknown = sorted({n["type"] for n in self.schema["nodes"].values()} - set(RUNTIME_NODE_TYPES))
        if unknown:
            raise ValueError(f"{self.folder}: node type(s) {', '.join(unknown)} have no torch-free decoding "
                             f"(the runtime knows {', '.join(RUNTIME_NODE_TYPES)}); use the torch backend")
        self.files = graph_files(self.folder, self.meta, graphs)
        self.threads = threads
        self._runner: GraphRunner | None = None
        self._tokenizer = None
        self._thresholds = {name: detection_thresholds(self.cfg, node) for name, node in self.schema["nodes"].items()
                            if node["type"] == "yolo"}

    @classmethod
    def load(cls, folder: str | Path, graphs: str = "auto", threads: int | None = None) -> "StudentRuntime":
        return cls(folder, graphs, threads)

    @property
    def graphs(self) -> str:
        """Which graph set runs: ``ort``, ``int8`` or ``float``."""
        name = self.files["vision"].name
        return "ort" if name.endswith(".ort") else "int8" if "int8" in name else "float"

    @property
    def runner(self) -> GraphRunner:
        if self._runner is None:
            self._runner = GraphRunner(self.files, self.meta, self.schema["text"]["eos_ids"],
                                       self.cfg["max_answer_tokens"], threads=self.threads)
        return self._runner

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            tok.no_truncation()
            tok.no_padding()
            self._tokenizer = tok
        return self._tokenizer

    # -- requests -> a batch --------------------------------------------------------------------------
    def prepare(self, requests: list[dict]) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
        """Requests (``{"image": path | bytes | base64 | PIL image, "question": str}``; a missing
        question is the spec's default) -> the graphs' inputs and each image's (height, width).
        ValueError names the request and the reason."""
        images, questions, sizes = [], [], []
        for i, req in enumerate(requests):
            where = f"request {i}"
            if not isinstance(req, dict) or "image" not in req:
                raise ValueError(f"{where}: expected {{'image': ..., 'question': ...}}, got {type(req).__name__}")
            question = req.get("question") or self.schema.get("default_question")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: 'question' must be a non-empty string (and the spec has no "
                                 "default_question)")
            img = read_image(req["image"], where)
            sizes.append((img.height, img.width))
            images.append(image_array(img, self.cfg["image_size"], self.cfg.get("downscale", "bilinear")))
            ids = self.tokenizer.encode(question, add_special_tokens=False).ids[: self.cfg["max_question_tokens"]]
            questions.append(ids)
        L = max([len(q) for q in questions] + [1])
        q_ids = np.zeros((len(questions), L), np.int64)
        for i, q in enumerate(questions):
            q_ids[i, : len(q)] = q
        mask = np.arange(L)[None] < np.asarray([len(q) for q in questions])[:, None]
        return {"images": np.stack(images), "question_ids": q_ids, "question_mask": mask}, sizes

    # -- answering ------------------------------------------------------------------------------------
    def predict(self, requests: list[dict], max_new_tokens: int | None = None) -> list[dict[str, Any]]:
        """One JSON-serializable dict per request: {node: teacher-shaped output, "answer": str}."""
        if not requests:
            return []
        batch, sizes = self.prepare(requests)
        nodes = self.schema["nodes"]
        conv_nodes = [name for name, n in nodes.items() if n["type"] == "yolo"]

        def post_conv(raw: dict) -> dict[str, list]:  # the detections, while the text graph runs
            return {name: [self._detections(name, raw[name], i, size) for i, size in enumerate(sizes)]
                    for name in conv_nodes}

        raw, conv = self.runner.run(batch, on_conv=post_conv, max_new_tokens=max_new_tokens)
        results = []
        for i in range(len(requests)):
            res: dict[str, Any] = {}
            for name, node in nodes.items():
                if name in conv:
                    res[name] = conv[name][i]
                elif node["type"] == "rag":
                    res[name] = documents(raw[name]["logits"][i], node)
                else:  # llm, openai
                    res[name] = {"answer": self.decode_answer(raw[name]["answer_ids"][i], node)}
            answers = [res[name]["answer"] for name, n in nodes.items() if n["type"] in TEXT_NODE_TYPES]
            if answers:
                res["answer"] = answers[-1]  # the last llm node in the graph: the final answer
            results.append(res)
        return results

    def answer(self, image: Any, question: str | None = None) -> dict[str, Any]:
        """One request: ``image`` a path, bytes, base64 text or PIL image."""
        return self.predict([{"image": image, "question": question}])[0]

    def _detections(self, name: str, raw: dict[str, np.ndarray], i: int, size: tuple[int, int]) -> dict[str, Any]:
        one = {k: v[i] for k, v in raw.items()}
        return detections(one, self.schema["nodes"][name], self.cfg["image_size"] // 8, self._thresholds[name], size,
                          found=one.pop("peaks", None))

    def decode_answer(self, ids: list[int], node: dict) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return parse_output(text, node.get("think_start", "<think>"), node.get("think_end", "</think>"),
                            node.get("stop", []))[1]
