"""Self-supervised training of the visual-guided decoder on NSA anomalies (IAD-GPT stage 2, map part).

The backbone is frozen, so its features are computed ONCE: a fixed, seeded pool of NSA samples
(and the normal images they were pasted on, with the 8 rotations/flips when `augment`) is
synthesized and encoded up front, kept as float16, and the small decoder then trains for many
steps on those cached features. On 2 CPU cores this turns minutes per epoch of backbone passes
into a one-off encode (about 60 ms per image at 224 px, batches of 32) plus ~50 ms per step.
bottle (209 images): pool 174 s + 1000 steps 50 s on 2 lightly loaded cores.

Each batch pairs normal images (target: no anomaly) with NSA versions of the same images (target:
the binary mask label > 0.3), as the paper pairs "No" and "Yes" answers. Loss: focal (gamma 2) +
dice on every layer's map, at `loss_size` px (the maps are upsampled logits, so a loss at half the
image size sees the same information for a quarter of the cost).

Checkpoints are safetensors (no pickle): decoder weights, Adam state, and JSON metadata (configs,
step, backbone, category, loss history). Batches are drawn from `default_rng([seed, 1, step])` and the
pool from `seed`, so a resumed run follows the same trajectory as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, Union

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from ..data import load_split, read_image
from ..errors import DataError, EngineError, ScorerError
from ..runtime.preprocess import resize_frame
from ..signals import StepBoundary, StopAfterStep, interrupts_between_steps
from .backbones import Backbone, get_backbone
from .heads import STORED_STATE_ERRORS, VisualGuidedDecoder, decoder_loss, feature_stats
from .synth import MASK_THRESHOLD, NSASynthesizer, config_for, guess_kind

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "FeaturePool", "TrainResult", "build_pool", "train_decoder", "train",
           "save_checkpoint", "load_checkpoint", "load_decoder", "CHECKPOINT_FORMAT", "optimizer_tensors",
           "optimizer_state"]

CHECKPOINT_FORMAT = "iadgpt-decoder/1"
# Tapped layers the decoder reads by default, per backbone (others: all). EfficientNet-Lite0's
# stride-4 tap has 24 channels of edges and colour: alone it scores bottle I-AUROC 88 / P-AUROC 85,
# and averaged in it pulls the decoder from 99.5 / 96.9 (stride 8 + 16) down to 94.9 / 91.6.
DEFAULT_LAYERS = {"efficientnet-lite0": [1, 2]}
PathLike = Union[str, os.PathLike]
# Settings that shape the pool or the model: a resumed run must use the same ones.
_FIXED_ON_RESUME = ("batch_size", "pool_size", "augment", "embed_dim", "pool", "hidden", "layers", "loss_size", "kind",
                    "colour", "seed", "lr", "weight_decay")


# Smallest valid value of TrainConfig's integer settings and the ranges of its float ones (low, high, low excluded).
_INT_MINIMA = {"steps": 1, "batch_size": 1, "pool_size": 1, "embed_dim": 1, "pool": 1, "hidden": 0, "loss_size": 1,
               "seed": 0, "checkpoint_every": 1, "log_every": 1}
_FLOAT_RANGES = {"lr": (0.0, None, True), "weight_decay": (0.0, None, False), "colour": (0.0, 1.0, False)}
_FLAGS = {"colour": "--nsa-colour", "pool": "TrainConfig.pool", "loss_size": "TrainConfig.loss_size",
          "log_every": "TrainConfig.log_every"}  # fields whose CLI flag is not --<field> (or that have none)


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


_Config = TypeVar("_Config", bound="ConfigRecord")


class ConfigRecord:
    """JSON round trip of a training config dataclass, as checkpoints store it: keys this version
    does not know (a checkpoint from another version) are dropped, missing ones take defaults."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses

    @classmethod
    def from_dict(cls: type[_Config], data: dict) -> _Config:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainConfig(ConfigRecord):
    """Everything that defines a training run (the CLI flags mirror these)."""

    steps: int = 1000
    batch_size: int = 16  # half normal images, half their NSA versions
    lr: float = 5e-4  # IAD-GPT's learning rate; cosine decay to 10 % after a 50-step warm-up
    weight_decay: float = 1e-4
    pool_size: int = 1600  # NSA samples synthesized and encoded once
    augment: bool = True  # the 8 rotations/flips of the normal images (and so of the NSA samples)
    embed_dim: int = 64
    pool: int = 3
    hidden: int = 0
    layers: Optional[list[int]] = None  # tapped layers the decoder reads; None = DEFAULT_LAYERS or all
    loss_size: int = 112
    kind: str = "auto"  # NSA product kind: object | texture | auto
    colour: float = 0.0  # share of NSA patches that are colour changes in place instead of pastes (synth.py)
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 100  # steps per loss-history entry

    def __post_init__(self) -> None:
        # Refuse nonsense here, before the backbone and the pool (minutes) are built: 0 steps would
        # write an untrained checkpoint, 0 pool samples or checkpoint_every 0 crash only after the pool.
        for name, low in _INT_MINIMA.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ScorerError(f"{_flag(name)} {value!r}: give an integer >= {low}")
            setattr(self, name, int(value))  # numpy integers would not survive json.dumps in the checkpoint
        for name, (low, high, low_open) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < low or (low_open and value == low) or (high is not None and value > high):
                where = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
                raise ScorerError(f"{_flag(name)} {value!r}: give a finite number {where}")
            setattr(self, name, float(value))
        if self.kind not in ("auto", "object", "texture"):
            raise ScorerError(f"--kind {self.kind!r}: use auto, object or texture")
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})  # JSON-stable, for the resume check



