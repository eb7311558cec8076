"""Decoder + memory-bank fusion, and the decoder's SCORER graphs (ONNX, parity-checked).

Two scorer graphs come from a trained decoder checkpoint:

* kind "decoder": ``feat0..featL-1 -> anomaly_map, score``; the decoder's weights are graph
  constants (fixed per checkpoint), so the graph has no reference input.
* kind "decoder+memory_bank": ``feat0.., bank -> anomaly_map, score``: the decoder map and the
  k-shot memory-bank map fused INSIDE the graph (the bank stays an input, as in the bank scorer).

Fusion is a normalised weighted mean, before the one Gaussian smoothing:

    fused = w * (D - mu_D) / s_D + (1 - w) * (B - mu_B) / s_B

D is the decoder's log-odds map (mean over its layers of the upsampled abnormal-minus-normal logit,
`VisualGuidedDecoder.log_odds_map`), B the bank's patch distance map (upsampled, unsmoothed). mu
and s are the mean and standard deviation of each map's pixels over NORMAL training images that
are not in the bank, measured at export time: a normal pixel scores ~0 in either map and one unit
is one normal standard deviation in both.

The weight w is chosen at export time without the test set (`--fusion-weight auto`, the default):
the normal images of the train dir that are neither bank shots nor statistics images get one
defect each painted on their foreground (the `runtime.synthetic` painters: scratch, crack, hole,
stain, missing; a different generator from the NSA the decoder is trained on), and w is the
SMALLEST `WEIGHT_GRID` entry whose pixel AUROC on them is within one bootstrap standard error of
the best (`pick_weight`, the one-standard-error rule). The bundle config records the grid with
its validation P-AUROC and standard error, and the image names (`fusion.weight_choice`).

Why the rule: the painted defects are synthetic and overrate the decoder (trained on synthetic
defects: bottle validation P-AUROC 98.7-99.1 alone vs 96.82 on the real defects), and 40 images
resolve ~0.15 points. Test I-AUROC / P-AUROC / AUPRO means over three 1-shot banks (README table;
efficientnet-lite0): bottle bank 99.84 / 98.92 / 94.72, one-SE rule (w 0, 0.3, 0.3) 99.97 / 98.89 /
95.12, best validation weight (w 0.3, 0.75, 0.75) 100.00 / 98.14 / 94.13; metal_plate bank 99.15 /
98.31 / 89.12, one-SE (0.2, 0, 0.2) 98.97 / 98.36 / 89.49, best (0.5 x 3) 98.28 / 97.98 / 88.73.
So the fusion does NOT beat the bank's pixel AUROC on bottle with an honestly chosen weight (it
gains image AUROC and AUPRO); a fixed w = 0.1 does on all three shots (+0.02 to +0.04), but that
weight was found by looking at the bottle test set, and the synthetic defects cannot single it out.
None of these bottle differences is resolvable by its 83 test images: their paired-bootstrap 95 %
intervals all straddle 0 (`benchmarks/fusion.py`, `metrics.pixel_auroc_gain`).

History (seed 0, under the best-weight rule): a fixed w = 0.1 was first picked by looking at these
test sets (bottle P-AUROC 98.95 vs the bank's 98.92; an optimistic pick), and a weight chosen on
NSA anomalies picks 0.75 (P-AUROC 97.80 / 95.23 on bottle / metal_plate): the decoder was trained
on that distribution.
Also tried: the decoder's softmax probability instead of its log-odds (it saturates at 0/1 and
the mean loses to the bank, bottle 98.2-98.3), scaling by the 99.9th percentile of the normal
maps instead of the std (no better); on bottle (same validation / test, P-AUROC; a one-off
script, not in the repo): per-pixel-position mean/std of the held-out normal maps instead of one
global pair (validation 98.60 at w 0.3, test 98.41: worse than global 98.88), the pixel-wise max
of the two z-maps (98.89 / 98.92, = the bank), their product (98.98 / 97.77). The test P-AUROC
over w is flat between 0 and 0.3 (98.88-98.95): any pick there is within 0.05 of the bank, which
is as much as the choice on validation can resolve.
Also measured (bottle, same images, one-off script; the rule fixed before the run: adopt only if
its best validation P-AUROC beats the z-mean's 99.024): each map turned into its "surprise" under
the normal pixels of the statistics images (-log of the empirical survival, an exponential tail
above the 99th percentile; Fisher's way of combining tests) before the weighted mean. Validation
best 99.020 at w 0.2 (test there 98.94, at 0.3 98.90): not better on validation, not adopted.
Its test edge over the bank (+0.02) is of the size validation cannot resolve (the z-mean at w
0.2: 98.93).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..bundle import DECODER_ARRAY_PREFIX
from ..errors import BundleError, ExportError, ScorerError
from .heads import STORED_STATE_ERRORS, VisualGuidedDecoder
from .postprocess import GaussianBlur, upsample_map
from .scorers import QUERY_CHUNK, PatchEmbedder, nearest_distances

log = logging.getLogger(__name__)

__all__ = ["DecoderScorer", "FusedScorer", "check_weight", "fit_fusion", "choose_fusion_weight", "pick_weight",
           "validation_set", "export_decoder_scorer", "scorer_from_bundle", "DECODER_KIND", "FUSED_KIND", "WEIGHT_GRID",
           "BOOTSTRAP_RESAMPLES"]

DECODER_KIND = "decoder"
FUSED_KIND = "decoder+memory_bank"
WEIGHT_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)  # fusion weights tried by --fusion-weight auto
BOOTSTRAP_RESAMPLES = 100  # image resamples for the standard error of the validation AUROC (pick_weight)
SE_STRIDE = 4  # the bootstrap reads every 4th pixel per axis: a noise estimate, 16x fewer pixels to rank


class DecoderScorer(nn.Module):
    """The decoder alone as a scorer: forward(feat0.., featL-1) -> (anomaly_map, score)."""

    reference_free = True  # no bank or text input: the GPU fast path feeds it the features only

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
                 sigma: float = 4.0, weight: float = 0.1, stats: Optional[Sequence[float]] = None,
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
        g = self.embedder.grid
        return nearest_distances(self.embedder.patches(features), bank, self.query_chunk).reshape(-1, g, g)

    def raw_maps(self, features: Sequence[torch.Tensor], bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder log-odds map, bank distance map), both (B, H, W), upsampled and unsmoothed."""
        return self.decoder.log_odds_map(features), upsample_map(self.bank_distance(features, bank), self.image_size)

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

    Float64 accumulation: the maps have ~10^5 pixels per image.
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


