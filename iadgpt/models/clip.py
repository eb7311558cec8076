"""CLIP vision + text towers (transformers `CLIPModel`) as `Backbone`s with a text tower.

IAD-GPT scores patches against prompt embeddings (Eq. 1), so the backbone must give both the
intermediate patch tokens of the vision tower and the joint-space text embeddings. Weights are
never fetched implicitly: stations are offline, so loading tries local files first and fails
with a message naming the two ways to provide them.

Presets (block numbers are 1-based, as in the paper):
  clip-vit-h14      laion/CLIP-ViT-H-14-laion2B-s32B-b79K  32 blocks, taps 8/16/24/32, 1280-d, 16x16
  clip-vit-l14-336  openai/clip-vit-large-patch14-336      24 blocks, taps 6/12/18/24, 1024-d, 24x24
  clip-vit-b16      openai/clip-vit-base-patch16           12 blocks, taps 3/6/9/12,   768-d, 14x14
  clip-tiny         random seeded config for tests (64 px, patch 8, 4 blocks, 8x8 grid)
  clip              any local CLIPModel directory (`weights=DIR`), taps at quarter depths
"""
from __future__ import annotations

import copy
import inspect
import logging
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import BackboneError
from .backbones import Backbone, InputSpec, register_backbone

log = logging.getLogger(__name__)

