"""Decoder + memory-bank fusion, and the decoder's SCORER graphs (ONNX, parity-checked).

Two scorer graphs come from a trained decoder checkpoint:

* kind "decoder": ``feat0..featL-1 -> anomaly_map, score``; the decoder's weights are graph
  constants (fixed per checkpoint), so the graph has no reference input.
* kind "decoder+memory_bank": ``feat0.., bank -> anomaly_map, score``: the decoder map and the
  k-shot memory-bank map fused INSIDE the graph (the bank stays an input, as in the bank scorer).

Fusion is a normalised weighted mean, before the one Gaussian smoothing:

    fused = w * (D - mu_D) / s_D + (1 - w) * (B - mu_B) / s_B

D is the decoder's mean layer probability map, B the bank's patch distance map (both upsampled,
unsmoothed). mu and s are the mean and standard deviation of each map's pixels over NORMAL
training images that are not in the bank (a normal pixel then scores ~0 in either map, and one
unit is "one normal standard deviation" in both), measured at export time; w defaults to 0.5.
The alternative, a weight learned on NSA samples, was measured and not kept (see `fit_fusion`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, ScorerError
from .heads import VisualGuidedDecoder
from .postprocess import GaussianBlur, upsample_map
from .scorers import PatchEmbedder

log = logging.getLogger(__name__)

__all__ = ["DecoderScorer", "FusedScorer", "fit_fusion", "export_decoder_scorer", "DECODER_KIND", "FUSED_KIND"]

DECODER_KIND = "decoder"
FUSED_KIND = "decoder+memory_bank"
QUERY_CHUNK = 128  # patches per nearest-neighbour GEMM, as the exported bank scorer


class DecoderScorer(nn.Module):
    """The decoder alone as a scorer: forward(feat0.., featL-1) -> (anomaly_map, score)."""

    def __init__(self, decoder: VisualGuidedDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(*features)


class FusedScorer(nn.Module):
    """forward(feat0.., featL-1, bank) -> (fused anomaly_map (B, H, W), score (B,)).

    The nearest-neighbour search is chunked over the static patch axis and batched over images
    (as the exported bank scorer), so the traced graph is valid for any batch and bank size.
    """

    def __init__(self, decoder: VisualGuidedDecoder, strides: Sequence[int], *, grid_stride: int = 8,
                 sigma: float = 4.0, weight: float = 0.5, stats: Optional[Sequence[float]] = None,
                 query_chunk: int = QUERY_CHUNK):
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ScorerError(f"fusion weight {weight} must be in [0, 1] (1 = decoder only, 0 = bank only)")
        self.decoder = decoder
        self.image_size = decoder.image_size
        self.embedder = PatchEmbedder(strides, self.image_size, grid_stride)
        self.blur = GaussianBlur(sigma)
        self.query_chunk = int(query_chunk)
        # [mu_D, s_D, mu_B, s_B]: graph constants, set by fit_fusion.
        self.register_buffer("stats", torch.tensor(list(stats) if stats is not None else [0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("weight", torch.tensor(float(weight)))

    def bank_distance(self, features: Sequence[torch.Tensor], bank: torch.Tensor) -> torch.Tensor:
        """(B, g, g) Euclidean distance of each patch to its nearest bank row."""
        q = self.embedder.patches(features)  # (B, N, D), N static
        n, d = int(q.shape[1]), int(q.shape[2])
        bank_sq = (bank * bank).sum(dim=1)
        bank_t = bank.t()
        mins = []
        for start in range(0, n, self.query_chunk):
            flat = q[:, start:start + self.query_chunk, :]
            width = int(flat.shape[1])
            flat = flat.reshape(-1, d)
            d2 = torch.addmm(bank_sq.unsqueeze(0), flat, bank_t, alpha=-2.0).min(dim=1).values
            d2 = d2 + (flat * flat).sum(dim=1)
            mins.append(d2.reshape(-1, width))
        g = self.embedder.grid
        return torch.cat(mins, dim=1).clamp_min(0.0).sqrt().reshape(-1, g, g)

    def raw_maps(self, features: Sequence[torch.Tensor], bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder map, bank map), both (B, H, W), upsampled and unsmoothed."""
        return self.decoder.raw_map(features), upsample_map(self.bank_distance(features, bank), self.image_size)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *features, bank = inputs
        if len(features) != len(self.decoder.dims):
            raise ScorerError(f"fused scorer expects {len(self.decoder.dims)} feature maps, got {len(features)}")
        dmap, bmap = self.raw_maps(features, bank)
        s = self.stats
        fused = self.weight * (dmap - s[0]) / s[1] + (1.0 - self.weight) * (bmap - s[2]) / s[3]
        amap = self.blur(fused)
        return amap, amap.flatten(1).amax(dim=1)


