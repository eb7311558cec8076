"""Trained heads on top of the frozen backbone.

`VisualGuidedDecoder` is IAD-GPT's decoder (Eq. 1, trained self-supervised on NSA anomalies):
per tapped layer l, a projection of the patch features is compared by cosine similarity with two
reference embeddings, [normal, abnormal]:

    p_l      = normalize(Proj_l(F_l))                         (B, D, h_l, w_l)
    logits_l = logit_scale * p_l . normalize(T)^T             (B, 2, h_l, w_l)
    M_l      = softmax(upsample(logits_l, image size))[abnormal]
    M        = GaussianBlur_sigma(mean_l M_l),  score = max(M)

T is the mean normal / abnormal prompt embedding of the text tower for CLIP backbones (fixed, as in
the paper) and a learnable pair of prototypes for backbones without a text tower (EfficientNet).

Choices the paper leaves open, documented here:
- Proj_l is a 1x1 convolution (= a Linear on every patch token) after a fixed per-channel
  standardisation of F_l by statistics of normal training features (the standardisation is an
  affine map a Linear could absorb, but it makes Adam's job scale-free across layers) and an
  optional 3x3 mean pool (`pool`, PatchCore's "locally aware" features: the same fixed op the
  memory-bank scorer uses). `hidden > 0` makes Proj_l a two-layer MLP; the default is linear.
- D (`embed_dim`) = 64 for learnable prototypes (nothing to match); the text embedding's width
  for CLIP.
- logit_scale is fixed (100 in the paper, as CLIP's).
- `layers`: which tapped layers the decoder reads (default all; `train.DEFAULT_LAYERS` drops
  EfficientNet-Lite0's 24-channel stride-4 tap, measured to be near useless for it). Unread layers
  are still inputs of the exported graph, since the station feeds every encoder output.
- `log_odds_map` exposes the pre-softmax evidence, which fuses better with a memory-bank map
  than the saturated probabilities (models/fusion.py).

The decoder's weights are fixed per trained checkpoint, so they are graph constants: the exported
SCORER graph takes only the feature maps (no reference inputs).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ScorerError
from .postprocess import GaussianBlur, upsample_map

log = logging.getLogger(__name__)

__all__ = ["VisualGuidedDecoder", "feature_stats", "focal_loss", "dice_loss", "decoder_loss"]


# What building a model from a stored config and weights raises when they do not fit together (an
# edited or half-written file): checkpoint and bundle loaders turn it into their error naming the fix.
STORED_STATE_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, OverflowError)


class VisualGuidedDecoder(nn.Module):
    """Feature maps of the tapped layers -> (anomaly map (B, H, W) in [0, 1], score (B,))."""

    def __init__(self, dims: Sequence[int], image_size: int, *, embed_dim: int = 64,
                 references: Optional[torch.Tensor] = None, logit_scale: float = 100.0, sigma: float = 4.0,
                 pool: int = 3, hidden: int = 0, layers: Optional[Sequence[int]] = None):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        if not self.dims:
            raise ScorerError("the decoder needs the channel count of every tapped layer (backbone.dims)")
        self.image_size = int(image_size)
        self.logit_scale = float(logit_scale)
        self.sigma = float(sigma)
        self.pool = int(pool)
        self.hidden = int(hidden)
        self.layers = tuple(range(len(self.dims))) if layers is None else tuple(sorted({int(i) for i in layers}))
        if not self.layers or not all(0 <= i < len(self.dims) for i in self.layers):
            raise ScorerError(f"decoder layers {layers} must be indices of the {len(self.dims)} tapped layers")
        if references is not None:
            ref = torch.as_tensor(references, dtype=torch.float32)
            if ref.dim() != 2 or ref.shape[0] != 2:
                raise ScorerError(f"decoder references must be (2, D) [normal, abnormal], got {tuple(ref.shape)}")
            self.embed_dim = int(ref.shape[1])
            self.learn_references = False
            self.register_buffer("references", ref.clone())
        else:
            self.embed_dim = int(embed_dim)
            self.learn_references = True
            self.references = nn.Parameter(torch.randn(2, self.embed_dim) / self.embed_dim ** 0.5)
        for i, c in enumerate(self.dims):
            self.register_buffer(f"feat_mean{i}", torch.zeros(c))
            self.register_buffer(f"feat_std{i}", torch.ones(c))
        # One projection per tapped layer; layers left out of `layers` keep an unused (tiny) one so that
        # parameter names stay indexed by tapped layer.
        self.projections = nn.ModuleList(self._projection(c) if i in self.layers else nn.Identity()
                                         for i, c in enumerate(self.dims))
        self.blur = GaussianBlur(self.sigma)

    def _projection(self, c: int) -> nn.Module:
        if self.hidden > 0:
            return nn.Sequential(nn.Conv2d(c, self.hidden, 1), nn.GELU(), nn.Conv2d(self.hidden, self.embed_dim, 1))
        return nn.Conv2d(c, self.embed_dim, 1)

    @classmethod
    def for_backbone(cls, backbone: nn.Module, references: Optional[torch.Tensor] = None, **kwargs) -> "VisualGuidedDecoder":
        """Decoder sized for `backbone`; CLIP backbones pass their prompt embeddings as `references`."""
        size = backbone.input_spec.size
        return cls(backbone.dims, int(size[0]), references=references, **kwargs)

    def config(self) -> dict:
        """Constructor keyword arguments (without reference values), for checkpoints."""
        return {"dims": list(self.dims), "image_size": self.image_size, "embed_dim": self.embed_dim,
                "logit_scale": self.logit_scale, "sigma": self.sigma, "pool": self.pool, "hidden": self.hidden,
                "layers": list(self.layers), "learn_references": self.learn_references}

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor]) -> "VisualGuidedDecoder":
        """The decoder `config()` and `state_dict()` describe, in eval mode (checkpoints, bundles)."""
        _check_config(config)
        odd = sorted(k for k, v in state.items() if not v.is_floating_point())
        if odd:  # load_state_dict would cast them silently (bool weights become 0/1)
            raise ValueError(f"decoder weights {', '.join(odd[:3])} are not floating point")
        kwargs = dict(config)
        learn = kwargs.pop("learn_references", True)
        decoder = cls(kwargs.pop("dims"), kwargs.pop("image_size"),
                      references=None if learn else state["references"], **kwargs)
        decoder.load_state_dict(state)
        return decoder.eval()

    @torch.no_grad()
    def set_feature_stats(self, features: Optional[Sequence[torch.Tensor]] = None, *,
                          mean: Optional[Sequence[torch.Tensor]] = None,
                          std: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Per-channel mean/std of NORMAL training features after `local_pool`: computed from
        `features` (one (N, C, h, w) tensor per layer, not yet pooled) or given as `mean`/`std`."""
        if features is not None:
            mean, std = feature_stats([self.local_pool(f.float()) for f in features])
        if mean is None or std is None or len(mean) != len(self.dims) or len(std) != len(self.dims):
            raise ScorerError(f"feature statistics must cover the decoder's {len(self.dims)} layers")
        for i in range(len(self.dims)):
            getattr(self, f"feat_mean{i}").copy_(mean[i])
            getattr(self, f"feat_std{i}").copy_(std[i])

    def local_pool(self, f: torch.Tensor) -> torch.Tensor:
        """The fixed 3x3 neighbourhood mean (identity for pool <= 1)."""
        if self.pool > 1:
            return F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=False)
        return f

    def prepare(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """The fixed part of layer i: neighbourhood mean, then standardisation. Training caches it."""
        f = self.local_pool(f.float())
        mean = getattr(self, f"feat_mean{i}").view(1, -1, 1, 1)
        std = getattr(self, f"feat_std{i}").view(1, -1, 1, 1)
        return (f - mean) / std

    def layer_logits(self, features: Sequence[torch.Tensor], size: Optional[int] = None,
                     prepared: bool = False) -> list[torch.Tensor]:
        """[normal, abnormal] logits (B, 2, size, size) of each layer in `self.layers`, upsampled
        before the softmax (Eq. 1). `features` has one entry per TAPPED layer; unused ones may be None.

        `prepared`: the features already went through `prepare` (the training cache). The cosine
        is computed as (u . t_hat) / |u| with u = Proj(x): the same value as normalize(u) . t_hat,
        but the division touches 2 channels instead of D (training runs 2-3x faster on a CPU)."""
        if len(features) != len(self.dims):
            raise ScorerError(f"got {len(features)} feature maps, the decoder was trained for {len(self.dims)} layers")
        kernel = F.normalize(self.references, dim=-1).view(2, -1, 1, 1)
        out = []
        for i in self.layers:
            f = features[i]
            u = self.projections[i](f.float() if prepared else self.prepare(i, f))
            norm = u.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)  # F.normalize's eps
            logits = (self.logit_scale * F.conv2d(u, kernel)) / norm
            out.append(upsample_map(logits, size or self.image_size))
        return out

    def layer_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Abnormal probabilities (B, H, W) at the image size, one per layer in `self.layers`."""
        return [torch.softmax(lg, dim=1)[:, 1] for lg in self.layer_logits(features)]

    def raw_map(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over layers, before smoothing (B, H, W)."""
        return torch.stack(self.layer_maps(features), dim=0).mean(dim=0)

    def log_odds_map(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over layers of the upsampled abnormal-minus-normal logit (B, H, W), unsmoothed.

        The same evidence as `raw_map` before the softmax squashes it: with logit scale 100 the
        probabilities saturate at 0 and 1, which ranks pixels poorly when the map is combined with
        another one (see models/fusion.py). Computed as one channel: bilinear upsampling is linear,
        so upsample(l_1) - upsample(l_0) = upsample(l_1 - l_0)."""
        if len(features) != len(self.dims):
            raise ScorerError(f"got {len(features)} feature maps, the decoder was trained for {len(self.dims)} layers")
        ref = F.normalize(self.references, dim=-1)
        kernel = (ref[1] - ref[0]).view(1, -1, 1, 1)
        maps = []
        for i in self.layers:
            u = self.projections[i](self.prepare(i, features[i]))
            norm = u.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
            maps.append(upsample_map((self.logit_scale * F.conv2d(u, kernel)) / norm, self.image_size)[:, 0])
        return torch.stack(maps, dim=0).mean(dim=0)

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(feat_0, ..., feat_{L-1}) -> (anomaly_map (B, H, W), score (B,))."""
        amap = self.blur(self.raw_map(features))
        return amap, amap.flatten(1).amax(dim=1)


@torch.no_grad()
def feature_stats(features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-channel (mean, std) of each (N, C, h, w) tensor, accumulated in float64 in chunks."""
    means, stds = [], []
    for f in features:
        n = 0
        s1 = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
        s2 = torch.zeros_like(s1)
        for start in range(0, f.shape[0], 64):
            x = f[start:start + 64].double()
            s1 += x.sum(dim=(0, 2, 3))
            s2 += (x * x).sum(dim=(0, 2, 3))
            n += x.shape[0] * x.shape[2] * x.shape[3]
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-4)
        means.append(mean.float())
        stds.append(std.float())
    return means, stds


# --------------------------------------------------------------------------- losses


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss of 2-channel [normal, abnormal] logits (B, 2, H, W) against a binary target (B, H, W)."""
    logp = F.log_softmax(logits, dim=1)
    logpt = torch.where(target > 0.5, logp[:, 1], logp[:, 0])
    return -(((1.0 - logpt.exp()) ** gamma) * logpt).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss per image, averaged: 1 - (2|P.T| + s) / (|P| + |T| + s). Normal images
    (empty target) are pushed towards an empty prediction."""
    p = prob.flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(dim=1)
    return (1.0 - (2.0 * inter + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)).mean()


def decoder_loss(layer_logits: Sequence[torch.Tensor], target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """IAD-GPT's map loss: focal (gamma 2) + dice on EVERY layer's map, summed over layers."""
    total = layer_logits[0].new_zeros(())
    for logits in layer_logits:
        total = total + focal_loss(logits, target, gamma) + dice_loss(torch.softmax(logits, dim=1)[:, 1], target)
    return total


def _check_config(config: dict) -> None:
    """Refuse stored decoder configs that would build a different model without an error (a NaN blur
    is no blur, a boolean size is 1 px): checkpoints and bundles are files, and files get edited."""
    def whole(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def finite(v: Any, low: float, strict: bool) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if strict else v >= low))

    bad = [] if isinstance(config.get("dims"), list) and config["dims"] and all(whole(d, 1) for d in config["dims"]) \
        else ["dims"]
    bad += [k for k, low in (("image_size", 1), ("embed_dim", 1), ("pool", 0), ("hidden", 0))
            if k in config and not whole(config[k], low)]
    bad += [k for k, strict in (("logit_scale", True), ("sigma", False)) if k in config and not finite(config[k], 0, strict)]
    if "layers" in config and not (isinstance(config["layers"], list) and all(whole(i, 0) for i in config["layers"])):
        bad.append("layers")
    if not isinstance(config.get("learn_references", True), bool):
        bad.append("learn_references")
    if bad:
        raise ValueError(f"decoder config values out of range or of the wrong type: {', '.join(bad)}")
