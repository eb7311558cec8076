"""Building scorer references (memory banks, text embeddings) from images and prompts.

Shared by `iadgpt eval`, `iadgpt export` and calibration so that a bank is built one way only.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..data import read_reference_image
from ..runtime.preprocess import to_batch
from .backbones import Backbone
from .scorers import MemoryBankScorer, augment_shots, build_bank

log = logging.getLogger(__name__)


def encode(backbone: Backbone, images: np.ndarray | torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """Per-layer features of a (B, 3, H, W) 0..255 batch, computed in chunks."""
    x = torch.as_tensor(images)
    outs: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            outs.append(backbone(x[i:i + batch_size]))
    return [torch.cat([o[layer] for o in outs]) for layer in range(len(outs[0]))]


def load_batch(paths: Iterable, backbone: Backbone) -> np.ndarray:
    """Decode reference images (bank shots, probes, held-out normals) and lay them out as the encoder
    input; a thumbnail or placeholder among them is refused (`read_reference_image`)."""
    return to_batch([read_reference_image(p) for p in paths], backbone.input_spec)


def memory_bank(backbone: Backbone, scorer: MemoryBankScorer, shots: np.ndarray, *, augment: bool,
                coreset: Optional[float], seed: int = 0, progress: bool = False) -> np.ndarray:
    """(M, D) bank from a (K, 3, H, W) batch of normal images."""
    x = torch.as_tensor(shots)
    if augment:
        x = augment_shots(x)
    feats = encode(backbone, x)
    with torch.inference_mode():
        patches = scorer.embedder.patches(feats)
    return build_bank(patches, coreset, seed=seed, progress=progress)


def image_hashes(paths: Sequence) -> list[str]:
    """sha256 of each reference image file: provenance for the bank in a bundle."""
    from ..bundle import sha256_file
    return [sha256_file(p) for p in paths]