@torch.no_grad()
def fit_fusion(fused: FusedScorer, normal_features: Sequence[torch.Tensor], bank: torch.Tensor,
               batch_size: int = 8) -> list[float]:
    """Set mu/s of both maps from NORMAL images held apart from the bank; returns [mu_D, s_D, mu_B, s_B].

    Measured alternatives (bottle, metal_plate, 1-shot): scaling by the 99.9th percentile instead
    of the standard deviation, and a weight w chosen on NSA samples; see the README table.
    """
    n = int(normal_features[0].shape[0])
    if n == 0:
        raise ScorerError("fusion statistics need normal images that are not in the bank; give at least one")
    dsum = dsq = bsum = bsq = 0.0
    count = 0
    for i in range(0, n, batch_size):
        feats = [f[i:i + batch_size].float() for f in normal_features]
        dmap, bmap = fused.raw_maps(feats, bank)
        dmap, bmap = dmap.double(), bmap.double()
        dsum += float(dmap.sum()); dsq += float((dmap * dmap).sum())
        bsum += float(bmap.sum()); bsq += float((bmap * bmap).sum())
        count += dmap.numel()
    mu_d, mu_b = dsum / count, bsum / count
    s_d = max((dsq / count - mu_d ** 2) ** 0.5, 1e-6)
    s_b = max((bsq / count - mu_b ** 2) ** 0.5, 1e-6)
    stats = [mu_d, s_d, mu_b, s_b]
    fused.stats.copy_(torch.tensor(stats, dtype=fused.stats.dtype))
    log.info("fusion statistics on %d normal images: decoder mean %.4g std %.4g, bank mean %.4g std %.4g",
             n, *stats)
    return stats


# --------------------------------------------------------------------------- ONNX


class _FlatDecoder(nn.Module):
    def __init__(self, scorer: nn.Module):
        super().__init__()
        self.scorer = scorer

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer(*features)


def export_decoder_scorer(scorer: Union[DecoderScorer, FusedScorer, VisualGuidedDecoder], path: Union[str, Path],
                          probe_features: Sequence[torch.Tensor], bank: Optional[np.ndarray] = None, *,
                          opset: Optional[int] = None, threads: Optional[int] = None):
    """Export a decoder / fused SCORER graph and check it against torch on ONNX Runtime.

    Inputs ``feat0..`` (+ ``bank`` for the fused scorer), outputs ``anomaly_map`` and ``score``,
    batch (and bank size) dynamic. Probes: the given features (batch B), their first image alone,
    and for the fused graph a bank of half the rows. Tolerance: 1e-4 of the map's range, as the
    other scorer graphs. Returns the `ParityReport`; raises ExportError on a mismatch.
    """
    from ..export import onnx_export as ox

    opset = ox.OPSET if opset is None else int(opset)
    path = Path(path)
    t0 = time.perf_counter()
    if isinstance(scorer, VisualGuidedDecoder):
        scorer = DecoderScorer(scorer)
    fused = isinstance(scorer, FusedScorer)
    if fused and bank is None:
        raise ExportError("the fused decoder+memory_bank scorer needs an example bank to export")
    scorer = scorer.eval()
    feats = [np.ascontiguousarray(f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f, dtype=np.float32)
             for f in probe_features]
    names = ox.feature_names(len(feats))
    inputs = names + (["bank"] if fused else [])
    dynamic = {n: {0: "batch"} for n in names + list(ox.SCORER_OUTPUTS)}
    args = [torch.from_numpy(f) for f in feats]
    ref_bank = None
    if fused:
        ref_bank = np.ascontiguousarray(bank, dtype=np.float32)
        dynamic["bank"] = {0: "bank_size"}
        args.append(torch.from_numpy(ref_bank))
    size, external = ox._trace_to_onnx(_FlatDecoder(scorer), tuple(args), path, inputs, list(ox.SCORER_OUTPUTS),
                                       dynamic, opset, ox.EXTERNAL_DATA_THRESHOLD)

    def feeds(batch: slice, b: Optional[np.ndarray]) -> dict[str, np.ndarray]:
        out = {n: np.ascontiguousarray(f[batch]) for n, f in zip(names, feats)}
        if b is not None:
            out["bank"] = b
        return out

    probes = [(f"batch {len(feats[0])}", feeds(slice(None), ref_bank)), ("batch 1", feeds(slice(0, 1), ref_bank))]
    if fused and len(ref_bank) > 1:
        half = ref_bank[: (len(ref_bank) + 1) // 2]
        probes.append((f"batch 1 with a bank of {len(half)} rows", feeds(slice(0, 1), half)))

    def run_torch(f):
        return scorer(*(torch.from_numpy(f[k]) for k in inputs))

    diffs, refs = ox._compare(path, run_torch, probes, ox.SCORER_OUTPUTS, threads)
    span = max(float(r["anomaly_map"].max() - r["anomaly_map"].min()) for r in refs)
    span = max(span, 1e-6 * max(float(np.abs(r["anomaly_map"]).max()) for r in refs), 1e-12)
    report = ox.ParityReport("scorer", path, diffs, {k: ox.SCORER_RTOL * span for k in ox.SCORER_OUTPUTS},
                             {k: span for k in ox.SCORER_OUTPUTS}, [p[0] for p in probes], size, external,
                             time.perf_counter() - t0, inputs, list(ox.SCORER_OUTPUTS))
    return ox._check(report)