# OpenAI CLIP normalisation (also used by the LAION OpenCLIP towers), in 0..1 units.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=None)
def _mask_arg_count(layer_type: type) -> int:
    """Positional mask arguments a CLIPEncoderLayer takes after hidden_states: 2 in transformers 4.x
    (attention_mask, causal_attention_mask), 1 in 5.x (attention_mask; the rest moved to kwargs).
    Cached per class: forward passes ask once per layer."""
    params = [p for p in inspect.signature(layer_type.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return sum(1 for p in params[2:4] if "mask" in p.name)  # [0] is self, [1] hidden_states


def run_encoder_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One unmasked CLIPEncoderLayer call -> the residual stream (4.x returns a tuple, 5.x a tensor)."""
    y = layer(x, *([None] * _mask_arg_count(type(layer))))
    return y[0] if isinstance(y, (tuple, list)) else y


def joint_features(output: Any) -> torch.Tensor:
    """`CLIPModel.get_text_features` / `get_image_features` result as a tensor: transformers 4.x
    returns the projected embeddings, 5.x an output object holding them in `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass(frozen=True)
class ClipPreset:
    """What a named preset expects of its weights; checked after loading so a wrong DIR fails early."""

    hub_id: str
    blocks: int
    taps: tuple[int, ...]
    width: int
    patch: int
    image_size: int


PRESETS: dict[str, ClipPreset] = {
    "clip-vit-h14": ClipPreset("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 32, (8, 16, 24, 32), 1280, 14, 224),
    "clip-vit-l14-336": ClipPreset("openai/clip-vit-large-patch14-336", 24, (6, 12, 18, 24), 1024, 14, 336),
    "clip-vit-b16": ClipPreset("openai/clip-vit-base-patch16", 12, (3, 6, 9, 12), 768, 16, 224),
}


class PatchProjection(nn.Module):
    """post_layernorm + visual_projection of the vision tower: patch tokens (..., C) -> joint space (..., D).

    The zero-shot way (WinCLIP, April-GAN) to compare intermediate tokens with text embeddings.
    Holds copies, so a scorer can carry it inside its own exportable graph.
    """

    def __init__(self, layernorm: nn.LayerNorm, projection: nn.Linear):
        super().__init__()
        self.layernorm = copy.deepcopy(layernorm)
        self.projection = copy.deepcopy(projection)
        self.in_dim = int(self.projection.in_features)
        self.out_dim = int(self.projection.out_features)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layernorm(tokens))


class HashTokenizer:
    """Deterministic offline tokenizer for `clip-tiny` (no vocabulary files can be downloaded).

    Lowercase words and punctuation are hashed (crc32, stable across processes) into
    ids 1..vocab-3; `vocab-2` is BOS, `vocab-1` is EOS, 0 is padding. Same call interface as a
    Hugging Face tokenizer for what `CLIPBackbone.encode_text` uses.
    """

    def __init__(self, vocab_size: int, context_length: int):
        if vocab_size < 8 or context_length < 3:
            raise BackboneError("HashTokenizer needs vocab_size >= 8 and context_length >= 3")
        self.vocab_size = vocab_size
        self.model_max_length = context_length
        self.pad_token_id = 0
        self.bos_token_id = vocab_size - 2
        self.eos_token_id = vocab_size - 1

    def encode(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())
        ids = [zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 3) + 1 for w in words]
        return [self.bos_token_id] + ids[: self.model_max_length - 2] + [self.eos_token_id]

    def __call__(self, texts: Sequence[str], padding: Any = True, truncation: bool = True,
                 max_length: Optional[int] = None, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        rows = [self.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class CLIPBackbone(Backbone):
    """CLIP vision tower tapped at several blocks, plus the text tower and joint-space projections.

    `forward` returns, per tapped block, the patch tokens (CLS dropped) as (B, C, g, g): the raw
    residual stream, as the few-shot memory bank (Eq. 2) wants it. `project_patches` brings them
    into the joint space for text scoring (Eq. 1).
    """

    has_text = True

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, taps: Sequence[int],
                 input_spec: InputSpec, hub_id: str = "", text_batch: int = 64):
        super().__init__()
        vcfg = model.config.vision_config
        n_blocks = int(vcfg.num_hidden_layers)
        taps = tuple(int(t) for t in taps)
        if not taps or any(t < 1 or t > n_blocks for t in taps) or list(taps) != sorted(set(taps)):
            raise BackboneError(f"taps {taps} must be increasing block numbers in 1..{n_blocks}")
        self.clip = model
        self.tokenizer = tokenizer
        self.name = name
        self.hub_id = hub_id
        self.taps = taps
        self.input_spec = input_spec
        self.grid = int(vcfg.image_size) // int(vcfg.patch_size)
        self.width = int(vcfg.hidden_size)
        self.joint_dim = int(model.config.projection_dim)
        self.layers = tuple(f"block{t}" for t in taps)
        self.dims = (self.width,) * len(taps)
        self.strides = (int(vcfg.patch_size),) * len(taps)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.text_batch = text_batch

    def describe(self) -> dict:
        out = super().describe()
        out.update({"joint_dim": self.joint_dim, "grid": self.grid, "hub_id": self.hub_id})
        return out

    def _tokens(self, images: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """Run blocks 1..upto; return the (B, 1+g*g, C) residual stream after each tapped block."""
        vm = self.clip.vision_model
        x = vm.pre_layrnorm(vm.embeddings(self.normalise(images)))
        out = []
        for i, layer in enumerate(vm.encoder.layers[:upto], start=1):
            x = run_encoder_layer(layer, x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for tokens in self._tokens(images, self.taps[-1]):
            patches = tokens[:, 1:, :].transpose(1, 2)  # (B, C, g*g)
            feats.append(patches.unflatten(2, (self.grid, self.grid)))
        return feats

    def projection_module(self) -> PatchProjection:
        """Frozen copy of post_layernorm + visual_projection, to embed in a scorer graph."""
        proj = PatchProjection(self.clip.vision_model.post_layernorm, self.clip.visual_projection)
        proj.eval()
        for p in proj.parameters():
            p.requires_grad_(False)
        return proj

    def project_patches(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) patch map -> (B, D_joint, g, g), not normalised."""
        vm = self.clip.vision_model
        tokens = feature_map.flatten(2).transpose(1, 2)
        joint = self.clip.visual_projection(vm.post_layernorm(tokens))
        return joint.transpose(1, 2).unflatten(2, tuple(feature_map.shape[-2:]))

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Global image feature (CLS of the last block, projected) -> (B, D_joint), L2-normalised."""
        last = self._tokens_all(images)
        pooled = self.clip.vision_model.post_layernorm(last[:, 0, :])
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def _tokens_all(self, images: torch.Tensor) -> torch.Tensor:
        vm = self.clip.vision_model
        x = vm.pre_layrnorm(vm.embeddings(self.normalise(images)))
        for layer in vm.encoder.layers:
            x = run_encoder_layer(layer, x)
        return x

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D_joint) L2-normalised text embeddings, computed in chunks of `text_batch`."""
        texts = [str(t) for t in texts]
        if not texts:
            raise BackboneError("encode_text got no texts; give at least one prompt")
        device = self.clip.text_projection.weight.device
        chunks = []
        for start in range(0, len(texts), self.text_batch):
            enc = self.tokenizer(texts[start:start + self.text_batch], padding=True, truncation=True,
                                 max_length=self.context_length, return_tensors="pt")
            feats = joint_features(self.clip.get_text_features(input_ids=enc["input_ids"].to(device),
                                                               attention_mask=enc["attention_mask"].to(device)))
            chunks.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(chunks, 0)


# --------------------------------------------------------------------------------------------
# Loading


def _fix_message(hub_id: str) -> str:
    return (f"Fix one of: (1) download once on a connected machine with "
            f"`huggingface-cli download {hub_id} --local-dir DIR` (or "
            f"`CLIPModel.from_pretrained('{hub_id}').save_pretrained(DIR)` and "
            f"`CLIPProcessor.from_pretrained('{hub_id}').save_pretrained(DIR)`), copy DIR to this machine "
            f"and pass `--weights DIR`; (2) set HF_HOME to a Hugging Face cache that has {hub_id}.")


def _looks_like_path(src: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else is meant as a directory."""
    return src.startswith((".", "/", "~")) or "\\" in src or src.count("/") > 1


def load_clip_parts(weights: str | Path, hub_id: str, allow_download: bool = False,
                    attn_implementation: str = "eager") -> tuple[nn.Module, Any, InputSpec]:
    """Load (CLIPModel, tokenizer, InputSpec) from a local directory or a hub id, offline by default.

    `local_files_only=True` unless `allow_download`, so nothing ever waits on a network. Eager
    attention is the default because it exports to ONNX opset 17 as plain MatMul/Softmax.
    """
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPTokenizerFast

    local = Path(str(weights)).expanduser()
    src = str(local) if local.exists() else str(weights)
    if not local.exists() and _looks_like_path(src):
        raise BackboneError(f"CLIP weights directory {src!r} does not exist. {_fix_message(hub_id)}")
    local_only = not allow_download
    try:
        model = CLIPModel.from_pretrained(src, local_files_only=local_only,
                                          attn_implementation=attn_implementation)
    except Exception as exc:  # OSError, HFValidationError, missing/corrupt files
        raise BackboneError(f"cannot load CLIP weights {src!r} offline ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}). {_fix_message(hub_id)}") from exc
    tokenizer = None
    errors = []
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        try:
            tokenizer = cls.from_pretrained(src, local_files_only=local_only)
            break
        except Exception as exc:
            errors.append(f"{cls.__name__}: {type(exc).__name__}")
    if tokenizer is None:
        raise BackboneError(f"CLIP weights {src!r} have no tokenizer files ({'; '.join(errors)}). "
                            f"{_fix_message(hub_id)}")
    vcfg = model.config.vision_config
    size = int(vcfg.image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        proc = CLIPImageProcessor.from_pretrained(src, local_files_only=local_only)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        crop = proc.crop_size.get("height", size) if isinstance(proc.crop_size, dict) else size
        if int(crop) != size:
            log.warning("image processor crop %s differs from the tower's %s px; using %s", crop, size, size)
    except Exception as exc:
        log.warning("no image processor config at %s (%s); using OpenAI CLIP mean/std", src, type(exc).__name__)
    spec = InputSpec(size=(size, size), mean=tuple(255.0 * m for m in mean), std=tuple(255.0 * s for s in std),
                     resize="area")
    return model.float(), tokenizer, spec


def _build_preset(name: str, weights: Optional[str | Path] = None, allow_download: bool = False,
                  taps: Optional[Sequence[int]] = None, attn_implementation: str = "eager") -> CLIPBackbone:
    preset = PRESETS[name]
    model, tokenizer, spec = load_clip_parts(weights or preset.hub_id, preset.hub_id, allow_download,
                                             attn_implementation)
    vcfg = model.config.vision_config
    got = (int(vcfg.num_hidden_layers), int(vcfg.hidden_size), int(vcfg.patch_size), int(vcfg.image_size))
    want = (preset.blocks, preset.width, preset.patch, preset.image_size)
    if got != want:
        raise BackboneError(f"weights {str(weights or preset.hub_id)!r} are a CLIP with (blocks, width, patch, size)="
                            f"{got}, but preset {name!r} is {want} ({preset.hub_id}); pass that model's "
                            "weights or use backbone 'clip' for any other CLIP directory")
    log.info("loaded %s from %s", name, weights or preset.hub_id)
    return CLIPBackbone(model, tokenizer, name, taps or preset.taps, spec, hub_id=preset.hub_id)


for _name in PRESETS:
    register_backbone(_name)(partial(_build_preset, _name))


@register_backbone("clip")
def _build_any(weights: Optional[str | Path] = None, allow_download: bool = False,
               taps: Optional[Sequence[int]] = None, attn_implementation: str = "eager") -> CLIPBackbone:
    """Any saved CLIPModel directory; taps default to the quarter depths (as the presets do)."""
    if weights is None:
        raise BackboneError("backbone 'clip' needs weights=DIR (a saved CLIPModel + tokenizer); "
                            "or use a preset: " + ", ".join(sorted(PRESETS)))
    named = str(weights) if not _looks_like_path(str(weights)) else "<hub id>"
    model, tokenizer, spec = load_clip_parts(weights, named, allow_download, attn_implementation)
    n = int(model.config.vision_config.num_hidden_layers)
    taps = tuple(taps) if taps else tuple(sorted({max(1, n * k // 4) for k in (1, 2, 3, 4)}))
    hub_id = "" if Path(str(weights)).expanduser().exists() else str(weights)  # no local paths in manifests
    return CLIPBackbone(model, tokenizer, "clip", taps, spec, hub_id=hub_id)


def tiny_clip_config(image_size: int = 64, patch_size: int = 8, vocab_size: int = 1024,
                     context_length: int = 32, projection_dim: int = 32) -> Any:
    """A tiny CLIPConfig (4 vision blocks, 2 text blocks, 64-d) for tests; eager attention."""
    from transformers import CLIPConfig

    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=context_length, pad_token_id=0,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    cfg._attn_implementation = "eager"
    return cfg


@register_backbone("clip-tiny")
def _build_tiny(weights: Optional[str | Path] = None, seed: int = 0, image_size: int = 64,
                patch_size: int = 8, taps: Sequence[int] = (1, 2, 3, 4)) -> CLIPBackbone:
    """Random CLIP, identical for a given seed (the global RNG is left untouched)."""
    from transformers import CLIPModel

    if weights is not None:
        raise BackboneError("clip-tiny is built from a seed, not weights; pass seed=N (or use backbone 'clip' "
                            "with weights=DIR for a saved model)")
    if image_size % patch_size:
        raise BackboneError(f"clip-tiny image_size {image_size} must be a multiple of patch_size {patch_size}")
    cfg = tiny_clip_config(image_size=image_size, patch_size=patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    tokenizer = HashTokenizer(cfg.text_config.vocab_size, cfg.text_config.max_position_embeddings)
    spec = InputSpec(size=(image_size, image_size), mean=tuple(255.0 * m for m in CLIP_MEAN),
                     std=tuple(255.0 * s for s in CLIP_STD), resize="area")
    return CLIPBackbone(model.float(), tokenizer, "clip-tiny", taps, spec, hub_id="")
