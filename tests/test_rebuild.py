"""Scorer rebuilt from a bundle's manifest (models/rebuild.py): the torch and cuda-graph backends share it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from iadgpt.bundle import InputSpec  # noqa: E402
from iadgpt.errors import BundleError  # noqa: E402
from iadgpt.models.backbones import get_backbone  # noqa: E402
from iadgpt.models.rebuild import is_flat, scorer_module  # noqa: E402
from iadgpt.models.scorers import MemoryBankScorer  # noqa: E402
from iadgpt.models.text_scorer import TextPromptScorer  # noqa: E402


def _bundle(scorer: dict, size: int = 64) -> SimpleNamespace:
    spec = InputSpec(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return SimpleNamespace(scorer=scorer, input_spec=spec, path="B")


def test_memory_bank_and_text_scorers_take_the_manifests_settings():
    tiny = get_backbone("clip-tiny")
    bank = scorer_module(_bundle({"kind": "memory_bank", "grid_stride": 16, "sigma": 2.5}, 64), tiny)
    assert isinstance(bank, MemoryBankScorer) and not bank.training
    assert bank.embedder.grid == 64 // 16 and bank.blur.sigma == 2.5 and bank.image_size == 64
    for kind in ("text_prompts", "text"):  # "text" is what hand-built bundles (and older tests) write
        text = scorer_module(_bundle({"kind": kind, "logit_scale": 50.0, "sigma": 0.0}), tiny)
        assert isinstance(text, TextPromptScorer) and text.logit_scale == 50.0 and text.blur.sigma == 0.0
    assert not is_flat(_bundle({"kind": "memory_bank"}))


def test_an_unknown_scorer_kind_is_refused_with_the_fix():
    with pytest.raises(BundleError, match="'knn'.*re-export.*onnxruntime"):
        scorer_module(_bundle({"kind": "knn"}), get_backbone("clip-tiny"))