def pick_weight(zd: np.ndarray, zb: np.ndarray, masks: np.ndarray, grid: Sequence[float] = WEIGHT_GRID, *,
                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                progress: bool = False) -> tuple[float, list[list[float]]]:
    """The fusion weight by the one-standard-error rule: the SMALLEST grid weight (the closest to the
    training-free bank) whose pixel AUROC of w * zd + (1 - w) * zb is within one standard error of
    the best weight's.

    Why not the best weight: the validation defects are synthetic, so they overrate the decoder
    (trained on synthetic defects) by an unknown amount, and with a few dozen images neighbouring
    weights differ by less than the noise (module docstring: the plain argmax picked 0.75 for two of
    three bottle shots and cost 1.1 points of test P-AUROC). The standard error is a bootstrap over
    the validation IMAGES (`resamples` draws, seeded), on every `SE_STRIDE`-th pixel: it measures
    noise, so coarse pixels suffice; the AUROCs in the table are exact. resamples=0 gives the plain
    best weight (ties to the smallest).

    zd, zb: (N, H, W) normalised (and smoothed) decoder and bank maps; masks (N, H, W) bool.
    Returns (w, [[w, pixel AUROC, standard error], ...]) in ascending w.
    """
    from ..metrics import pixel_auroc

    weights = sorted(float(w) for w in grid)
    it = weights
    if progress:
        from tqdm import tqdm
        it = tqdm(weights, desc="fusion weight", unit="w", leave=False)
    aurocs = np.array([float(pixel_auroc(masks, w * zd + (1.0 - w) * zb)) for w in it])
    errors = np.zeros(len(weights))
    n = len(masks)
    if resamples > 0 and n > 1:
        rng = np.random.default_rng(seed)
        step = SE_STRIDE if masks[:, ::SE_STRIDE, ::SE_STRIDE].any() else 1  # defects thinner than the stride
        sub = (slice(None), slice(None, None, step), slice(None, None, step))
        d, b, m = zd[sub], zb[sub], masks[sub]
        draws = np.empty((resamples, len(weights)))
        rounds: Iterable[int] = range(resamples)
        if progress:
            from tqdm import tqdm
            rounds = tqdm(rounds, desc="fusion weight: bootstrap", unit="draw", leave=False)
        for r in rounds:
            idx = rng.integers(0, n, n)
            if not m[idx].any():  # a draw of images without defect pixels has no AUROC
                idx = np.arange(n)
            draws[r] = [pixel_auroc(m[idx], w * d[idx] + (1.0 - w) * b[idx]) for w in weights]
        errors = draws.std(axis=0)
    best = int(np.argmax(aurocs))
    pick = next(i for i in range(len(weights)) if aurocs[i] >= aurocs[best] - errors[best])
    return weights[pick], [[w, float(a), float(e)] for w, a, e in zip(weights, aurocs, errors)]


