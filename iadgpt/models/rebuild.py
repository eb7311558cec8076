"""The scorer module a bundle was exported from, rebuilt from its manifest.

One place for the torch backend (`export/torch_backend.py`, which checks the exported graphs against
the modules) and the GPU fast path (`runtime/torch_cuda_engine.py`): both must rebuild the same
function, so they must read `scorer.kind` and its settings the same way.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import BundleError

MEMORY_BANK_KINDS = ("memory_bank", "memorybank", "patchcore")
TEXT_KINDS = ("text_prompts", "text", "text_prompt", "zero_shot")


def scorer_module(bundle: Any, backbone: Any) -> nn.Module:
    """The bundle's scorer in eval mode: memory bank and text prompts take the manifest's sigma /
    grid_stride / logit_scale; a trained decoder (alone or fused with a bank) carries its weights in
    the bundle. Memory-bank and text scorers take (features list, reference); decoder scorers are
    flat: (feat0, feat1, ..., [bank])."""
    from .fusion import DECODER_KIND, FUSED_KIND, scorer_from_bundle as decoder_scorer
    from .scorers import MemoryBankScorer
    from .text_scorer import TextPromptScorer

    cfg = bundle.scorer
    kind = str(cfg.get("kind", ""))
    if kind in MEMORY_BANK_KINDS:
        return MemoryBankScorer(backbone.strides, int(bundle.input_spec.size[0]),
                                grid_stride=int(cfg.get("grid_stride", 8)), sigma=float(cfg.get("sigma", 4.0))).eval()
    if kind in TEXT_KINDS:
        return TextPromptScorer.from_backbone(backbone, logit_scale=float(cfg.get("logit_scale", 100.0)),
                                              sigma=float(cfg.get("sigma", 4.0))).eval()
    if kind in (DECODER_KIND, FUSED_KIND):
        return decoder_scorer(bundle)
    raise BundleError(f"bundle {bundle.path}: scorer kind {kind!r} cannot be rebuilt in torch (memory_bank, "
                      "text_prompts and the trained decoder can); re-export it with `iadgpt export`, or use "
                      "--backend onnxruntime")


def is_flat(bundle: Any) -> bool:
    """Whether the rebuilt scorer takes its inputs flat (decoder kinds) rather than (features, reference)."""
    from .fusion import DECODER_KIND, FUSED_KIND

    return str(bundle.scorer.get("kind", "")) in (DECODER_KIND, FUSED_KIND)
