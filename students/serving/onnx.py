"""The student's export to ONNX (needs torch): the graphs its torch-free runtime runs
(``runtime.py``) on laptops, servers, a Raspberry Pi and, in ORT format, phones.

At batch 1 a student this small is bound by the framework's cost per operation, not by
arithmetic: eager torch spends ~7 ms in the encoder pass that ONNX Runtime runs in ~2.4 ms (its
graph optimizer fuses the convolutions' activations, the layer norms and the attention). The
export is three graphs in ``<student>/onnx/``, split where the work can overlap:

* ``vision.onnx``: images uint8 (B, 3, S, S) -> the conv heads' raw outputs (detection) and the
  stride-16 features.
* ``text.onnx``: (the stride-16 features, question_ids (B, Lq), question_mask (B, Lq), the conv
  heads' outputs) -> the text heads' raw outputs and, per answer, its first greedy token, the
  logits after it and the key/value cache so far. It runs on a second thread while the
  detections are post-processed (``runtime.GraphRunner.run``): 0.74x the time of one graph at batch 1.
* ``step.onnx``: one greedy step: (tokens (B,), positions (B,), segment (B, 1), the cache) ->
  the next token's logits and the extended cache.
* ``vision-int8.onnx``, ``text-int8.onnx``: int8 convolutions and matrix products (``quantize``),
  and ``ort/``: these and the step graph in ONNX Runtime's ORT format (``graphs.write_ort``).

``meta.json`` names the outputs, the answer segments, the layout's ``format`` and the digest of
the weights and config the graphs were exported from: a student whose files changed is never
run from stale graphs (``graphs.py`` reads it, without torch).

    export_onnx("out/student")                                 # after training (train() does it)
    StudentRuntime.load("out/student")                         # torch-free (runtime.py)
    StudentPredictor.load("out/student", backend="onnx")       # the torch predictor on the graphs
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distillery.students.model.config import StudentConfig
from distillery.students.serving.graphs import (FORMAT, META_FILE, ONNX_DIR, STEP, TEXT, TEXT_INT8,  # noqa: F401
                                                VISION, VISION_INT8, digest, graph_files, has_int8, read_meta,
                                                write_ort)
from distillery.students.serving.runtime import GraphRunner, kv_names, text_feed

OPSET = 17
# The text graph's int8 operators: the matrix products, and the two big tables: the token
# embedding (Gather) and the retriever's document matrix (Gemm, whose float logits are kept: a
# uint8 score over 100,000 documents would tie). At a 152k vocabulary and 100k documents these
# tables are 3/4 of the text graph in float (128 of 151 MB, measured on benchmarks/scale.py's student).
TEXT_INT8_OPS = ["MatMul", "Gather", "Gemm"]
# The vision graph's: the convolutions, with ReLU folded into them (a student with
# ``vision_act: relu``; SiLU stays in float between a dequantize and a quantize: 2x the vision
# graph's cost at 640 px, batch 16, measured), and the residual and FPN additions, upsamplings and
# concatenations, so no dequantize / quantize pair sits between two convolutions. Measured against
# int8 convolutions alone: the demo's trained student on 200 test requests gives the torch
# student's answer on 0.985 (vs 0.97), its labels on 0.985 (the same), boxes within 0.0161 (vs
# 0.0167); benchmarks/scale.py's student at batch 16 takes 27.2 CPU-ms a request (vs 31.8).
VISION_INT8_OPS = ["Conv", "Relu", "Add", "Resize", "Concat"]


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Vision(nn.Module):
    """The conv pyramid and the heads that read it alone (detection): images -> their raw outputs
    and the stride-16 features the text graph reads, as a flat tuple (ONNX has no dicts)."""

    def __init__(self, model, keys: list[tuple[str, str]]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, images: Tensor):
        outputs, feats = self.model.encode_vision({"images": images})
        return (*[outputs[n][k] for n, k in self.keys], feats.maps["p16"])


class _Text(nn.Module):
    """The decoder pass and the text heads, from the question, the stride-16 features and the
    conv heads' prefix inputs (``Head.prefix_inputs``: the detector's counts, which the runtime
    computes on numpy from the vision graph's outputs), and for each answer its first greedy
    token and the step after it (one graph run less per answer: the short answers of a
    distilled student are often one token and eos)."""

    def __init__(self, model, prefix_keys: list[tuple[str, str]], keys: list[tuple[str, str]], answers: list[dict]):
        super().__init__()
        self.model, self.prefix_keys, self.keys, self.answers = model, prefix_keys, keys, answers

    def forward(self, p16: Tensor, question_ids: Tensor, question_mask: Tensor, *prefix: Tensor):
        from distillery.students.model.heads import Features

        outputs: dict[str, dict[str, Tensor]] = {n: {} for n, h in self.model.heads.items() if not h.reads_text}
        for (n, k), t in zip(self.prefix_keys, prefix):
            outputs[n][k] = t
        feats = Features({"p16": p16}, lm_head=self.model.decoder.lm_head)
        state = self.model.encode_text({"question_ids": question_ids, "question_mask": question_mask}, outputs, feats)
        outputs = {n: h(feats) for n, h in self.model.heads.items() if h.reads_text}
        extra = []
        for a in self.answers:
            first = outputs[a["node"]]["answer_logits"][:, -1].argmax(-1)  # (B,)
            seg = torch.full_like(first[:, None], a["index"])
            logits, cache = self.model.decoder.step(first, state["n_q"] + a["length"], seg, state["cache"])
            extra += [first, logits, cache["seg"], cache["valid"], *[t for kv in cache["kv"] for t in kv]]
        return (*[outputs[n][k] for n, k in self.keys], state["n_q"], *extra)


class _Step(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.decoder, self.n_layers = model.decoder, len(model.decoder.blocks)

    def forward(self, tokens: Tensor, pos: Tensor, seg: Tensor, past_seg: Tensor, past_valid: Tensor, *kv: Tensor):
        past = {"kv": [(kv[2 * i], kv[2 * i + 1]) for i in range(self.n_layers)], "seg": past_seg,
                "valid": past_valid}
        logits, cache = self.decoder.step(tokens, pos, seg, past)
        return (logits, cache["seg"], cache["valid"], *[t for p in cache["kv"] for t in p])


def _example_batch(model, B: int = 2, Lq: int = 3) -> dict[str, Tensor]:
    """A batch to trace with: B > 1 and Lq > 1, so that neither axis is fixed to 1."""
    S = model.cfg.image_size
    ids = torch.ones(B, Lq, dtype=torch.long)
    return {"images": torch.full((B, 3, S, S), 128, dtype=torch.uint8), "question_ids": ids,
            "question_mask": torch.ones(B, Lq, dtype=torch.bool)}


def _names(keys: list[tuple[str, str]]) -> list[str]:
    return [f"{n}.{k}" for n, k in keys]


def _text_io(prefix_keys: list[tuple[str, str]], keys: list[tuple[str, str]], n_answers: int,
             kv: list[str]) -> tuple[list[str], list[str], dict]:
    """The text graph's input and output names and dynamic axes (B: batch, Lq: question, L: cache)."""
    inputs = ["p16", "question_ids", "question_mask"] + _names(prefix_keys)
    names = _names(keys) + ["n_q"]
    axes: dict[str, dict[int, str]] = {"question_ids": {0: "B", 1: "Lq"}, "question_mask": {0: "B", 1: "Lq"}}
    for j in range(n_answers):
        cache = [f"answer{j}.cache_{o}" for o in ("seg", "valid")]
        kv_out = [f"answer{j}.{n}" for n in kv]
        names += [f"answer{j}.first", f"answer{j}.logits"] + cache + kv_out
        axes |= {o: {0: "B", 1: "L"} for o in cache} | {o: {0: "B", 2: "L"} for o in kv_out}
    return inputs, names, {o: {0: "B"} for o in inputs + names} | axes