@torch.no_grad()
def choose_fusion_weight(fused: FusedScorer, features: Sequence[torch.Tensor], masks: np.ndarray, bank: torch.Tensor,
                         grid: Sequence[float] = WEIGHT_GRID, batch_size: int = 8, resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = 0, progress: bool = False) -> tuple[float, list[list[float]]]:
    """Set `fused.weight` to the `pick_weight` choice on labelled validation images.

    Call after `fit_fusion` (the maps are normalised with its statistics). The smoothing is linear,
    so each map is normalised and smoothed once and every weight is a mix of the two.
    """
    s = fused.stats
    zd, zb = [], []
    for i in range(0, int(features[0].shape[0]), batch_size):
        dmap, bmap = fused.raw_maps([f[i:i + batch_size].float() for f in features], bank)
        zd.append(fused.blur((dmap - s[0]) / s[1]).numpy())
        zb.append(fused.blur((bmap - s[2]) / s[3]).numpy())
    pick, table = pick_weight(np.concatenate(zd), np.concatenate(zb), masks, grid, resamples=resamples, seed=seed,
                              progress=progress)
    fused.weight.fill_(pick)
    log.info("fusion weight %.2f chosen on %d validation images (pixel AUROC +- standard error: %s)", pick, len(masks),
             ", ".join(f"w {w:g}: {100 * a:.2f} +- {100 * e:.2f}" for w, a, e in table))
    return pick, table


