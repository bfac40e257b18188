"""Where the int8 vision encoder's time goes at 640 px, and what depthwise-separable blocks or a
patchify stem change.

    python -m benchmarks.vision_encoder [--size 640] [--batch 16] [--widths 16 24 48 96] [--preset tiny]

Builds the student's built-in encoder (``VisionEncoder``, ReLU, the scale student's widths: random
weights, timing only) and the same encoder with each residual block made depthwise-separable
(MobileNet's 3x3 depthwise + 1x1 pointwise, twice) and with a patchify stem (one 4x4 stride-4
convolution to stride 4, ConvNeXt's, in place of the two stride-2 ones), exports each to ONNX, quantizes it as the
product does (QOperator int8 convolutions, per-channel weights, the image bytes straight into the
first convolution: ``students.serving.onnx.uint8_input``), and times each on ONNX Runtime
with one thread: milliseconds a request at ``--batch``, the share of each operator type, and the
five most expensive nodes (ONNX Runtime's profiler). Not a product feature: the figures behind the
README's "what was tried" for the realistic-scale cost goal (#20).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def encoders(widths: tuple[int, ...]):
    import torch
    from torch import nn

    from distillery.students.model import vision
    from distillery.students.model.heads import conv_bn_act

    class DepthwiseBlock(nn.Module):
        def __init__(self, c: int, act: str = "relu"):
            super().__init__()
            dw = lambda: nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            self.body = nn.Sequential(dw(), conv_bn_act(c, c, 1, 1, act), dw(), conv_bn_act(c, c, 1, 1, act))

        def forward(self, x):
            return x + self.body(x)

    class Pixels(nn.Module):  # the three pyramid levels out
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x):  # uint8 pixels, as the student's exported vision graph takes them
            out = self.enc(x.float() / 255)
            return out["p4"], out["p8"], out["p16"]

    torch.manual_seed(0)
    today = vision.VisionEncoder(widths, True, "relu")
    dw = vision.VisionEncoder(widths, True, "relu")
    for stage in (dw.s4, dw.s8, dw.s16):
        stage[1] = DepthwiseBlock(stage[1].body[0][0].in_channels)
    # A patchify stem (ConvNeXt's; space-to-depth followed by a 1x1 convolution is a special case):
    # one 4x4 stride-4 convolution straight to stride 4, in place of the stride-2 stem over the
    # 3 colour channels at full size and the stride-2 convolution after it.
    patch = vision.VisionEncoder(widths, True, "relu", stem="patchify")  # student.vision_stem: patchify
    return {"today": Pixels(today).eval(), "depthwise": Pixels(dw).eval(), "patchify": Pixels(patch).eval()}


def int8_graph(model, x, folder: Path, name: str) -> Path:
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from distillery.students.serving.onnx import pixel_tensor, uint8_input

    src, pre, dst = (folder / f"{name}{s}.onnx" for s in ("", "-pre", "-int8"))
    torch.onnx.export(model, (x[:2],), str(src), input_names=["images"], dynamic_axes={"images": {0: "b"}},
                      opset_version=17, dynamo=False)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # folds the batch norms

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"images": x[i:i + 2].numpy()} for i in range(0, 4, 2)])

        def get_next(self):
            return next(self.it, None)

    pixels = {"scale": np.array(1 / 255, np.float32), "zero_point": np.array(0, np.uint8)}
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    op_types_to_quantize=["Conv", "Relu"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, extra_options={"TensorQuantOverrides": {pixel_tensor(pre): [pixels]}})
    if not uint8_input(dst):  # the bytes straight into the first convolution, as the product's graph
        raise RuntimeError(f"{dst}: the graph does not start with x / 255 quantized at 1/255")
    return dst


def session(path: Path, profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def timed(paths: dict[str, Path], x: np.ndarray, rounds: int) -> dict[str, float]:
    """Milliseconds a request per graph: the median of ``rounds`` alternating runs of each."""
    sessions = {name: session(path) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for s in sessions.values():
        s.run(None, {"images": x})
    for r in range(rounds):
        for name in (list(sessions) if r % 2 == 0 else list(reversed(sessions))):
            t0 = time.perf_counter()
            sessions[name].run(None, {"images": x})
            times[name].append((time.perf_counter() - t0) / len(x) * 1e3)
    return {name: round(statistics.median(v), 2) for name, v in times.items()}


def profile(path: Path, x: np.ndarray) -> dict:
    """Each operator type's share of one profiled run, and the five costliest nodes."""
    s = session(path, str(path.with_suffix("")))
    s.run(None, {"images": x})
    s.run(None, {"images": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    by_op, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[f"{e['args']['op_name']} {e['name'][:-12]}"] += e["dur"]
    total = sum(by_op.values())
    return {"op_share": {op: round(d / total, 3) for op, d in by_op.most_common(8)},
            "top_nodes_ms": {k: round(d / 2 / len(x) / 1e3, 2) for k, d in by_node.most_common(5)}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--widths", type=int, nargs=4, default=[16, 24, 48, 96])
    ap.add_argument("--rounds", type=int, default=7, help="alternating timed runs of each graph (median)")
    ap.add_argument("--preset", choices=["tiny", "full"], default="full", help="tiny: 64 px, batch 4 (a plumbing check)")
    args = ap.parse_args(argv)
    if args.preset == "tiny":
        args.size, args.batch = 64, 4
    import torch

    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    out: dict = {"size": args.size, "batch": args.batch, "widths": args.widths, "threads": 1}
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        models = encoders(tuple(args.widths))
        paths = {name: int8_graph(model, x, Path(tmp), name) for name, model in models.items()}
        ms = timed(paths, x.numpy(), args.rounds)
        for name, model in models.items():
            params = sum(p.numel() for p in model.parameters())
            out[name] = {"params": params, "ms_per_request": ms[name], **profile(paths[name], x.numpy())}
            print(f"{name:>10}: {ms[name]} ms a request (int8, 1 thread, median of {args.rounds}), {params:,} params; "
                  f"by operator {out[name]['op_share']}")
            print(f"{'':>10}  costliest nodes (ms a request): {out[name]['top_nodes_ms']}")
    for name in ("depthwise", "patchify"):
        out[f"{name}_over_today"] = round(out[name]["ms_per_request"] / out["today"]["ms_per_request"], 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
