"""Export the bridge heads to ONNX (parity-checked against torch) as a folder `OnnxBridge` runs.

Graphs: masks_decoder (feat0.. -> masks), masks_bank (feat0.., bank -> masks), tge (feature ->
image_token), mmf (masks -> mask_tokens); batch dynamic, bank size dynamic. Each is run on ONNX
Runtime right after export on the given probes (batch B and batch 1) and must agree with torch
within BRIDGE_RTOL (heads) / MASKS_RTOL (masks) of the largest |torch output|, with an absolute
floor of 1e-5 (heads) / MASKS_ATOL (masks, in normal standard deviations).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from ..export import onnx_export as ox
from ..runtime.bridge_runtime import BRIDGE_CONFIG
from .bridge import MultiMaskFusion, TextGuidedEnhancer
from .bridge_train import MaskMaker

log = logging.getLogger(__name__)

BRIDGE_RTOL = 1e-4
# The mask graphs end in a z-normalisation by the normal maps' std: the bank's float32 distance
# (|b|^2 - 2 q.b + |q|^2, GEMM order differs between backends) then differs by ~2e-4 of the max,
# i.e. 3e-3 normal standard deviations; they are checked at 1e-3 of the max instead, and never
# tighter than 1e-2 normal standard deviations: on normal probes the max is small (~2-3) and the
# tolerance alone (2.8e-3) came within 20 % of the measured difference (2.25e-3). The masks are
# z-scores, so 1e-2 is a hundredth of the spread of a normal pixel; an export bug moves them by ~1.
MASKS_RTOL = 1e-3
MASKS_ATOL = 1e-2


class _Flat(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*inputs)


def _export_one(module: nn.Module, path: Path, names: list[str], output: str, args: Sequence[np.ndarray],
                dynamic: dict, role: str, threads: int = 1, rtol: float = BRIDGE_RTOL,
                atol: float = 1e-5) -> ox.ParityReport:
    t0 = time.perf_counter()
    module = _Flat(module).eval()
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in args)
    size, external = ox._trace_to_onnx(module, tensors, path, names, [output], dynamic, ox.OPSET,
                                       ox.EXTERNAL_DATA_THRESHOLD)
    from .fusion import _restore_unused_inputs
    _restore_unused_inputs(path, names, tensors, dynamic)
    full = {n: np.ascontiguousarray(a, np.float32) for n, a in zip(names, args)}
    one = {n: (a[:1] if n != "bank" else a) for n, a in full.items()}
    probes = [(f"batch {len(args[0])}", full), ("batch 1", one)]
    diffs, refs = ox._compare(path, lambda f: [module(*(torch.from_numpy(f[n]) for n in names))], probes,
                              [output], threads)
    scale = max(float(np.abs(r[output]).max()) for r in refs)
    report = ox.ParityReport(role, path, diffs, {output: max(rtol * scale, atol)}, {output: scale},
                             [p[0] for p in probes], size, external, time.perf_counter() - t0, names, [output])
    return ox._check(report)


def export_bridge(out: Union[str, Path], tge: TextGuidedEnhancer, mmf: MultiMaskFusion, maker: MaskMaker,
                  probe_features: Sequence[torch.Tensor], meta: dict) -> dict:
    """Write the four graphs + memory_bank.npy + bridge.json into `out`; returns bridge.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feats = [f.detach().float().numpy() for f in probe_features]
    names = ox.feature_names(len(feats))
    batch = {n: {0: "batch"} for n in names}
    bank = maker.bank.detach().float().numpy()
    reports = {}
    reports["masks_decoder"] = _export_one(maker.modules["decoder"], out / "masks_decoder.onnx", names, "masks", feats,
                                           {**batch, "masks": {0: "batch"}}, "bridge decoder masks", rtol=MASKS_RTOL,
                                           atol=MASKS_ATOL)
    reports["masks_bank"] = _export_one(maker.modules["memory_bank"], out / "masks_bank.onnx", names + ["bank"], "masks",
                                        feats + [bank], {**batch, "bank": {0: "bank_size"}, "masks": {0: "batch"}},
                                        "bridge bank masks", rtol=MASKS_RTOL, atol=MASKS_ATOL)
    reports["tge"] = _export_one(tge, out / "tge.onnx", ["feature"], "image_token", [feats[maker.tge_layer]],
                                 {"feature": {0: "batch"}, "image_token": {0: "batch"}}, "bridge TGE")
    with torch.inference_mode():
        masks = maker.modules["decoder"](*probe_features).numpy()
    reports["mmf"] = _export_one(mmf, out / "mmf.onnx", ["masks"], "mask_tokens", [masks],
                                 {"masks": {0: "batch"}, "mask_tokens": {0: "batch"}}, "bridge MMF")
    np.save(out / "memory_bank.npy", bank.astype(np.float32), allow_pickle=False)
    config = {"schema": 1, "graphs": {k: f"{k}.onnx" for k in reports}, "bank": "memory_bank.npy",
              "tge_layer": int(maker.tge_layer), "hidden_size": int(tge.out_dim), "mask_tokens": mmf.n_tokens,
              "parity": {k: {"max_abs_diff": r.diffs, "tolerance": r.tolerances, "probes": r.probes}
                         for k, r in reports.items()},
              **meta}
    (out / BRIDGE_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    return config