def validation_set(paths: Sequence[Path], backbone: nn.Module, kind: str = "auto",
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Normal images with a painted defect each (runtime.synthetic painters, cycling over the kinds)
    on their foreground (`synth.foreground_mask`): ((N, 3, H, W) encoder input, (N, H, W) masks,
    [[file name, defect kind], ...]). Deterministic per (seed, position); images where no defect
    fits are dropped.
    """
    from ..data import read_image
    from ..runtime.preprocess import resize_frame
    from ..runtime.synthetic import DEFECT_KINDS, paint_defect
    from .synth import foreground_mask, guess_kind

    images = [resize_frame(read_image(p), backbone.input_spec) for p in paths]
    if kind not in ("object", "texture"):
        kind = guess_kind(images)
    out, masks, kinds = [], [], []
    for i, (path, im) in enumerate(zip(paths, images)):
        defect = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        painted, mask = paint_defect(im, foreground_mask(im, kind), defect, np.random.default_rng([seed, i]))
        if mask.any():
            out.append(painted)
            masks.append(mask)
            kinds.append([Path(path).name, defect])
    if not out:
        raise ExportError(f"no defect could be painted on the {len(images)} validation images; "
                          "give a fixed --fusion-weight instead of auto")
    batch = np.stack(out).astype(np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch), np.stack(masks), kinds


# --------------------------------------------------------------------------- ONNX


def _restore_unused_inputs(path: Path, names: Sequence[str], args: Sequence[torch.Tensor],
                           dynamic: dict) -> None:
    """Put back graph inputs the tracer dropped because the module ignores them (a decoder that
    reads only some tapped layers): the station feeds every encoder output to the scorer, so the
    graph must accept all of them, in order."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    present = {i.name: i for i in model.graph.input}
    if all(n in present for n in names):
        return
    ordered = []
    for name, arg in zip(names, args):
        if name in present:
            ordered.append(present[name])
            continue
        shape = [dynamic.get(name, {}).get(axis) or int(d) for axis, d in enumerate(arg.shape)]
        ordered.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        log.debug("%s: input %s is unused by the scorer; kept so the station can feed all features", path.name, name)
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


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
    _restore_unused_inputs(path, inputs, args, dynamic)

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


# --------------------------------------------------------------------------- bundles


def decoder_scorer_for_bundle(checkpoint: Union[str, Path], backbone: nn.Module, *, train_dir=None,
                              shots: Optional[int] = None, seed: int = 0, augment: Optional[bool] = None,
                              coreset: Optional[float] = None, grid_stride: int = 8, sigma: float = 4.0,
                              max_normals: int = 32, fusion_weight: Union[str, float] = "auto",
                              max_validation: int = 40, progress: bool = False) -> dict:
    """What `export_bundle(decoder=...)` needs for a decoder checkpoint.

    shots None: the decoder alone (kind "decoder", no references). shots k (0 = all images of
    `train_dir`): the decoder fused with the k-shot memory bank (kind "decoder+memory_bank"); the
    fusion statistics come from up to `max_normals` images of `train_dir` that are NOT in the bank.
    fusion_weight "auto": the weight is the `pick_weight` choice (one-standard-error rule) on up to
    `max_validation` further held-out normal images (half the non-bank images at most) with painted
    defects (`validation_set`); a number in [0, 1] is used as given.
    Returns {"module", "bank" (None or (M, D)), "arrays": [(name, array, provenance)], "config",
    "probe" (a few normal images for the encoder parity check, or None), "scorer_probe" (two NSA
    anomalies made from `train_dir` images, or None: random-pixel probes barely move a trained
    decoder's map, so parity is also checked where the map spans its range), "images"}.
    """
    from ..bundle import sha256_file
    from ..export.bundle_export import list_images, pick_shots
    from .references import encode, image_hashes, load_batch, memory_bank
    from .scorers import MemoryBankScorer
    from .train import load_decoder

    decoder, meta = load_decoder(checkpoint)
    name = meta.get("backbone", {}).get("name")
    if name != backbone.name:
        raise ExportError(f"decoder {checkpoint} was trained on backbone {name!r}; export with --backbone {name}")
    size = int(backbone.input_spec.size[0])
    if decoder.image_size != size or tuple(decoder.dims) != tuple(backbone.dims):
        raise ExportError(f"decoder {checkpoint} was trained at {decoder.image_size} px with layer widths "
                          f"{list(decoder.dims)}; export with --resolution {decoder.image_size}")
    weights = [(f"{DECODER_ARRAY_PREFIX}{key}", value.detach().cpu().float().numpy(),
                {"checkpoint": Path(checkpoint).name, "tensor": key}) for key, value in decoder.state_dict().items()]
    decoder_info = {"checkpoint": Path(checkpoint).name, "sha256": sha256_file(checkpoint),
                    "step": int(meta.get("step", 0)), "category": meta.get("category"),
                    "train_config": meta.get("train_config"), "decoder_config": decoder.config(),
                    "arrays": {prov["tensor"]: name for name, _, prov in weights}}
    config = {"image_size": [size, size], "sigma": float(decoder.sigma), "decoder": decoder_info}
    paths = list_images(train_dir) if train_dir is not None else []
    probe = load_batch(paths[:2], backbone) if paths else None
    scorer_probe = _nsa_probe(paths[:8], backbone, meta.get("nsa_kind", "auto"), seed) if paths else None
    if shots is None:
        config.update({"kind": DECODER_KIND, "references": {}, "shots": 0, "coreset": None, "augment": False})
        return {"module": DecoderScorer(decoder), "bank": None, "arrays": weights, "config": config, "probe": probe,
                "scorer_probe": scorer_probe, "images": 0}

    if train_dir is None:
        raise ExportError("fusing the decoder with a memory bank needs --train-dir (a folder of normal images)")
    k = int(shots)
    picked = pick_shots(paths, k, seed)
    rest = [p for p in paths if p not in set(picked)]
    if not rest:
        raise ExportError(f"the fusion statistics need normal images that are not in the bank, but all {len(paths)} "
                          f"images of {train_dir} are shots; use fewer --shots or add normal images")
    auto = str(fusion_weight).strip().lower() == "auto"
    rng = np.random.default_rng(seed + 1)
    order = [rest[i] for i in rng.permutation(len(rest))]
    n_val = min(max_validation, len(order) // 2) if auto else 0
    if auto and n_val == 0:
        raise ExportError(f"--fusion-weight auto needs at least 2 normal images that are not shots, {train_dir} has "
                          f"{len(rest)}; give a fixed --fusion-weight or add normal images")
    val = sorted(order[:n_val])
    held = sorted(order[n_val:][:max_normals])
    do_augment = (0 < k <= 8) if augment is None else bool(augment)
    bank_scorer = MemoryBankScorer(backbone.strides, size, grid_stride=grid_stride, sigma=sigma)
    batch = load_batch(picked, backbone)
    bank = memory_bank(backbone, bank_scorer, batch, augment=do_augment, coreset=coreset, seed=seed, progress=progress)
    weight = 0.0 if auto else check_weight(fusion_weight)
    fused = FusedScorer(decoder, backbone.strides, grid_stride=grid_stride, sigma=sigma, weight=weight)
    stats = fit_fusion(fused, encode(backbone, load_batch(held, backbone)), torch.from_numpy(bank))
    choice: dict = {"method": "given"}
    if auto:
        t0 = time.perf_counter()
        images, masks, painted = validation_set(val, backbone, meta.get("nsa_kind", "auto"), seed)
        weight, table = choose_fusion_weight(fused, encode(backbone, images), masks, torch.from_numpy(bank),
                                            seed=seed, progress=progress)
        choice = {"method": "one-standard-error rule: the smallest grid weight whose pixel AUROC on held-out normals "
                            "with painted defects is within one bootstrap standard error of the best",
                  "grid": table, "resamples": BOOTSTRAP_RESAMPLES, "images": painted,
                  "seed": int(seed), "seconds": round(time.perf_counter() - t0, 1)}
    arrays = [("memory_bank", bank, {
        "images": image_hashes(picked), "files": [p.name for p in picked], "train_dir": str(Path(train_dir).absolute()),
        "shots": k, "seed": int(seed), "augment": do_augment, "coreset": coreset})] + weights
    config.update({"kind": FUSED_KIND, "references": {"bank": "memory_bank"}, "shots": k, "coreset": coreset,
                   "augment": do_augment, "grid_stride": int(grid_stride), "sigma": float(sigma),
                   "fusion": {"method": "normalised mean", "weight": weight, "stats": stats,
                              "stats_images": [p.name for p in held], "weight_choice": choice}})
    return {"module": fused, "bank": bank, "arrays": arrays, "config": config, "probe": batch[:2],
            "scorer_probe": scorer_probe, "images": len(picked)}


def scorer_from_bundle(bundle) -> nn.Module:
    """The decoder (or decoder + bank) scorer module of a decoder bundle, rebuilt from its config
    and the decoder weights it carries (`scorer.decoder.arrays`): what the torch and cuda-graph
    backends run. ONNX stays the source of truth; the cuda-graph backend checks the rebuild
    against it when it opens the bundle."""
    cfg = bundle.scorer
    info = cfg.get("decoder") or {}
    names = info.get("arrays")
    if not names:
        raise BundleError(f"bundle {bundle.path} keeps its decoder's weights in the scorer ONNX only (exported "
                          "before bundles carried them): re-export it with `iadgpt export --decoder CKPT ...` for the "
                          "torch and cuda-graph backends, or run it with --backend onnxruntime")
    state = {key: torch.from_numpy(np.array(bundle.array(name))) for key, name in names.items()}
    try:
        decoder = VisualGuidedDecoder.from_state(info["decoder_config"], state)
    except STORED_STATE_ERRORS as exc:  # an edited or damaged manifest
        raise BundleError(f"bundle {bundle.path}: its decoder config and weights do not fit together "
                          f"({type(exc).__name__}: {str(exc)[:200]}); re-export it with `iadgpt export --decoder "
                          "CKPT ...`") from exc
    if cfg.get("kind") == DECODER_KIND:
        return DecoderScorer(decoder).eval()
    fusion = cfg["fusion"]
    return FusedScorer(decoder, bundle.backbone["strides"], grid_stride=int(cfg["grid_stride"]),
                       sigma=float(cfg["sigma"]), weight=float(fusion["weight"]), stats=fusion["stats"]).eval()


def check_weight(value: Union[str, float]) -> float:
    try:
        w = float(value)
    except ValueError:
        raise ExportError(f"--fusion-weight {value!r}: use auto or a number in [0, 1]") from None
    if not 0.0 <= w <= 1.0:
        raise ExportError(f"--fusion-weight {w} out of range: use auto or a number in [0, 1] (1 = decoder only)")
    return w


def _nsa_probe(paths: Sequence[Path], backbone: nn.Module, kind: str, seed: int, n: int = 2) -> np.ndarray:
    """(n, 3, H, W) encoder input of NSA anomalies pasted between the given normal images."""
    from ..data import read_image
    from ..runtime.preprocess import resize_frame
    from .synth import NSASynthesizer

    images = [resize_frame(read_image(p), backbone.input_spec) for p in paths]
    synth = NSASynthesizer(images, kind=kind if kind in ("object", "texture") else "auto")
    batch = np.stack([synth.sample(i, seed=seed).image for i in range(n)]).astype(np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