@dataclass
class FeaturePool:
    """Cached backbone features of normal images and NSA samples, float16, already through the
    decoder's fixed part (`VisualGuidedDecoder.prepare`: neighbourhood mean, then standardisation
    by `mean`/`std` of the normal features), and NSA labels at loss size."""

    normal: list[torch.Tensor]  # per layer (Nn, C, h, w)
    synth: list[torch.Tensor]  # per layer (Ns, C, h, w)
    labels: torch.Tensor  # (Ns, S, S) float16 soft labels
    pair: torch.Tensor  # (Ns,) index into `normal` of the image each NSA sample was pasted on
    kind: str
    local_pool: int = 1  # the neighbourhood mean already applied (TrainConfig.pool)
    mean: list[torch.Tensor] = field(default_factory=list)  # per layer (C,): the standardisation applied
    std: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class TrainResult:
    decoder: VisualGuidedDecoder
    checkpoint: Path
    step: int
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last entry)
    pool_seconds: float = 0.0
    train_seconds: float = 0.0


# --------------------------------------------------------------------------- data


def load_images(data: PathLike, category: str, size: int) -> list[np.ndarray]:
    """The normal training images of `category`, RGB uint8 at `size` (the encoder's input size)."""
    from ..bundle import InputSpec
    samples = load_split(data, category, "train")
    if not samples:
        raise DataError(f"{data}/{category}: no training images")
    spec = InputSpec((size, size), (0.0,) * 3, (1.0,) * 3, resize="area")
    return [resize_frame(read_image(s.path), spec) for s in samples]


