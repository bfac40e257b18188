"""The student on ONNX Runtime: its CPU path at deployment (laptops, phones, servers without torch).

At batch 1 a student this small is bound by the framework's cost per operation, not by
arithmetic: eager torch spends ~7 ms in the encoder pass that ONNX Runtime runs in ~2.4 ms (its
graph optimizer fuses the convolutions' activations, the layer norms and the attention). The
export is three graphs in ``<student>/onnx/``, split where the work can overlap:

* ``vision.onnx``: images uint8 (B, 3, S, S) -> the conv heads' raw outputs (detection) and the
  stride-16 features.
* ``text.onnx``: (the stride-16 features, question_ids (B, Lq), question_mask (B, Lq), the conv
  heads' outputs) -> the text heads' raw outputs and, per answer, its first greedy token, the
  logits after it and the key/value cache so far. It runs on a second thread while the
  detections are post-processed (``OnnxStudent.run``): 0.74x the time of one graph at batch 1.
* ``step.onnx``: one greedy step: (tokens (B,), positions (B,), segment (B, 1), the cache) ->
  the next token's logits and the extended cache.
* ``vision-int8.onnx``, ``text-int8.onnx``: int8 convolutions and matrix products (``quantize``).

``meta.json`` names the outputs, the answer segments, the layout's ``format`` and the digest of
the weights and config the graphs were exported from: a student whose files changed is never
run from stale graphs. Greedy decoding is ``students.decoding.greedy_decode``, the same loop as the torch student's.

    export_onnx("out/student")                                 # after training (train() does it)
    StudentPredictor.load("out/student", backend="onnx")       # or "auto": ONNX when it is there
"""

from __future__ import annotations

import hashlib
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
from distillery.students.model.decoding import answer_limit, greedy_decode

ONNX_DIR = "onnx"
META_FILE = "meta.json"
VISION, TEXT, STEP = "vision.onnx", "text.onnx", "step.onnx"
VISION_INT8, TEXT_INT8 = "vision-int8.onnx", "text-int8.onnx"
OPSET = 17
FORMAT = 2  # 2: vision / text / step graphs (1, one encoder graph, is treated as stale)


def digest(model_dir: str | Path) -> str:
    """sha256 over the student's weights and config: what the graphs must have been made from."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        with open(Path(model_dir) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def read_meta(model_dir: str | Path) -> dict[str, Any] | None:
    """The export's meta.json when it was made from the folder's present weights and config, in
    this version's layout of graphs."""
    try:
        meta = json.loads((Path(model_dir) / ONNX_DIR / META_FILE).read_text())
        return meta if meta.get("format") == FORMAT and meta.get("digest") == digest(model_dir) else None
    except (OSError, ValueError):
        return None


def has_int8(model_dir: str | Path, meta: dict[str, Any] | None) -> bool:
    """``meta`` (``read_meta``'s) names int8 vision and text graphs and the files are there."""
    return bool(meta and "int8" in meta and all((Path(model_dir) / ONNX_DIR / meta["int8"][k]["file"]).is_file()
                                                for k in ("vision", "text")))


def _kv_names(n_layers: int) -> list[str]:
    return [f"{kind}{i}" for i in range(n_layers) for kind in ("k", "v")]


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
    """The decoder pass and the text heads, from the question and the vision graph's outputs, and
    for each answer its first greedy token and the step after it (one graph run less per answer:
    the short answers of a distilled student are often one token and eos)."""

    def __init__(self, model, conv_keys: list[tuple[str, str]], keys: list[tuple[str, str]], answers: list[dict]):
        super().__init__()
        self.model, self.conv_keys, self.keys, self.answers = model, conv_keys, keys, answers

    def forward(self, p16: Tensor, question_ids: Tensor, question_mask: Tensor, *conv: Tensor):
        from distillery.students.model.heads import Features

        outputs: dict[str, dict[str, Tensor]] = {}
        for (n, k), t in zip(self.conv_keys, conv):
            outputs.setdefault(n, {})[k] = t
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