def _step_io(kv: list[str]) -> tuple[list[str], list[str], dict]:
    """The step graph's input and output names and dynamic axes (P: the cache before, P1: after)."""
    inputs = ["tokens", "pos", "seg", "past_seg", "past_valid"] + [f"past_{n}" for n in kv]
    outputs = ["logits", "present_seg", "present_valid"] + [f"present_{n}" for n in kv]
    axes = {"tokens": {0: "B"}, "pos": {0: "B"}, "seg": {0: "B"}, "logits": {0: "B"},
            "past_seg": {0: "B", 1: "P"}, "past_valid": {0: "B", 1: "P"},
            "present_seg": {0: "B", 1: "P1"}, "present_valid": {0: "B", 1: "P1"}}
    axes |= {f"past_{n}": {0: "B", 2: "P"} for n in kv} | {f"present_{n}": {0: "B", 2: "P1"} for n in kv}
    return inputs, outputs, axes


def export_onnx(model_dir: str | Path, calibration: list[dict] | None = None) -> Path:
    """Export the saved student in ``model_dir`` to ``model_dir/onnx`` (written to a temporary
    folder beside it and moved into place: a crash leaves the old graphs or none). With
    ``calibration`` (requests ``{"image", "question"}``, e.g. a few dozen training inputs) also
    ``vision-int8.onnx`` and ``text-int8.onnx``: see ``quantize``."""
    from distillery.students.model.student import MultimodalStudent

    model_dir = Path(model_dir)
    cfg = StudentConfig.model_validate(json.loads((model_dir / "config.json").read_text())["student"])
    if cfg.detection_summary == "text":
        raise ValueError(f"{model_dir}: detection_summary 'text' builds its prefix in Python (the tokenizer); "
                         "ONNX export needs 'slots' or 'none'")
    model = MultimodalStudent.from_pretrained(model_dir, map_location="cpu").fuse_for_inference()
    batch = _example_batch(model)
    with torch.no_grad():  # (not inference_mode: these tensors are traced below)
        conv, feats = model.encode_vision(batch)
        state = model.encode_text(batch, conv, feats)
        text = {n: h(feats) for n, h in model.heads.items() if h.reads_text}
        given = {n: model.heads[n].prefix_inputs(conv[n], None) for n in conv}
    conv_keys = [(n, k) for n in conv for k in sorted(conv[n])]
    prefix_keys = [(n, k) for n in conv for k in model.heads[n].prefix_input_keys()]
    prefix = {n: model.heads[n].prefix_numpy() for n in conv if model.heads[n].prefix_input_keys()}
    keys = [(n, k) for n in text for k in sorted(text[n])]
    answers = [{"node": s.name.split("/")[0], "index": i, "length": int(s.embeds.shape[1])}
               for i, s in enumerate(state["segments"], start=1) if model.heads[s.name.split("/")[0]].generative]
    kv = kv_names(len(model.decoder.blocks))
    vision_out = _names(conv_keys) + ["p16"]
    text_in, text_out, text_axes = _text_io(prefix_keys, keys, len(answers), kv)
    step_in, step_out, step_axes = _step_io(kv)
    B = batch["images"].shape[0]
    text_args = (feats.maps["p16"], batch["question_ids"], batch["question_mask"], *[given[n][k] for n, k in prefix_keys])
    step_args = (torch.zeros(B, dtype=torch.long), state["n_q"] + 1, torch.ones(B, 1, dtype=torch.long),
                 state["cache"]["seg"], state["cache"]["valid"], *[t for p in state["cache"]["kv"] for t in p])
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-", dir=model_dir))
    try:
        with warnings.catch_warnings():  # the tracer warns about every int() of a static shape
            warnings.simplefilter("ignore")
            torch.onnx.export(_Vision(model, conv_keys).eval(), (batch["images"],), str(tmp / VISION),
                              input_names=["images"], output_names=vision_out,
                              dynamic_axes={o: {0: "B"} for o in ["images"] + vision_out}, opset_version=OPSET, dynamo=False)
            torch.onnx.export(_Text(model, prefix_keys, keys, answers).eval(), text_args, str(tmp / TEXT),
                              input_names=text_in, output_names=text_out, dynamic_axes=text_axes,
                              opset_version=OPSET, dynamo=False)
            torch.onnx.export(_Step(model).eval(), step_args, str(tmp / STEP), input_names=step_in,
                              output_names=step_out, dynamic_axes=step_axes, opset_version=OPSET, dynamo=False)
        meta = {"format": FORMAT, "digest": digest(model_dir), "vision_outputs": [list(k) for k in conv_keys],
                "text_inputs": [list(k) for k in prefix_keys], "prefix": prefix,
                "outputs": [list(k) for k in keys], "answers": answers, "n_layers": len(model.decoder.blocks),
                "opset": OPSET, "torch": torch.__version__}
        if calibration:
            meta["int8"] = quantize(tmp, model, calibration, meta)
            meta["ort"] = write_ort(tmp, meta)  # the int8 graphs for ONNX Runtime Mobile
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        dst = model_dir / ONNX_DIR
        old = model_dir / f".{ONNX_DIR}-old"
        shutil.rmtree(old, ignore_errors=True)
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def quantize(onnx_dir: Path, model, calibration: list[dict], meta: dict[str, Any]) -> dict[str, Any]:
    """The int8 graphs (ONNX Runtime static quantization: per-channel int8 weights, uint8
    activations whose ranges are calibrated on ``calibration``, bad inputs skipped):

    * ``vision-int8.onnx``: int8 convolutions, QOperator format (QLinearConv).
    * ``text-int8.onnx``: int8 matrix products, QDQ format (ONNX Runtime fuses each
      dequantize-matmul-quantize group; QOperator's explicit quantize / dequantize pairs around
      these small products cost what int8 saves: 0.91x vs 0.96x the float text graph, measured).

    What int8 costs in agreement is measured, not assumed (``benchmarks/student.py``)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from distillery.students.data import prepare_requests

    def prepare(requests: list[dict]):
        return prepare_requests(requests, model.cfg, model.schema, model.tokenizer)

    batches = []
    for i, req in enumerate(calibration):
        try:
            batch, _ = prepare([req])
        except ValueError as e:  # a bad calibration input is skipped, not fatal
            warnings.warn(f"calibration input {i} skipped: {e}", stacklevel=2)
            continue
        batches.append({k: batch[k].numpy() for k in ("images", "question_ids", "question_mask")})
    if not batches:
        raise ValueError("quantize: no usable calibration input")
    vision = ort.InferenceSession(str(onnx_dir / VISION), providers=["CPUExecutionProvider"])
    text_names = {i.name for i in ort.InferenceSession(str(onnx_dir / TEXT), providers=["CPUExecutionProvider"])
                  .get_inputs()}
    text_feeds = []
    for b in batches:  # the text graph's inputs as the runtime makes them
        feed, _ = text_feed(meta, vision.run(None, {"images": b["images"]}), b["question_ids"], b["question_mask"])
        text_feeds.append({k: v for k, v in feed.items() if k in text_names})

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict]):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    info = {}
    for key, src, dst, feeds, ops, fmt in (
            ("vision", VISION, VISION_INT8, [{"images": b["images"]} for b in batches], VISION_INT8_OPS,
             QuantFormat.QOperator),
            ("text", TEXT, TEXT_INT8, text_feeds, TEXT_INT8_OPS, QuantFormat.QDQ)):
        pre = onnx_dir / f"{key}-pre.onnx"
        quant_pre_process(str(onnx_dir / src), str(pre), skip_symbolic_shape=True)
        pixels = pixel_tensor(pre) if key == "vision" else None  # x / 255 at scale 1/255: see uint8_input
        overrides = {pixels: [{"scale": np.array(1 / 255, np.float32), "zero_point": np.array(0, np.uint8)}]} if pixels else {}
        quantize_static(str(pre), str(onnx_dir / dst), Reader(feeds), quant_format=fmt, per_channel=True,
                        op_types_to_quantize=ops, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"],
                                       "TensorQuantOverrides": overrides})
        pre.unlink()
        info[key] = {"file": dst, "ops": ops, "format": fmt.name}
        if key == "vision" and uint8_input(onnx_dir / dst):
            info[key]["uint8_input"] = True
    return {**info, "weights": "int8 per channel", "activations": "uint8", "calibration_inputs": len(batches)}


def _pixels_in(model) -> tuple | None:
    """The graph's ``Cast(images) -> Div(255)`` (the float graph's x / 255), as (cast, div, the
    nodes reading each tensor, the initializers); None where it does not start that way (e.g. a
    backbone that normalizes by mean and std first)."""
    from onnx import numpy_helper

    g = model.graph
    users: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    inits = {i.name: i for i in g.initializer}

    def only(name: str, op: str):
        nodes = users.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    cast = only("images", "Cast")
    div = cast and only(cast.output[0], "Div")
    if div is None or div.input[0] != cast.output[0] or div.input[1] not in inits \
            or numpy_helper.to_array(inits[div.input[1]]).size != 1 \
            or float(numpy_helper.to_array(inits[div.input[1]])) != 255.0:
        return None
    return cast, div, users, inits


def pixel_tensor(path: Path) -> str | None:
    """The name of the float graph's x / 255 tensor (quantized at scale 1/255, zero point 0 for
    ``uint8_input``), or None."""
    import onnx

    found = _pixels_in(onnx.load(str(path)))
    return found[1].output[0] if found else None


def uint8_input(path: Path) -> bool:
    """Feed the image bytes straight into the first int8 convolution: the quantizer's
    ``Cast(images) -> Div(255) -> QuantizeLinear`` becomes nothing, quantizing at scale 1/255 and
    zero point 0 (``pixel_tensor``'s override) being the identity on uint8 pixels. At 640 px a
    sixth of the vision graph's time went to that cast, divide and quantize. False (the graph
    untouched) where the graph does not start that way or the quantization is another."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    found = _pixels_in(model)
    if found is None:
        return False
    cast, div, users, inits = found
    quant = users.get(div.output[0], [])
    quant = quant[0] if len(quant) == 1 and quant[0].op_type == "QuantizeLinear" else None
    if quant is None or len(quant.input) < 3 or not {quant.input[1], quant.input[2]} <= set(inits) \
            or numpy_helper.to_array(inits[quant.input[1]]).tolist() != np.float32(1 / 255).tolist() \
            or numpy_helper.to_array(inits[quant.input[2]]).tolist() != 0 \
            or numpy_helper.to_array(inits[quant.input[2]]).dtype != np.uint8:
        return False
    for node in users.get(quant.output[0], []):
        node.input[:] = ["images" if i == quant.output[0] else i for i in node.input]
    g = model.graph
    for node in (cast, div, quant):
        g.node.remove(node)
    if not any(div.input[1] in n.input for n in g.node):
        g.initializer.remove(inits[div.input[1]])
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return True