def d4(image: np.ndarray, g: int) -> np.ndarray:
    """Element g (0..7) of the rotation/flip group: rot90 by g // 2, then a horizontal flip if g is odd."""
    out = np.rot90(image, g // 2)
    if g % 2:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _encode(backbone: Backbone, images: Sequence[np.ndarray], device: torch.device, batch: int = 32,
            progress: bool = False, desc: str = "encoding", pool: int = 1) -> list[torch.Tensor]:
    """float16 features (one (N, C, h, w) tensor per layer) of RGB uint8 images, after the
    decoder's fixed `pool` x `pool` neighbourhood mean (so that training does not redo it)."""
    outs: list[list[torch.Tensor]] = []
    steps = range(0, len(images), batch)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=desc, unit="batch", leave=False)
    with torch.inference_mode():
        for i in steps:
            x = torch.from_numpy(np.stack(images[i:i + batch]).transpose(0, 3, 1, 2).astype(np.float32)).to(device)
            feats = backbone(x)
            if pool > 1:
                feats = [F.avg_pool2d(f, pool, 1, pool // 2, count_include_pad=False) for f in feats]
            outs.append([f.half() for f in feats])
    return [torch.cat([o[layer] for o in outs]) for layer in range(len(outs[0]))]


def build_pool(backbone: Backbone, images: Sequence[np.ndarray], cfg: TrainConfig, device: Union[str, torch.device] = "cpu",
               progress: bool = True) -> FeaturePool:
    """Synthesize `cfg.pool_size` NSA samples (deterministic in cfg.seed) and encode them with their normals."""
    t0 = time.perf_counter()
    device = torch.device(device)
    kind = guess_kind(images) if cfg.kind == "auto" else cfg.kind
    synth = NSASynthesizer(images, config=config_for(kind, colour=cfg.colour))
    groups = 8 if cfg.augment else 1
    rng = np.random.default_rng([cfg.seed, 7])
    n = len(images)
    synth_images, labels, keys = [], [], []
    items = range(cfg.pool_size)
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="NSA synthesis", unit="img", leave=False)
    for k in items:
        t = k % n
        g = int(rng.integers(groups))
        s = synth.sample(k, seed=cfg.seed, target=t)
        synth_images.append(d4(s.image, g))
        lab = cv2.resize(d4(s.label, g), (cfg.loss_size, cfg.loss_size), interpolation=cv2.INTER_AREA)
        labels.append(lab)
        keys.append((t, g))
    unique = sorted(set(keys))
    index = {key: i for i, key in enumerate(unique)}
    normal_images = [d4(images[t], g) for t, g in unique]
    log.info("pool: %d NSA samples (%s) on %d normal views of %d images", cfg.pool_size, kind, len(unique), n)
    normal = _encode(backbone, normal_images, device, progress=progress, desc="encoding normals", pool=cfg.pool)
    synth_feats = _encode(backbone, synth_images, device, progress=progress, desc="encoding NSA samples",
                          pool=cfg.pool)
    mean, std = feature_stats(normal)
    for feats in (normal, synth_feats):
        for f, m, sd in zip(feats, mean, std):
            for start in range(0, len(f), 256):  # in place, in chunks: no float32 copy of the pool
                chunk = f[start:start + 256]
                chunk.copy_((chunk.float() - m.view(1, -1, 1, 1)) / sd.view(1, -1, 1, 1))
    pool = FeaturePool(normal=normal, synth=synth_feats,
                       labels=torch.from_numpy(np.stack(labels)).half().to(device),
                       pair=torch.tensor([index[key] for key in keys], dtype=torch.long, device=device),
                       kind=kind, local_pool=cfg.pool, mean=mean, std=std, seconds=time.perf_counter() - t0)
    mb = sum(f.numel() * 2 for f in normal + synth_feats) / 2 ** 20
    log.info("pool ready in %.1f s (%.0f MiB of cached features)", pool.seconds, mb)
    return pool


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: PathLike, decoder: VisualGuidedDecoder, optimizer: Optional[torch.optim.Optimizer],
                    step: int, meta: dict) -> Path:
    """Write decoder weights (+ Adam state) as safetensors, atomically; metadata as JSON strings."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {f"decoder.{k}": v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    groups: list[dict] = []
    if optimizer is not None:
        opt_tensors, groups = optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(int(step)),
                "decoder_config": json.dumps(decoder.config()), "optimizer_groups": json.dumps(groups),
                **{k: json.dumps(v) for k, v in meta.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata with JSON values decoded); refuses files that are not decoder checkpoints."""
    return read_checkpoint(Path(path), CHECKPOINT_FORMAT, "decoder", "iadgpt train")


