"""The IAD-GPT bridge: Text-Guided Enhancer (TGE), Multi-Mask Fusion (MMF) and a frozen LLM reading them.

    feature of the last tapped layer ------------------> TGE -> 1 image token      (B, 1, C)
    per-layer anomaly maps (decoder OR 1-shot bank) ---> MMF -> L1 + L3 mask tokens (B, 11, C)
    LLM (frozen) reads  <|im_start|>user\\n [image] [masks] Is there any anomaly in the image?<|im_end|>
                        \\n<|im_start|>assistant\\n  -> "No, ..." / "Yes, ..., at the {position}."

C is the LLM's hidden size (576 for SmolLM2-135M). Choices the paper leaves open, documented here:

* **Per-layer masks** (`DecoderMasks`, `BankMasks`): one map per layer the decoder reads
  (efficientnet-lite0: the stride-8 and stride-16 taps, train.DEFAULT_LAYERS), on the stride-8
  grid (28 x 28 at 224 px). Decoder: the upsampled abnormal-minus-normal logit of that layer
  (`VisualGuidedDecoder.layer_logits`, pre-softmax as in fusion.py: the probabilities saturate).
  Bank: the distance of each patch to its nearest row of the k-shot memory bank, using only that
  layer's columns of the PatchEmbedder vectors. Both are z-normalised per layer by the mean/std
  of the map's pixels on normal training images (as fusion.py), so "one unit = one normal standard
  deviation" whichever map the LLM reads: that is what lets one MMF read both kinds.
* **TGE** (Eqs. 3-4). Global image feature F_img: the spatial mean of the last tapped layer
  (112 channels), standardised like the decoder input. References T = the decoder's learned
  [normal, abnormal] prototypes (no text tower on efficientnet-lite0), compared in the decoder's
  projection space (its frozen layer projection): gate W = softmax(a * cos(Proj(F), T) + b), with
  a (init 10) and b learned. Two experts (one "normal", one "abnormal"), each an attention block
  (a query from F_img attends over the 7 x 7 pooled patch tokens, 4 heads, width 128) followed
  by an FFN (128 -> 512 -> 128) and a linear to C. E_img = sum_i W_i Expert_i. 0.6 M parameters.
* **MMF**. Per map: asinh squash (z-scores of defects reach the hundreds), bilinear resize to
  24 x 24, conv 3x3/2 (1 -> 16) + GELU, then two depthwise-separable blocks (dw 3x3/2 + pw 1x1,
  16 -> 32 -> 64) + GELU: a 3 x 3 grid of 64-d cells, i.e. L1 = 9 tokens, one per cell of the
  position grid (facts.GRID_NAMES, row-major), each projected to C / n_maps (288 with two maps;
  C/4 in the paper with four), concatenated channel-wise to C, plus a learned per-cell position
  embedding; then the summary: WORD_SLOTS = 2 tokens made of the LLM's own input embeddings of a
  position's words as they continue the answer (" top", " left" / " center", "."); then L3 = 2
  learned base tokens: 13 mask tokens. Which position (`locate`): "centroid" (default) =
  `CentroidLocator` (7 parameters: the cell nearest a soft centroid of the hottest pixels, and a
  presence logit), its words handed over one-hot, NONE_WORD's when nothing is present; "linear" =
  a softmax(linear layer over all cells of all maps)-weighted mix of the 9 cells' words (the first
  'words' checkpoints). Both also get an auxiliary cross-entropy against the NSA region's cell.
  Why the locator (a one-off experiment, not in the repo): on bottle the linear head reached
  83-85 % on held-out NSA samples but 85-86 % on painted defects (a different generator), the
  locator 80/74 % NSA and 92/88 % painted: few parameters carry over from synthetic to real
  defects (on the real test defects, not used to choose: 82.5-84.1 / 76.2-77.8 % vs 58.7 / 60.3 %;
  the frozen LLM's answers follow it on 57-89 %, README).
  Why a words summary at all: with the paper's layout (cells + base tokens only) the first bottle
  run learned yes/no (95 %) but not the position (9.5 %): a frozen 135M LLM does not learn in a few
  hundred CPU steps to find the hot one of 9 cell tokens and name it. An MLP summary token
  (`summary="mlp"`) got 27-33 %; handing the LLM the
  position words themselves, so that it only has to copy them, is what the 'words' summary does.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ScorerError
from ..runtime.bridge_runtime import PROMPT_HEAD, PROMPT_TAIL, YES_ANSWER, answer_choices
from ..runtime.facts import POSITION_WORDS
from .heads import VisualGuidedDecoder
from .scorers import PatchEmbedder, nearest_distances

log = logging.getLogger(__name__)

WORD_SLOTS = 2  # tokens of the 'words' summary: a position's words as they continue the answer
NONE_WORD = "none"  # what the centroid summary hands the LLM when its presence says "nothing to locate"


def position_word_ids(encode: Callable[[str], list[int]], position: str) -> list[int]:
    """The first WORD_SLOTS token ids that follow "... at the" in the answer for `position`."""
    head = YES_ANSWER.split("{position}")[0]
    full, prefix = encode(YES_ANSWER.format(position=position)), encode(head.rstrip())
    ids = full[len(prefix):] if full[:len(prefix)] == prefix else encode(" " + position + ".")
    return (ids + ids[-1:] * WORD_SLOTS)[:WORD_SLOTS]


__all__ = ["TextGuidedEnhancer", "MultiMaskFusion", "DecoderMasks", "BankMasks", "BridgeLM", "fit_mask_stats"]


# --------------------------------------------------------------------------- per-layer masks


class DecoderMasks(nn.Module):
    """forward(feat0..featL-1) -> (B, n, g, g): the decoder's per-layer log-odds, z-normalised."""

    def __init__(self, decoder: VisualGuidedDecoder, grid: int = 28):
        super().__init__()
        self.decoder = decoder
        self.grid = int(grid)
        n = len(decoder.layers)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))

    def raw(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        logits = self.decoder.layer_logits(features, self.grid)
        return torch.stack([lg[:, 1] - lg[:, 0] for lg in logits], dim=1)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return (self.raw(features) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class BankMasks(nn.Module):
    """forward(feat0..featL-1, bank) -> (B, n, g, g): per-layer nearest-bank-patch distances, z-normalised.

    The bank is the memory-bank scorer's (PatchEmbedder rows over all tapped layers); layer i uses
    its own columns only."""

    def __init__(self, dims: Sequence[int], strides: Sequence[int], image_size: int, layers: Sequence[int],
                 grid_stride: int = 8):
        super().__init__()
        self.embedder = PatchEmbedder(strides, image_size, grid_stride)
        self.grid = self.embedder.grid
        offsets = [0]
        for d in dims:
            offsets.append(offsets[-1] + int(d))
        self.slices = [(offsets[i], offsets[i + 1]) for i in layers]
        self.register_buffer("mean", torch.zeros(len(self.slices)))
        self.register_buffer("std", torch.ones(len(self.slices)))

    def raw(self, features: Sequence[torch.Tensor], bank: torch.Tensor) -> torch.Tensor:
        q = self.embedder.patches(features)
        maps = [nearest_distances(q[:, :, a:b], bank[:, a:b]).reshape(-1, self.grid, self.grid) for a, b in self.slices]
        return torch.stack(maps, dim=1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *features, bank = inputs
        return (self.raw(features, bank) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


@torch.no_grad()
def fit_mask_stats(masks: nn.Module, raw_maps: torch.Tensor) -> list[list[float]]:
    """Set the per-layer mean/std of a mask module from its raw maps (N, n, g, g) of NORMAL images."""
    x = raw_maps.double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    masks.mean.copy_(mean.float())
    masks.std.copy_(std.float())
    return [mean.tolist(), std.tolist()]


# --------------------------------------------------------------------------- TGE


class _Expert(nn.Module):
    """Attention block (a query from the global feature over the patch tokens) + FFN, then -> out_dim."""

    def __init__(self, width: int, heads: int, out_dim: int, ffn: int = 4):
        super().__init__()
        self.heads = int(heads)
        self.n1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.o = nn.Linear(width, width)
        self.n2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn * width), nn.GELU(), nn.Linear(ffn * width, width))
        self.out = nn.Linear(width, out_dim)

    def forward(self, glob: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, n, w = tokens.shape
        h, d = self.heads, w // self.heads
        q = self.q(self.n1(glob)).reshape(b, h, 1, d)
        k, v = self.kv(self.n1(tokens)).chunk(2, dim=-1)
        k = k.reshape(b, n, h, d).transpose(1, 2)
        v = v.reshape(b, n, h, d).transpose(1, 2)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
        x = glob + self.o(torch.matmul(att, v).reshape(b, w))
        x = x + self.ffn(self.n2(x))
        return self.out(x)


class TextGuidedEnhancer(nn.Module):
    """forward(feature (B, C_in, h, w)) -> image token (B, 1, out_dim); `gate(feature)` -> (B, 2).

    The references and the projection that puts the image feature in their space are frozen
    copies of the decoder's (`from_decoder`), so the exported graph needs no other input."""

    def __init__(self, in_dim: int, out_dim: int, *, ref_dim: int = 64, width: int = 128, heads: int = 4,
                 token_grid: int = 7, pool: int = 3):
        super().__init__()
        self.in_dim, self.out_dim, self.ref_dim = int(in_dim), int(out_dim), int(ref_dim)
        self.width, self.heads, self.token_grid, self.pool = int(width), int(heads), int(token_grid), int(pool)
        if self.width % self.heads:
            raise ScorerError(f"TGE width {width} must be a multiple of its {heads} heads")
        self.register_buffer("feat_mean", torch.zeros(self.in_dim))
        self.register_buffer("feat_std", torch.ones(self.in_dim))
        self.register_buffer("proj_weight", torch.randn(self.ref_dim, self.in_dim) / math.sqrt(self.in_dim))
        self.register_buffer("proj_bias", torch.zeros(self.ref_dim))
        self.register_buffer("references", torch.randn(2, self.ref_dim))
        self.gate_scale = nn.Parameter(torch.tensor(10.0))
        self.gate_bias = nn.Parameter(torch.zeros(2))
        self.inp = nn.Linear(self.in_dim, self.width)
        self.experts = nn.ModuleList(_Expert(self.width, self.heads, self.out_dim) for _ in range(2))

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "ref_dim": self.ref_dim, "width": self.width,
                "heads": self.heads, "token_grid": self.token_grid, "pool": self.pool}

    @classmethod
    def from_decoder(cls, decoder: VisualGuidedDecoder, layer: int, out_dim: int, **kwargs) -> "TextGuidedEnhancer":
        proj = decoder.projections[layer]
        if not isinstance(proj, nn.Conv2d):
            raise ScorerError(f"the TGE reuses the decoder's linear projection of layer {layer}; this decoder has "
                              f"{type(proj).__name__} there (train it with --hidden 0 and that layer in --layers)")
        tge = cls(decoder.dims[layer], out_dim, ref_dim=decoder.embed_dim, pool=decoder.pool, **kwargs)
        with torch.no_grad():
            tge.feat_mean.copy_(getattr(decoder, f"feat_mean{layer}"))
            tge.feat_std.copy_(getattr(decoder, f"feat_std{layer}"))
            tge.proj_weight.copy_(proj.weight.detach()[:, :, 0, 0])
            tge.proj_bias.copy_(proj.bias.detach())
            tge.references.copy_(decoder.references.detach())
        return tge

    def _prepare(self, f: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            f = F.avg_pool2d(f, self.pool, 1, self.pool // 2, count_include_pad=False)
        return (f - self.feat_mean.view(1, -1, 1, 1)) / self.feat_std.view(1, -1, 1, 1)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        g = F.linear(x.mean(dim=(2, 3)), self.proj_weight, self.proj_bias)
        sims = F.normalize(g, dim=-1) @ F.normalize(self.references, dim=-1).t()
        return torch.softmax(self.gate_scale * sims + self.gate_bias, dim=-1)

    def gate(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, 2) softmax weights of the [normal, abnormal] experts."""
        return self._gate(self._prepare(feature.float()))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = self._prepare(feature.float())
        w = self._gate(x)
        t = F.adaptive_avg_pool2d(x, self.token_grid) if x.shape[-1] != self.token_grid else x
        tokens = self.inp(t.flatten(2).transpose(1, 2))
        glob = tokens.mean(dim=1)
        out = w[:, 0:1] * self.experts[0](glob, tokens) + w[:, 1:2] * self.experts[1](glob, tokens)
        return out.unsqueeze(1)


# --------------------------------------------------------------------------- MMF


class CentroidLocator(nn.Module):
    """(B, n_maps, H, W) maps -> (B, 9) cell logits from a soft centroid of the hottest pixels.

    The 3x3 label is the cell of the largest defect region's centroid; the soft version: mix the
    maps (softmax weights), keep pixels above `t` of the way from the map's mean to its maximum
    (sigmoid of slope alpha, weighted by the excess), take their centroid, and score each cell by
    -kappa * squared distance from its centre (a Voronoi of the cell centres is the grid itself).
    Plus a presence logit from the hottest pixel: the centroid of a normal image's noise is near
    the centre, so without it every normal image would hand the LLM the word "center" (bottle: the
    LLM then answered "No" to real centre defects). Seven parameters, so what it learns on NSA
    samples carries over to real defects.
    """

    def __init__(self, n_maps: int, t: float = 0.6, alpha: float = 30.0, kappa: float = 30.0):
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(int(n_maps)))
        self.t = nn.Parameter(torch.tensor(float(t)))
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.log_kappa = nn.Parameter(torch.tensor(math.log(kappa)))
        # presence = scale * max(mixed map) + bias: whether there is anything to locate at all
        self.presence_log_scale = nn.Parameter(torch.tensor(0.0))
        self.presence_bias = nn.Parameter(torch.tensor(-3.0))
        c = (torch.arange(3, dtype=torch.float32) + 0.5) / 3
        self.register_buffer("centres", torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(9, 2))

    def _mixed(self, squashed: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(self.mix, 0).view(1, -1, 1, 1) * squashed).sum(1)  # (B, H, W)

    def presence(self, squashed: torch.Tensor) -> torch.Tensor:
        """(B,) logit that the maps hold a defect at all (from the hottest mixed pixel)."""
        return self.presence_log_scale.exp() * self._mixed(squashed).flatten(1).amax(1) + self.presence_bias

    def forward(self, squashed: torch.Tensor) -> torch.Tensor:
        x = self._mixed(squashed)
        b, h, w = x.shape
        f = x.reshape(b, h * w)
        lo = f.mean(1, keepdim=True)
        span = (f.amax(1, keepdim=True) - lo).clamp(min=1e-6)
        rel = (f - lo) / span
        sel = torch.sigmoid(self.log_alpha.exp() * (rel - self.t)) * rel.clamp(min=0.0)
        sel = (sel / sel.sum(1, keepdim=True).clamp(min=1e-9)).reshape(b, h, w)
        rows = (torch.arange(h, dtype=x.dtype) + 0.5) / h
        cols = (torch.arange(w, dtype=x.dtype) + 0.5) / w
        centroid = torch.stack([(sel.sum(2) * rows).sum(1), (sel.sum(1) * cols).sum(1)], 1)  # (B, 2) in [0, 1]
        return -self.log_kappa.exp() * ((centroid.unsqueeze(1) - self.centres.unsqueeze(0)) ** 2).sum(-1)


def _ds_block(cin: int, cout: int) -> nn.Sequential:
    """Depthwise-separable conv: depthwise 3x3 stride 2, pointwise 1x1, GELU."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, 2, 1, groups=cin), nn.Conv2d(cin, cout, 1), nn.GELU())


class MultiMaskFusion(nn.Module):
    """forward(masks (B, n_maps, H, W)) -> mask tokens (B, L1 + L3, out_dim), L1 = 9 (3 x 3 cells)."""

    SIZE = 24  # 24 -> 12 -> 6 -> 3
    # The locator's logits are calibrated for its cross-entropy (p(cell) ~0.6-0.9) and its presence
    # for its binary cross-entropy; x1000 makes both softmax and sigmoid a one-hot choice (the same
    # two ops in ONNX), so the words are exactly the LLM's embeddings of the chosen cell's words or
    # of NONE_WORD. Why hard: a soft mix hands every normal image a faint "center" (the centroid of
    # noise), which the LLM learned to read as "No". Continuing older checkpoints it was not better
    # (README history: soft 63.5/63.5 %, hard 60.3/52.4 %); trained from scratch with it (checkpoints
    # C and D) position reached 70-75 %. The locator learns from its own losses
    # (`bridge_train.train_locator`, `_position_loss`).
    WORD_SHARPEN = 1000.0

    def __init__(self, n_maps: int, out_dim: int, *, base_tokens: int = 2, channels: Sequence[int] = (16, 32, 64),
                 summary: Union[bool, str] = "words", locate: str = "centroid"):
        super().__init__()
        self.n_maps, self.out_dim, self.base_tokens = int(n_maps), int(out_dim), int(base_tokens)
        if summary not in (False, True, "mlp", "words"):
            raise ScorerError(f"MMF summary must be False, 'mlp' or 'words', got {summary!r}")
        self.summary = "mlp" if summary is True else summary
        if locate not in ("centroid", "linear"):
            raise ScorerError(f"MMF locate must be 'centroid' or 'linear', got {locate!r}")
        self.locate = locate
        self.channels = tuple(int(c) for c in channels)
        if self.out_dim % self.n_maps:
            raise ScorerError(f"MMF: the LLM width {out_dim} must split evenly over the {n_maps} maps")
        c0, c1, c2 = self.channels
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(1, c0, 3, 2, 1), nn.GELU(), _ds_block(c0, c1), _ds_block(c1, c2))
                                    for _ in range(self.n_maps))
        self.proj = nn.ModuleList(nn.Linear(c2, self.out_dim // self.n_maps) for _ in range(self.n_maps))
        self.pos = nn.Parameter(torch.zeros(9, self.out_dim))
        self.base = nn.Parameter(torch.randn(self.base_tokens, self.out_dim) * 0.02)
        if self.summary == "mlp":  # one token computed from ALL cells of all maps: "where is it", as one vector
            self.head = nn.Sequential(nn.Linear(self.n_maps * 9 * c2, 256), nn.GELU(), nn.Linear(256, self.out_dim))
        elif self.summary == "words":  # p(cell) over the 9 cells -> the expected embedding of its position words
            self.where = (CentroidLocator(self.n_maps) if locate == "centroid"
                          else nn.Linear(self.n_maps * 9 * c2, 9))
            rows = 10 if locate == "centroid" else 9  # + the NONE_WORD row
            self.register_buffer("word_embeds", torch.zeros(rows, WORD_SLOTS, self.out_dim))

    @property
    def n_tokens(self) -> int:
        extra = {False: 0, "mlp": 1, "words": WORD_SLOTS}[self.summary]
        return 9 + extra + self.base_tokens

    def set_position_words(self, embeds: torch.Tensor) -> None:
        """(9 or 10, WORD_SLOTS, C) input embeddings of each cell's position words as they continue
        the answer (" top", " left" / " center", "."), row-major like the cells; the centroid
        locator's tenth row: NONE_WORD's (" none", ".")."""
        if self.summary != "words":
            raise ScorerError("only an MMF with summary='words' reads position-word embeddings")
        self.word_embeds.copy_(embeds.detach().reshape(self.word_embeds.shape))

    def _squash(self, masks: torch.Tensor) -> torch.Tensor:
        if masks.shape[1] != self.n_maps:
            raise ScorerError(f"MMF expects {self.n_maps} maps, got {masks.shape[1]}")
        m = masks.float()  # asinh, written out: the TorchScript ONNX exporter has no aten::asinh
        return torch.sign(m) * torch.log(m.abs() + torch.sqrt(m * m + 1.0))

    def _cells(self, squashed: torch.Tensor) -> list[torch.Tensor]:
        x = squashed
        if x.shape[-1] != self.SIZE or x.shape[-2] != self.SIZE:
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False)
        return [self.blocks[i](x[:, i:i + 1]).flatten(2).transpose(1, 2) for i in range(self.n_maps)]  # (B, 9, c2)

    def _where(self, squashed: torch.Tensor, cells: list[torch.Tensor]) -> torch.Tensor:
        if self.locate == "centroid":
            return self.where(squashed)
        return self.where(torch.cat([c.flatten(1) for c in cells], dim=1))

    def where_logits(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 9) cell logits of the 'words' summary (trained with an auxiliary position loss)."""
        x = self._squash(masks)
        return self._where(x, [] if self.locate == "centroid" else self._cells(x))

    def presence_logits(self, masks: torch.Tensor) -> Optional[torch.Tensor]:
        """(B,) logit that there is a defect to name (the centroid locator's), None for 'linear'."""
        return self.where.presence(self._squash(masks)) if self.locate == "centroid" else None

    def config(self) -> dict:
        return {"n_maps": self.n_maps, "out_dim": self.out_dim, "base_tokens": self.base_tokens,
                "channels": list(self.channels), "summary": self.summary, "locate": self.locate}

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        squashed = self._squash(masks)
        cells = self._cells(squashed)
        tokens = torch.cat([self.proj[i](c) for i, c in enumerate(cells)], dim=-1) + self.pos
        out = [tokens]
        if self.summary == "mlp":
            out.append(self.head(torch.cat([c.flatten(1) for c in cells], dim=1)).unsqueeze(1))
        elif self.summary == "words":
            if self.locate == "centroid":  # the literal words of the chosen cell, or of NONE_WORD
                p = torch.softmax(self.WORD_SHARPEN * self.where(squashed), dim=-1)  # (B, 9), one-hot in effect
                present = torch.sigmoid(self.WORD_SHARPEN * self.where.presence(squashed)).unsqueeze(1)
                p = torch.cat([p * present, 1.0 - present], dim=1)  # (B, 10)
            else:
                p = torch.softmax(self._where(squashed, cells), dim=-1)
            out.append((p @ self.word_embeds.flatten(1)).view(-1, WORD_SLOTS, self.out_dim))
        out.append(self.base.unsqueeze(0).expand(tokens.shape[0], -1, -1))
        return torch.cat(out, dim=1)


# --------------------------------------------------------------------------- the LLM side


class BridgeLM(nn.Module):
    """TGE + MMF + a frozen causal LM (transformers) that reads their tokens as input embeddings.

    `encode(text) -> ids` must be the tokenizer the runtime uses (`tokenizers` on tokenizer.json),
    so that the torch and ONNX routes see the same token ids."""

    def __init__(self, llm: nn.Module, encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str],
                 tge: TextGuidedEnhancer, mmf: MultiMaskFusion, eos_ids: Sequence[int]):
        super().__init__()
        self.llm = llm.eval()
        for p in self.llm.parameters():
            p.requires_grad_(False)
        self.encode, self.decode = encode, decode
        self.tge, self.mmf = tge, mmf
        self.eos_ids = [int(i) for i in eos_ids]
        self.end_id = self.eos_ids[0]
        self.register_buffer("head_ids", torch.tensor(encode(PROMPT_HEAD), dtype=torch.long), persistent=False)
        self.register_buffer("tail_ids", torch.tensor(encode(PROMPT_TAIL), dtype=torch.long), persistent=False)
        self.answer_head_ids = encode(YES_ANSWER.split("{position}")[0].rstrip())  # "Yes, ..., at the"
        self.choices = answer_choices()
        self.choice_ids = [encode(a) + [self.end_id] for a in self.choices]  # what `choose` scores
        hidden = int(self.llm.get_input_embeddings().weight.shape[1])
        if tge.out_dim != hidden or mmf.out_dim != hidden:
            raise ScorerError(f"TGE/MMF width {tge.out_dim}/{mmf.out_dim} != the LLM's hidden size {hidden}")
        if mmf.summary == "words" and not bool(mmf.word_embeds.abs().sum()):
            words = list(POSITION_WORDS) + ([NONE_WORD] if mmf.word_embeds.shape[0] == 10 else [])
            with torch.no_grad():
                mmf.set_position_words(self.embed(torch.tensor(
                    [position_word_ids(encode, w) for w in words], dtype=torch.long)))

    def train(self, mode: bool = True) -> "BridgeLM":
        super().train(mode)
        self.llm.eval()  # frozen: no dropout ever
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def prompt_embeds(self, feature: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        b = feature.shape[0]
        head = self.embed(self.head_ids).unsqueeze(0).expand(b, -1, -1)
        tail = self.embed(self.tail_ids).unsqueeze(0).expand(b, -1, -1)
        return torch.cat([head, self.tge(feature), self.mmf(masks), tail], dim=1)

    def loss(self, feature: torch.Tensor, masks: torch.Tensor, answers: Sequence[str],
             position_weight: float = 1.0) -> torch.Tensor:
        """Cross-entropy on the answer tokens (+ the end-of-turn token) only, teacher-forced; the
        tokens after "..., at the" of a Yes answer (the position words) count `position_weight`
        times (the position is 1-2 of ~15 answer tokens: unweighted it is a small share of the loss).
        Answers are right-padded: with causal attention padding never affects earlier positions."""
        ids = [self.encode(a) + [self.end_id] for a in answers]
        ce, target = self._answer_nll(self.prompt_embeds(feature, masks), ids)
        weight = (target != -100).float()
        if position_weight != 1.0:
            head = self.answer_head_ids
            for r, row in enumerate(ids):
                if row[:len(head)] == head:
                    weight[r, len(head):len(row)] *= float(position_weight)
        return (ce * weight).sum() / weight.sum().clamp(min=1.0)

    def _answer_nll(self, prompt: torch.Tensor, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token negative log-likelihood (B, n) of answer token ids after each prompt row,
        teacher-forced, and the (B, n) targets (-100 = padding)."""
        n = max(len(i) for i in ids)
        target = torch.full((len(ids), n), -100, dtype=torch.long, device=prompt.device)
        inp = torch.full((len(ids), n), self.end_id, dtype=torch.long, device=prompt.device)
        for r, row in enumerate(ids):
            target[r, :len(row)] = torch.tensor(row)
            inp[r, :len(row)] = torch.tensor(row)
        x = torch.cat([prompt, self.embed(inp)], dim=1)
        hidden = self.llm.model(inputs_embeds=x).last_hidden_state
        t0 = prompt.shape[1]
        logits = self.llm.lm_head(hidden[:, t0 - 1:t0 - 1 + n])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100,
                             reduction="none").view(len(ids), n)
        return ce, target

    @torch.no_grad()
    def choose(self, feature: torch.Tensor, masks: torch.Tensor) -> list[str]:
        """Closed-set answers: per image, the most likely of the ten template answers (`answer_choices`:
        "No, ..." or "Yes, ... at the {position}." for each 3x3 cell), by the summed log-probability of
        all answer tokens and the end-of-turn token. Deterministic like greedy decoding, but the answer
        is always well formed (greedy text can drift, e.g. "Yes, there is no anomaly")."""
        prompt = self.prompt_embeds(feature, masks)
        b, k = prompt.shape[0], len(self.choices)
        nll, _ = self._answer_nll(prompt.repeat_interleave(k, dim=0), self.choice_ids * b)
        best = nll.sum(dim=1).view(b, k).argmin(dim=1)
        return [self.choices[int(i)] for i in best]

    @torch.no_grad()
    def generate(self, feature: torch.Tensor, masks: torch.Tensor, max_new_tokens: int = 24) -> list[str]:
        """Greedy answers (never sampled), batched over images."""
        x = self.prompt_embeds(feature, masks)
        out = self.llm(inputs_embeds=x, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1]
        b = x.shape[0]
        tokens: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        eos = torch.tensor(self.eos_ids)
        for _ in range(max_new_tokens):
            nxt = logits.argmax(dim=-1)
            done |= torch.isin(nxt, eos)
            for r in range(b):
                if not done[r]:
                    tokens[r].append(int(nxt[r]))
            if bool(done.all()):
                break
            out = self.llm(inputs_embeds=self.embed(nxt[:, None]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return [self.decode(t).strip() for t in tokens]