class OnnxStudent(GraphRunner):
    """``predict_raw`` of a saved student on ONNX Runtime (CPU) for the torch predictor: the
    runtime's ``GraphRunner`` (the same sessions, overlap and greedy loop) with torch tensors in
    and out, so the torch heads' ``postprocess`` reads them as they read the torch student's."""

    def __init__(self, onnx_dir: str | Path, cfg, eos_ids: list[int], threads: int | None = None,
                 int8: bool = False, meta: dict[str, Any] | None = None, vision_threads: int | None = None):
        onnx_dir = Path(onnx_dir)
        meta = meta or json.loads((onnx_dir / META_FILE).read_text())
        if int8 and "int8" not in meta:
            raise ValueError(f"{onnx_dir}: no int8 graphs (exported without calibration inputs)")
        self.int8, self.cfg = int8, cfg
        super().__init__(graph_files(onnx_dir.parent, meta, "int8" if int8 else "float"), meta, eos_ids,
                         cfg.max_answer_tokens, threads=threads, vision_threads=vision_threads)

    def predict_raw(self, batch: dict[str, Tensor], max_new_tokens: int | None = None) -> dict[str, dict[str, Any]]:
        return self.run(batch, max_new_tokens=max_new_tokens)[0]

    def run(self, batch: dict[str, Tensor], on_conv=None, max_new_tokens: int | None = None) -> tuple[dict, Any]:
        """(raw outputs of every head as tensors, ``on_conv(conv_raw)``'s result or None)."""
        arrays = {k: batch[k].cpu().numpy() for k in ("images", "question_ids", "question_mask")}
        wrap = None if on_conv is None else (lambda raw: on_conv(_tensors(raw)))
        raw, done = super().run(arrays, on_conv=wrap, max_new_tokens=max_new_tokens)
        return _tensors(raw), done


def _tensors(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Raw outputs with their arrays as tensors (sharing memory); token-id lists as they are."""
    return {n: {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in d.items()}
            for n, d in raw.items()}
