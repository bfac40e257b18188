"""Pretrained vision backbones by name: a timm or torchvision network as the student's encoder.

``StudentConfig.vision_backbone`` names one (``timm/mobilenetv3_small_100``,
``torchvision/mobilenet_v3_small``); ``vision_weights`` is a local file or folder with its weights
(never a download: the network is always built with ``pretrained=False``). ``BackboneEncoder``
takes the backbone's stride-4/8/16 features (the nearest strides it has), projects them to the
widths the heads read (``vision_widths[1:]``) and fuses them top-down as the built-in encoder does,
so every head works unchanged.

    images (B, 3, S, S) in [0, 1] -> normalized (the backbone's mean / std)
        -> backbone -> c4, c8, c16 (its own channels)
        -> 1x1 conv + BN + SiLU each -> (w1, w2, w3) -> p8 += up(lat16(p16)), p4 += up(lat8(p8))
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.students.model.heads import conv_bn_act

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STRIDES = (4, 8, 16)
SOURCES = ("timm", "torchvision")


def split_name(name: str) -> tuple[str, str]:
    """'timm/mobilenetv3_small_100' -> ('timm', 'mobilenetv3_small_100'); ValueError otherwise."""
    source, _, arch = name.partition("/")
    if source not in SOURCES or not arch:
        raise ValueError(f"vision_backbone {name!r}: expected 'timm/<model name>' or 'torchvision/<model name>'")
    return source, arch


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` file, a ``.bin`` / ``.pth`` / ``.pt`` file (loaded
    with ``torch.load(weights_only=True)``: no pickle runs), or a folder holding
    ``model.safetensors`` or ``pytorch_model.bin`` (a hub folder). A checkpoint that wraps the state
    dict under ``state_dict`` or ``model`` is unwrapped."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"vision_weights {path}: a folder without model.safetensors or pytorch_model.bin")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"vision_weights {path}: no such file (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # (an unpickling error names the refused class)
        raise ValueError(f"vision_weights {path}: not a plain tensor checkpoint ({e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"vision_weights {path}: expected a state dict, got {type(state).__name__}")
    return state


def _load_into(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Every tensor the network has must be in ``state`` with its shape (extra ones are fine:
    a classifier the features do not use)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = (f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "") + \
                 (f" {len(wrong)} of another shape (e.g. {wrong[:3]})" if wrong else "")
        raise ValueError(f"vision_weights {where}: do not fit the backbone: {detail.strip()}")
    model.load_state_dict({k: state[k] for k in own})


def _nearest(reductions: list[int]) -> list[int]:
    """For strides 4, 8, 16: the index of the deepest feature at that stride, or of the nearest
    finer one (a backbone without a stride-4 level gives its stride-2 one)."""
    picks = []
    for s in STRIDES:
        fit = [i for i, r in enumerate(reductions) if r <= s]
        if not fit:
            raise ValueError(f"backbone has no features at stride {s} or finer (strides {reductions})")
        best = max(reductions[i] for i in fit)
        picks.append(max(i for i in fit if reductions[i] == best))
    return picks


class TimmFeatures(nn.Module):
    """A timm model (its own module names, so a timm checkpoint loads as it is) cut after the
    last feature it gives: ``forward_intermediates`` at the chosen indices."""

    def __init__(self, arch: str, weights: str | None):
        super().__init__()
        import timm

        self.net = timm.create_model(arch, pretrained=False)
        if weights is not None:
            _load_into(self.net, read_weights(weights), str(weights))
        info = self.net.feature_info
        self.indices = _nearest([int(f["reduction"]) for f in info])
        self.channels = [int(info[i]["num_chs"]) for i in self.indices]
        self.mean, self.std = self.net.pretrained_cfg.get("mean", IMAGENET[0]), self.net.pretrained_cfg.get("std", IMAGENET[1])
        self.net.prune_intermediate_layers(self.indices, prune_head=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.net.forward_intermediates(x, indices=self.indices, intermediates_only=True)


class TorchvisionFeatures(nn.Module):
    """A torchvision model with a ``features`` Sequential (MobileNet, EfficientNet, ...): the
    outputs of its last layer at each stride, the layers after the stride-16 one dropped."""

    def __init__(self, arch: str, weights: str | None):
        super().__init__()
        import torchvision

        net = torchvision.models.get_model(arch, weights=None)
        if not isinstance(getattr(net, "features", None), nn.Sequential):
            raise ValueError(f"vision_backbone torchvision/{arch}: no 'features' Sequential (MobileNet, "
                             "EfficientNet, ... have one); use a timm model instead")
        if weights is not None:
            _load_into(net, read_weights(weights), str(weights))
        with torch.no_grad():  # each layer's stride and channels, from one small probe
            x, reductions, channels = torch.zeros(1, 3, 64, 64), [], []
            net.features.eval()
            for layer in net.features:
                x = layer(x)
                reductions.append(64 // x.shape[-1])
                channels.append(int(x.shape[1]))
        self.indices = _nearest(reductions)
        self.channels = [channels[i] for i in self.indices]
        self.features = net.features[: self.indices[-1] + 1]  # (module names kept: features.0, ...)
        self.mean, self.std = IMAGENET

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.indices:
                outs.append(x)
        return outs


class BackboneEncoder(nn.Module):
    """A named backbone in place of the built-in ``VisionEncoder``: the same maps out (``p8``,
    ``p16``, with ``need_p4`` also ``p4``) with the channels the heads expect."""

    def __init__(self, name: str, widths: tuple[int, int, int, int], need_p4: bool, weights: str | None = None,
                 freeze: bool = False, act: str = "silu"):
        super().__init__()
        source, arch = split_name(name)
        self.body = TimmFeatures(arch, weights) if source == "timm" else TorchvisionFeatures(arch, weights)
        _, w1, w2, w3 = widths
        c4, c8, c16 = self.body.channels
        self.register_buffer("mean", torch.tensor(self.body.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.body.std).view(1, 3, 1, 1), persistent=False)
        self.proj4 = conv_bn_act(c4, w1, 1, act=act) if need_p4 else None
        self.proj8, self.proj16 = conv_bn_act(c8, w2, 1, act=act), conv_bn_act(c16, w3, 1, act=act)
        self.lat16 = nn.Conv2d(w3, w2, 1)
        self.lat8 = nn.Conv2d(w2, w1, 1) if need_p4 else None
        self.frozen = freeze
        if freeze:
            self.body.requires_grad_(False)

    def train(self, mode: bool = True) -> "BackboneEncoder":
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its BatchNorm statistics too
            self.body.eval()
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        S = images.shape[-1]
        c4, c8, c16 = (_fit(c, S // s) for c, s in zip(self.body((images - self.mean) / self.std), STRIDES))
        p16 = self.proj16(c16)  # (B, w3, S/16, S/16)
        p8 = self.proj8(c8)
        p8 = p8 + F.interpolate(self.lat16(p16), size=p8.shape[-2:], mode="nearest")  # (B, w2, S/8, S/8)
        maps = {"p8": p8, "p16": p16}
        if self.proj4 is not None:
            p4 = self.proj4(c4)
            maps["p4"] = p4 + F.interpolate(self.lat8(p8), size=p4.shape[-2:], mode="nearest")
        return maps


def _fit(x: Tensor, size: int) -> Tensor:
    """A feature map at the grid the heads read (a backbone with another stride there is resized)."""
    return x if x.shape[-1] == size and x.shape[-2] == size else F.interpolate(x, size=(size, size), mode="bilinear",
                                                                               align_corners=False)
