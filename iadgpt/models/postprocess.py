"""Map post-processing shared by the scorers: upsampling to image size and Gaussian smoothing.

Both are plain nn ops (Resize, Pad reflect, Conv) so they export inside the scorer graphs with
torch.onnx.export(opset_version=17, dynamo=False) and run on any ONNX Runtime provider.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn
from torch.nn import functional as F

Size = Union[int, tuple[int, int]]


def upsample_map(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, h, w) or (B, C, h, w) maps to `size`."""
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if x.dim() == 3:
        return F.interpolate(x.unsqueeze(1), size=hw, mode="bilinear", align_corners=False).squeeze(1)
    if x.dim() == 4:
        return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
    raise ValueError(f"upsample_map wants (B, h, w) or (B, C, h, w), got shape {tuple(x.shape)}")


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of size 2*ceil(4*sigma)+1 (the anomaly-detection convention)."""
    radius = int(math.ceil(4.0 * sigma))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    return (k / k.sum()).float()


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of (B, H, W) or (B, 1, H, W) maps with reflect padding.

    sigma <= 0 is the identity. Reflect padding keeps border defects from being diluted by zeros;
    it needs the map larger than the radius, otherwise replicate padding is used (decided at trace
    time from the static map size). The kernel is a non-persistent buffer: rebuilt from sigma, never
    stored in state dicts.
    """

    def __init__(self, sigma: float = 4.0):
        super().__init__()
        self.sigma = float(sigma)
        kernel = gaussian_kernel1d(self.sigma) if self.sigma > 0 else torch.ones(1)
        self.radius = (kernel.numel() - 1) // 2
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return x
        squeeze = x.dim() == 3
        y = x.unsqueeze(1) if squeeze else x
        if y.dim() != 4 or y.shape[1] != 1:
            raise ValueError(f"GaussianBlur wants (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
        r = self.radius
        mode = "reflect" if min(int(y.shape[-2]), int(y.shape[-1])) > r else "replicate"
        k = self.kernel.to(dtype=y.dtype)
        y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
        return y.squeeze(1) if squeeze else y