def read_checkpoint(path: Path, fmt: str, what: str, command: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata with JSON values decoded) of a safetensors checkpoint of format `fmt`; the
    errors name the checkpoint (`what`) and the `command` that makes one."""
    from safetensors import safe_open
    if not path.is_file():
        raise ScorerError(f"{path}: no such {what} checkpoint; train one with `{command} --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - header garbage, truncated file, a pickle renamed .safetensors
        raise ScorerError(f"{path}: not a readable safetensors checkpoint ({exc}); re-run `{command}`") from exc
    if raw.get("format") != fmt:
        raise ScorerError(f"{path}: not an iadgpt {what} checkpoint (format {raw.get('format')!r}, "
                          f"expected {fmt!r}); train one with `{command}`")
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def load_decoder(path: PathLike) -> tuple[VisualGuidedDecoder, dict[str, Any]]:
    """The trained decoder (eval mode) and the checkpoint's metadata."""
    tensors, meta = load_checkpoint(path)
    state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    try:
        return VisualGuidedDecoder.from_state(meta["decoder_config"], state), meta
    except STORED_STATE_ERRORS as exc:
        raise ScorerError(f"{path}: the checkpoint's decoder config and weights do not fit together "
                          f"({type(exc).__name__}: {str(exc)[:200]}); re-run `iadgpt train`") from exc


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """The optimizer's state as `optimizer.<param>.<key>` tensors (safetensors holds no pickle) and
    its param groups (JSON); `optimizer_state` turns them back into a state dict."""
    state = optimizer.state_dict()
    tensors = {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- training


def _lr_at(step: int, cfg: TrainConfig) -> float:
    warm = min(50, max(1, cfg.steps // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def _batch(pool: FeaturePool, idx: torch.Tensor, loss_size: int,
           layers: Sequence[int]) -> tuple[list[Optional[torch.Tensor]], torch.Tensor]:
    pairs = pool.pair[idx]
    feats = [torch.cat([n[pairs], s[idx]]).float() if i in layers else None
             for i, (n, s) in enumerate(zip(pool.normal, pool.synth))]
    target = torch.cat([torch.zeros((len(idx), loss_size, loss_size), device=pool.labels.device),
                        (pool.labels[idx].float() > MASK_THRESHOLD).float()])
    return feats, target


def train_decoder(backbone: Backbone, images: Sequence[np.ndarray], out: PathLike, cfg: Optional[TrainConfig] = None, *,
                  device: Union[str, torch.device] = "cpu", resume: bool = False, meta: Optional[dict] = None,
                  references: Optional[torch.Tensor] = None, pool: Optional[FeaturePool] = None,
                  progress: bool = True) -> TrainResult:
    """Train (or resume) a decoder for `backbone` on NSA samples of `images` (RGB uint8 at the input size)."""
    cfg = cfg or TrainConfig()
    out = Path(out)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda but torch sees no CUDA GPU here; use --device cpu")
    size = int(backbone.input_spec.size[0])
    if any(im.shape[:2] != (size, size) for im in images):
        raise DataError(f"training images must be resized to the backbone input {size}x{size} (train.load_images)")
    meta = dict(meta or {})
    meta.update({"backbone": backbone.describe(), "train_config": cfg.to_dict()})

    if cfg.layers is None and backbone.name in DEFAULT_LAYERS:
        cfg = replace(cfg, layers=list(DEFAULT_LAYERS[backbone.name]))
        log.info("decoder reads tapped layers %s of %s (DEFAULT_LAYERS)", cfg.layers, backbone.name)
    meta["train_config"] = cfg.to_dict()
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        decoder = VisualGuidedDecoder.for_backbone(backbone, references=references, embed_dim=cfg.embed_dim,
                                                   pool=cfg.pool, hidden=cfg.hidden, layers=cfg.layers)
    start, history, window = 0, [], None
    tensors: Optional[dict] = None
    if resume and out.exists():
        tensors, old = load_checkpoint(out)
        _check_resume(out, old, meta, cfg)
        start = int(old["step"])
        history = [tuple(h) for h in old.get("history", [])]
        window = old.get("loss_window")
        decoder.load_state_dict({k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")})
        log.info("resuming %s at step %d of %d", out, start, cfg.steps)
    elif out.exists() and not resume:
        raise ScorerError(f"{out} exists; pass --resume to continue its training, or choose another --out")
    elif resume:
        log.warning("--resume: there is no run in %s to continue; starting a new one", out)
    decoder.to(device)

    if pool is None:
        pool = build_pool(backbone.to(device), images, cfg, device=device, progress=progress)
    if pool.local_pool != cfg.pool:
        raise ScorerError(f"the feature pool was cached with pool={pool.local_pool}, the config says {cfg.pool}; "
                          "rebuild it with build_pool(backbone, images, cfg)")
    meta["nsa_kind"] = pool.kind
    if tensors is None:
        decoder.set_feature_stats(mean=pool.mean, std=pool.std)
    opt = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    if tensors is not None and any(k.startswith("optimizer.") for k in tensors):
        opt.load_state_dict(optimizer_state(tensors, old["optimizer_groups"]))

    t0 = time.perf_counter()
    decoder.train()
    steps = range(start, cfg.steps)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(steps, desc="training decoder", unit="step", initial=0, total=cfg.steps - start)
        steps = bar
    # steps completed / in `out`, and the loss window not logged yet (a resumed run logs what an unstopped one would)
    state = {"step": start, "saved": start if tensors is not None else None, "window": _window(window)}
    try:
        with interrupts_between_steps() as boundary:  # a service stop saves the exact step, not the last periodic one
            _loop(decoder, opt, pool, cfg, steps, bar, history, out, meta, t0, state, boundary)
    except StopAfterStep:
        log.warning("interrupted: saving step %d to %s (continue with --resume)", state["step"], out)
        _save(out, decoder, opt, state["step"], meta, history, pool, time.perf_counter() - t0, state["window"])
        raise
    except KeyboardInterrupt:
        log.warning("stopped mid-step: %s", "nothing saved yet" if state["saved"] is None else
                    f"{out} holds step {state['saved']} (continue with --resume)")
        raise
    step = max(state["step"], cfg.steps)
    train_seconds = time.perf_counter() - t0
    decoder.eval()
    _save(out, decoder, opt, step, meta, history, pool, train_seconds)
    log.info("trained %d steps in %.1f s (+ %.1f s pool); checkpoint %s", step - start, train_seconds, pool.seconds, out)
    if boundary.requested:  # it came during the last step: the checkpoint is complete, and the caller still stops
        log.warning("%s during the last step: %s is finished; stopping", boundary.requested, out)
        raise StopAfterStep(boundary.requested)
    return TrainResult(decoder=decoder, checkpoint=out, step=step, history=history,
                       pool_seconds=pool.seconds, train_seconds=train_seconds)


def _loop(decoder: VisualGuidedDecoder, opt, pool: FeaturePool, cfg: TrainConfig, steps, bar, history: list,
          out: Path, meta: dict, t0: float, state: dict, boundary: StepBoundary) -> None:
    device = pool.labels.device
    half = max(1, cfg.batch_size // 2)
    running, count = state["window"]
    for step in steps:
        rng = np.random.default_rng([cfg.seed, 1, step])
        idx = torch.from_numpy(rng.choice(len(pool), size=min(half, len(pool)), replace=False)).to(device)
        feats, target = _batch(pool, idx, cfg.loss_size, decoder.layers)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        loss = decoder_loss(decoder.layer_logits(feats, cfg.loss_size, prepared=True), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        count += 1
        if bar is not None and count % 10 == 0:
            bar.set_postfix(loss=f"{running / count:.4f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            history.append((done, running / count))
            log.debug("step %d loss %.4f", done, running / count)
            running, count = 0.0, 0
        state["step"], state["window"] = done, (running, count)
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save(out, decoder, opt, done, meta, history, pool, time.perf_counter() - t0, state["window"])
            state["saved"] = done
        if done < cfg.steps:
            boundary.check()


def _window(stored: Any) -> tuple[float, int]:
    """(sum, count) of the losses since the last history entry, as a checkpoint stored them (older ones: none)."""
    if isinstance(stored, list) and len(stored) == 2 and isinstance(stored[0], (int, float)) \
            and math.isfinite(stored[0]) and isinstance(stored[1], int) and stored[1] >= 0:
        return float(stored[0]), stored[1]
    return 0.0, 0


def _save(out: Path, decoder, opt, step: int, meta: dict, history, pool: FeaturePool, seconds: float,
          window: tuple = (0.0, 0)) -> None:
    m = dict(meta)
    m.update({"history": [list(h) for h in history], "pool_seconds": round(pool.seconds, 2),
              "train_seconds": round(seconds, 2), "loss_window": [float(window[0]), int(window[1])]})
    save_checkpoint(out, decoder, opt, step, m)


def _check_resume(path: Path, old: dict, meta: dict, cfg: TrainConfig) -> None:
    old_cfg = old.get("train_config", {})
    diff = [k for k in _FIXED_ON_RESUME if k in old_cfg and old_cfg[k] != getattr(cfg, k)]
    if diff:
        raise ScorerError(f"{path} was trained with {', '.join(f'{k}={old_cfg[k]!r}' for k in diff)}; resume with the "
                         "same settings (only --steps may change) or train a new --out")
    for key in ("category",):
        if key in meta and old.get(key) not in (None, meta[key]):
            raise ScorerError(f"{path} was trained on {key} {old.get(key)!r}, not {meta[key]!r}; choose another --out")
    if old.get("backbone", {}).get("name") != meta["backbone"]["name"]:
        raise ScorerError(f"{path} was trained for backbone {old.get('backbone', {}).get('name')!r}, not "
                         f"{meta['backbone']['name']!r}; pass that --backbone or train a new --out")
    # the feature pool is rebuilt on resume: other pixels or other images would train one decoder on two
    # pools and the rewritten metadata would hide it
    old_size = (old.get("backbone", {}).get("input_spec") or {}).get("size")
    new_size = (meta["backbone"].get("input_spec") or {}).get("size")
    if old_size is not None and new_size is not None and list(old_size) != list(new_size):
        raise ScorerError(f"{path} was trained at {old_size[0]} px, not {new_size[0]}; resume with --resolution "
                         f"{old_size[0]} or train a new --out")
    if old.get("n_train_images") not in (None, meta.get("n_train_images")):
        raise ScorerError(f"{path} was trained on {old['n_train_images']} images of {old.get('data')!r}, this run "
                         f"has {meta.get('n_train_images')} in {meta.get('data')!r}; resume on the same images or "
                         "train a new --out")
    if int(old["step"]) > cfg.steps:
        raise ScorerError(f"{path} is already at step {old['step']}, past --steps {cfg.steps}; pass a larger --steps")


def train(data: PathLike, category: str, out: PathLike, backbone: str = "efficientnet-lite0", *,
          weights: Optional[str] = None, resolution: Optional[int] = None, device: str = "cpu", resume: bool = False,
          threads: Optional[int] = None, progress: bool = True, **config: Any) -> TrainResult:
    """`iadgpt train`: decoder for `backbone` on `data`/`category` train/good images, saved at `out`.

    `threads`: torch intra-op threads (None: torch's default, one per core)."""
    cfg = TrainConfig(**config)
    if threads:
        torch.set_num_threads(int(threads))
    kwargs = {"size": resolution} if resolution else {}
    bb = get_backbone(backbone, weights=weights, **kwargs)
    size = int(bb.input_spec.size[0])
    images = load_images(data, category, size)
    references = None
    if getattr(bb, "has_text", False):
        from .prompts import load_prompts, text_embeddings
        references = text_embeddings(bb, load_prompts(category))
        log.info("decoder references: text embeddings of the %s prompts", category)
    meta = {"category": category, "data": str(data), "n_train_images": len(images)}
    return train_decoder(bb, images, out, cfg, device=device, resume=resume, meta=meta, references=references,
                         progress=progress)
