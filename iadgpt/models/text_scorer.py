"""Zero-shot text-prompt scorer, IAD-GPT Eq. 1 (WinCLIP-style), as one exportable module.

Per tapped layer l: p = normalize(project(F_l)); logits = logit_scale * p @ T^T with T the 2
rows (normal, abnormal) of `prompts.text_embeddings`; reshape to the patch grid; bilinear
upsample to the image size; softmax over the 2 channels; keep the abnormal one. The maps are
averaged over layers, Gaussian-smoothed (sigma 4), and the image score is the map's maximum.

The text embeddings are a graph INPUT, not a constant: a station changes prompts by recomputing
a (2, D) array, never by re-exporting the graph.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ScorerError
from .postprocess import GaussianBlur, upsample_map

log = logging.getLogger(__name__)

_NO_TEXT = ("backbone {name!r} has no text tower, so it cannot score against text prompts; "
            "use a CLIP backbone (e.g. clip-vit-h14) or the few-shot memory-bank scorer")


class TextPromptScorer(nn.Module):
    """Backbone features + (2, D) text embeddings -> (anomaly map (B, H, W) in [0, 1], score (B,)).

    `projection` is one module shared by all layers (the zero-shot CLIP post-LN + projection, from
    `CLIPBackbone.projection_module()`) or one module per layer (trained Linear_l, as in the paper).
    """

    def __init__(self, backbone_description: dict,
                 projection: Union[nn.Module, Sequence[nn.Module], None],
                 image_size: Optional[int] = None, logit_scale: float = 100.0, sigma: float = 4.0):
        super().__init__()
        desc = backbone_description
        if not desc.get("has_text", False):
            raise ScorerError(_NO_TEXT.format(name=desc.get("name", "?")))
        if projection is None:
            raise ScorerError("TextPromptScorer needs the backbone's projection: pass "
                              "backbone.projection_module() (or build with TextPromptScorer.from_backbone)")
        self.dims = tuple(int(d) for d in desc.get("dims", ()))
        self.strides = tuple(int(s) for s in desc.get("strides", ()))
        if not self.dims:
            raise ScorerError("backbone description has no 'dims'; pass backbone.describe()")
        if isinstance(projection, nn.Module) and not isinstance(projection, nn.ModuleList):
            self.shared = True
            self.projection = projection
        else:
            projs = list(projection)
            if len(projs) != len(self.dims):
                raise ScorerError(f"got {len(projs)} projections for {len(self.dims)} tapped layers; "
                                  "give one per layer or a single shared one")
            self.shared = False
            self.projection = nn.ModuleList(projs)
        size = image_size if image_size is not None else desc.get("input_spec", {}).get("size")
        if not size:
            raise ScorerError("image_size unknown: pass image_size or a description with input_spec.size")
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.logit_scale = float(logit_scale)
        self.blur = GaussianBlur(sigma)
        self.joint_dim = desc.get("joint_dim")

    @classmethod
    def from_backbone(cls, backbone: nn.Module, logit_scale: float = 100.0, sigma: float = 4.0) -> "TextPromptScorer":
        """The zero-shot scorer for a CLIP backbone (shared projection, image size from input_spec)."""
        if not getattr(backbone, "has_text", False) or not hasattr(backbone, "projection_module"):
            raise ScorerError(_NO_TEXT.format(name=getattr(backbone, "name", "?")))
        return cls(backbone.describe(), backbone.projection_module(), backbone.input_spec.size,
                   logit_scale=logit_scale, sigma=sigma)

    def _project(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        proj = self.projection if self.shared else self.projection[i]
        return proj(tokens)

    def layer_maps(self, features: Sequence[torch.Tensor], text_embeddings: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer abnormal probability maps (B, H, W), before averaging and smoothing."""
        if len(features) != len(self.dims):
            raise ScorerError(f"got {len(features)} feature maps, the backbone taps {len(self.dims)} layers")
        if text_embeddings.dim() != 2 or text_embeddings.shape[0] != 2:
            raise ScorerError(f"text embeddings must be (2, D) [normal, abnormal], got {tuple(text_embeddings.shape)}")
        text = F.normalize(text_embeddings, dim=-1)
        maps = []
        for i, feat in enumerate(features):
            tokens = feat.flatten(2).transpose(1, 2)  # (B, h*w, C)
            p = F.normalize(self._project(i, tokens), dim=-1)
            logits = self.logit_scale * torch.matmul(p, text.t())  # (B, h*w, 2)
            grid = logits.transpose(1, 2).unflatten(2, (int(feat.shape[-2]), int(feat.shape[-1])))
            probs = torch.softmax(upsample_map(grid, self.image_size), dim=1)
            maps.append(probs[:, 1])
        return maps

    def forward(self, features: Sequence[torch.Tensor], text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.layer_maps(features, text_embeddings)
        anomaly_map = self.blur(torch.stack(maps, dim=0).mean(dim=0))
        score = anomaly_map.flatten(1).amax(dim=1)
        return anomaly_map, score
