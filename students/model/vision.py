"""The student's vision side: the built-in conv encoder, or a named pretrained backbone.

    images (B, 3, S, S) -> p4 (segmentation only), p8, p16: feature maps at strides 4, 8, 16 with
    vision_widths[1], [2], [3] channels, which is what every head reads.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distillery.students.model.config import StudentConfig
from distillery.students.model.heads import conv_bn_act
from distillery.students.model.heads.base import ACTIVATIONS


class ResBlock(nn.Module):
    def __init__(self, c: int, act: str = "silu"):
        super().__init__()
        self.body = nn.Sequential(conv_bn_act(c, c, act=act), conv_bn_act(c, c, act=act))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class VisionEncoder(nn.Module):
    """Stem (stride 2) and three stages (strides 4, 8, 16); p8 and p4 get the coarser level added
    (FPN-style, Lin et al. 2017). ``need_p4``: only segmentation heads read stride 4. ``stem``
    'patchify': one 4x4 stride-4 convolution to stride 4 in place of the stride-2 stem and the
    stride-2 convolution after it (``StudentConfig.vision_stem``)."""

    def __init__(self, widths: tuple[int, int, int, int], need_p4: bool, act: str = "silu", stem: str = "conv"):
        super().__init__()
        w0, w1, w2, w3 = widths
        if stem == "patchify":
            self.stem = nn.Sequential(nn.Conv2d(3, w1, 4, 4, bias=False), nn.BatchNorm2d(w1), ACTIVATIONS[act](inplace=True))
            self.s4 = nn.Sequential(ResBlock(w1, act))
        elif stem == "conv":
            self.stem = conv_bn_act(3, w0, 3, 2, act)
            self.s4 = nn.Sequential(conv_bn_act(w0, w1, 3, 2, act), ResBlock(w1, act))
        else:
            raise ValueError(f"vision stem {stem!r}: expected 'conv' or 'patchify'")
        self.s8 = nn.Sequential(conv_bn_act(w1, w2, 3, 2, act), ResBlock(w2, act))
        self.s16 = nn.Sequential(conv_bn_act(w2, w3, 3, 2, act), ResBlock(w3, act))
        self.lat16 = nn.Conv2d(w3, w2, 1)
        self.lat8 = nn.Conv2d(w2, w1, 1) if need_p4 else None

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        c4 = self.s4(self.stem(images))  # (B, w1, S/4, S/4)
        c8 = self.s8(c4)  # (B, w2, S/8, S/8)
        p16 = self.s16(c8)  # (B, w3, S/16, S/16)
        p8 = c8 + F.interpolate(self.lat16(p16), scale_factor=2.0, mode="nearest")
        maps = {"p8": p8, "p16": p16}
        if self.lat8 is not None:
            maps["p4"] = c4 + F.interpolate(self.lat8(p8), scale_factor=2.0, mode="nearest")
        return maps


def build_vision(cfg: StudentConfig, need_p4: bool, load_weights: bool = True) -> nn.Module:
    """The built-in encoder, or ``cfg.vision_backbone`` with ``cfg.vision_weights`` (read only when
    ``load_weights``: a saved student's own weights replace them anyway)."""
    if cfg.vision_backbone is None:
        return VisionEncoder(cfg.vision_widths, need_p4, cfg.vision_act, cfg.vision_stem)
    from distillery.students.model.backbones import BackboneEncoder

    weights = cfg.vision_weights if load_weights else None
    return BackboneEncoder(cfg.vision_backbone, cfg.vision_widths, need_p4, weights, cfg.freeze_vision_backbone,
                           cfg.vision_act)