def _text_io(conv_keys: list[tuple[str, str]], keys: list[tuple[str, str]], n_answers: int,
             kv: list[str]) -> tuple[list[str], list[str], dict]:
    """The text graph's input and output names and dynamic axes (B: batch, Lq: question, L: cache)."""
    inputs = ["p16", "question_ids", "question_mask"] + _names(conv_keys)
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
    conv_keys = [(n, k) for n in conv for k in sorted(conv[n])]
    keys = [(n, k) for n in text for k in sorted(text[n])]
    answers = [{"node": s.name.split("/")[0], "index": i, "length": int(s.embeds.shape[1])}
               for i, s in enumerate(state["segments"], start=1) if model.heads[s.name.split("/")[0]].generative]
    kv = _kv_names(len(model.decoder.blocks))
    vision_out = _names(conv_keys) + ["p16"]
    text_in, text_out, text_axes = _text_io(conv_keys, keys, len(answers), kv)
    step_in, step_out, step_axes = _step_io(kv)
    B = batch["images"].shape[0]
    text_args = (feats.maps["p16"], batch["question_ids"], batch["question_mask"], *[conv[n][k] for n, k in conv_keys])
    step_args = (torch.zeros(B, dtype=torch.long), state["n_q"] + 1, torch.ones(B, 1, dtype=torch.long),
                 state["cache"]["seg"], state["cache"]["valid"], *[t for p in state["cache"]["kv"] for t in p])
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-", dir=model_dir))
    try:
        with warnings.catch_warnings():  # the tracer warns about every int() of a static shape
            warnings.simplefilter("ignore")
            torch.onnx.export(_Vision(model, conv_keys).eval(), (batch["images"],), str(tmp / VISION),
                              input_names=["images"], output_names=vision_out,
                              dynamic_axes={o: {0: "B"} for o in ["images"] + vision_out}, opset_version=OPSET, dynamo=False)
            torch.onnx.export(_Text(model, conv_keys, keys, answers).eval(), text_args, str(tmp / TEXT),
                              input_names=text_in, output_names=text_out, dynamic_axes=text_axes,
                              opset_version=OPSET, dynamo=False)
            torch.onnx.export(_Step(model).eval(), step_args, str(tmp / STEP), input_names=step_in,
                              output_names=step_out, dynamic_axes=step_axes, opset_version=OPSET, dynamo=False)
        meta = {"format": FORMAT, "digest": digest(model_dir), "vision_outputs": [list(k) for k in conv_keys],
                "outputs": [list(k) for k in keys], "answers": answers, "n_layers": len(model.decoder.blocks),
                "opset": OPSET, "torch": torch.__version__}
        if calibration:
            meta["int8"] = quantize(tmp, model, calibration)
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


def quantize(onnx_dir: Path, model, calibration: list[dict]) -> dict[str, Any]:
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
    conv_names = [o.name for o in vision.get_outputs()]  # (the conv heads' outputs, then p16)
    text_feeds = []
    for b in batches:
        out = dict(zip(conv_names, vision.run(None, {"images": b["images"]})))
        text_feeds.append({"question_ids": b["question_ids"], "question_mask": b["question_mask"], **out})

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict]):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    info = {}
    for key, src, dst, feeds, ops, fmt in (
            ("vision", VISION, VISION_INT8, [{"images": b["images"]} for b in batches], ["Conv"], QuantFormat.QOperator),
            ("text", TEXT, TEXT_INT8, text_feeds, ["MatMul"], QuantFormat.QDQ)):
        pre = onnx_dir / f"{key}-pre.onnx"
        quant_pre_process(str(onnx_dir / src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(onnx_dir / dst), Reader(feeds), quant_format=fmt, per_channel=True,
                        op_types_to_quantize=ops, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        pre.unlink()
        info[key] = {"file": dst, "ops": ops, "format": fmt.name}
    return {**info, "weights": "int8 per channel", "activations": "uint8", "calibration_inputs": len(batches)}


class OnnxStudent:
    """``predict_raw`` of a saved student on ONNX Runtime (CPU): the same outputs as
    ``MultimodalStudent.predict_raw``, so the torch heads' ``postprocess`` reads them.

    ``run(batch, on_conv)`` uses the second core at batch 1: the text graph runs on a worker
    thread (ONNX Runtime releases the GIL) while ``on_conv`` (e.g. the detection post-processing:
    NMS, masks, RLE) works on the vision graph's outputs in the calling thread."""

    def __init__(self, onnx_dir: str | Path, cfg, eos_ids: list[int], threads: int | None = None,
                 int8: bool = False, meta: dict[str, Any] | None = None, vision_threads: int | None = None):
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        self.meta = meta or json.loads((onnx_dir / META_FILE).read_text())
        if int8 and "int8" not in self.meta:
            raise ValueError(f"{onnx_dir}: no int8 graphs (exported without calibration inputs)")
        self.int8 = int8
        self.cfg, self.eos_ids = cfg, list(eos_ids)

        def session(f: str, n: int):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = n
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # errors only
            # Idle ONNX Runtime threads spin-wait by default and take the cores from the torch, PIL
            # and numpy work between runs (decoding, post-processing): 26 ms instead of 10 a request.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(str(onnx_dir / f), opts, providers=["CPUExecutionProvider"])

        # Threads: the convolutions gain from a second core (the vision graph runs alone: 1.53 vs
        # 1.78 ms at batch 1); the text graph's small operators do not (waking a thread for each
        # costs more than it brings), and it shares the cores with ``on_conv``.
        graphs = self.meta["int8"] if int8 else {"vision": {"file": VISION}, "text": {"file": TEXT}}
        self.vision = session(graphs["vision"]["file"], vision_threads or threads or min(2, os.cpu_count() or 1))
        self.text = session(graphs["text"]["file"], threads or 1)
        self.step_session = session(STEP, threads or 1)
        self.conv_keys = [tuple(k) for k in self.meta["vision_outputs"]]
        self.keys = [tuple(k) for k in self.meta["outputs"]]
        self.kv = _kv_names(int(self.meta["n_layers"]))
        self._pool = None

    def _text_pool(self):
        """The text graph's worker thread, made on first use (and again in a forked child, which
        inherits the pool but not its thread)."""
        if self._pool is None or self._pool[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            self._pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="onnx-text"))
        return self._pool[1]

    def predict_raw(self, batch: dict[str, Tensor], max_new_tokens: int | None = None) -> dict[str, dict[str, Any]]:
        return self.run(batch, max_new_tokens=max_new_tokens)[0]

    def run(self, batch: dict[str, Tensor], on_conv=None, max_new_tokens: int | None = None) -> tuple[dict, Any]:
        """(raw outputs of every head, ``on_conv(conv_raw)``'s result or None). ``on_conv`` gets
        the conv heads' raw outputs and runs while the text graph does."""
        vis = self.vision.run(None, {"images": batch["images"].cpu().numpy()})
        feed = {"p16": vis[-1], "question_ids": batch["question_ids"].cpu().numpy(),
                "question_mask": batch["question_mask"].cpu().numpy(),
                **{f"{n}.{k}": v for (n, k), v in zip(self.conv_keys, vis)}}
        raw: dict[str, dict[str, Any]] = {}
        for (node, key), value in zip(self.conv_keys, vis):
            raw.setdefault(node, {})[key] = torch.from_numpy(value)
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
            raw.setdefault(node, {})[key] = torch.from_numpy(value)
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

        def step(tokens: Tensor, pos: Tensor) -> Tensor:
            feed = {"tokens": tokens.numpy(), "pos": pos.numpy(), "seg": seg, "past_seg": state[0],
                    "past_valid": state[1], **{f"past_{n}": t for n, t in zip(self.kv, state[2:])}}
            out, *state[:] = self.step_session.run(None, feed)
            return torch.from_numpy(out)

        limit = answer_limit(self.cfg, max_new_tokens)
        firsts = first.tolist()
        ended = torch.isin(torch.from_numpy(first), torch.tensor(self.eos_ids))
        rest = greedy_decode(torch.from_numpy(logits), step, torch.from_numpy(n_q) + ans["length"] + 1,
                             self.eos_ids, limit - 1, done=ended) if limit > 1 else [[] for _ in firsts]
        return [[] if f in self.eos_ids else [f] + r for f, r in zip(firsts, rest)]
