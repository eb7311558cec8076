"""`iadgpt train`: self-supervised training of the visual-guided decoder on NSA anomalies (--stage decoder,
the default) or of the IAD-GPT bridge (TGE + MMF in front of the frozen LLM) on top of a trained decoder
(--stage bridge --decoder CKPT)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    # Defaults live in models.train.TrainConfig (None = its default; torch is not imported for --help).
    p = sub.add_parser("train", help="train the visual-guided decoder (or, --stage bridge, the IAD-GPT bridge) on NSA "
                                     "anomalies of train/good images")
    p.add_argument("--stage", choices=("decoder", "bridge"), default="decoder",
                   help="decoder: the visual-guided decoder; bridge: TGE + MMF for the frozen LLM (needs --decoder)")
    p.add_argument("--decoder", type=Path, default=None, help="bridge stage: the trained decoder checkpoint")
    p.add_argument("--init", type=Path, default=None,
                   help="bridge stage: a new run's TGE/MMF start from this finished bridge checkpoint")
    p.add_argument("--stage-steps", default=None, help="bridge stage: steps of the TGE, MMF, TGE+MMF stages [30,300,60]")
    p.add_argument("--locate", choices=("centroid", "linear"), default=None,
                   help="bridge stage: MMF's cell choice for the position words [centroid] (models/bridge.py)")
    p.add_argument("--answer-position-weight", type=float, default=None,
                   help="bridge stage: LM loss weight of the position words in Yes answers [5]")
    p.add_argument("--data", required=True, type=Path, help="dataset root holding <category>/train/good")
    p.add_argument("--category", required=True)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--weights", default=None, help="local weights directory (CLIP) or file")
    p.add_argument("--resolution", type=int, default=None, help="input size in px (default: the backbone's)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (.safetensors)")
    p.add_argument("--steps", type=int, default=None, help="[1000] total optimisation steps (a resumed run counts on)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="[16; bridge 8] half normal images, half their NSA versions")
    p.add_argument("--lr", type=float, default=None, help="[5e-4; bridge 2e-3]")
    p.add_argument("--weight-decay", type=float, default=None, help="[1e-4]")
    p.add_argument("--pool-size", type=int, default=None,
                   help="[1600; bridge 200] NSA samples synthesized and encoded once")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="do not use the 8 rotations/flips of the normal images")
    p.add_argument("--embed-dim", type=int, default=None, help="[64] prototype width (backbones without text)")
    p.add_argument("--hidden", type=int, default=None, help="[0] 0: linear projection (paper); >0: MLP width")
    p.add_argument("--layers", default=None,
                   help="tapped layers the decoder reads, e.g. 1,2 [efficientnet-lite0: 1,2; others: all]")
    p.add_argument("--kind", choices=("auto", "object", "texture"), default=None, help="NSA product kind [auto]")
    p.add_argument("--nsa-colour", dest="colour", type=float, default=None,
                   help="[0] share of NSA patches that are colour changes in place (rust, stains) instead of pastes")
    p.add_argument("--seed", type=int, default=None, help="[0]")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="[500; bridge 20] steps between the checkpoints written to --out while training")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [one per core]")
    p.add_argument("--resume", action="store_true",
                   help="continue the training in --out (same flags; the decoder stage may raise --steps)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        from ..errors import ScorerError
        raise ScorerError(f"--threads {args.threads}: give an integer >= 1 (or leave it out: one per core)")
    _refuse_other_stage_flags(args)
    if args.stage == "bridge":
        return _run_bridge(args)
    from ..models.train import train

    names = ("steps", "batch_size", "lr", "weight_decay", "pool_size", "augment", "embed_dim", "hidden", "kind",
             "colour", "seed", "checkpoint_every")
    config = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.layers:
        try:
            config["layers"] = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            from ..errors import ScorerError
            raise ScorerError(f"--layers {args.layers!r}: give comma-separated layer indices, e.g. 1,2") from None
    res = train(args.data, args.category, args.out, args.backbone, weights=args.weights, resolution=args.resolution,
                device=args.device, resume=args.resume, threads=args.threads, **config)
    last = res.history[-1][1] if res.history else float("nan")
    print(f"{res.checkpoint}: step {res.step}, last loss {last:.4f}; pool {res.pool_seconds:.0f} s, "
          f"training {res.train_seconds:.0f} s")
    print(f"export: iadgpt export --backbone {args.backbone} --decoder {res.checkpoint} --out BUNDLE "
          f"[--train-dir {args.data}/{args.category}/train/good --shots 1]")
    return 0


# Flags one stage reads and the other would silently ignore: (flag, attribute, unset value, why / what instead).
_DECODER_ONLY = (
    ("--steps", "steps", None, "the bridge counts steps per stage: --stage-steps TGE,MMF,BOTH"),
    ("--resolution", "resolution", None, "the bridge stage runs at the backbone's default input size"),
    ("--weights", "weights", None, "the bridge stage loads the backbone's default weights"),
    ("--no-augment", "augment", None, "the bridge stage always rotates/flips its pool, seeded by --seed"),
    ("--embed-dim", "embed_dim", None, "the decoder's width comes from --decoder CKPT"),
    ("--hidden", "hidden", None, "the decoder's width comes from --decoder CKPT"),
    ("--layers", "layers", None, "the decoder's layers come from --decoder CKPT"),
    ("--kind", "kind", None, "the bridge stage synthesises the decoder checkpoint's product kind"),
    ("--nsa-colour", "colour", None, "the bridge stage synthesises with that kind's default NSA settings"),
    ("--device", "device", "cpu", "the bridge stage trains on the CPU"),
)
_BRIDGE_ONLY = (
    ("--decoder", "decoder"), ("--init", "init"), ("--stage-steps", "stage_steps"), ("--locate", "locate"),
    ("--answer-position-weight", "answer_position_weight"),
)


def _refuse_other_stage_flags(args: argparse.Namespace) -> None:
    """A flag the chosen stage does not read is an error, not a silent no-op (a run of hours on wrong settings)."""
    from ..errors import ScorerError
    if args.stage == "bridge":
        given = [(flag, why) for flag, attr, unset, why in _DECODER_ONLY if getattr(args, attr) != unset]
        if given:
            raise ScorerError("; ".join(f"{flag} is a decoder-stage flag ({why})" for flag, why in given)
                              + ": leave it out of `iadgpt train --stage bridge`")
    else:
        given = [flag for flag, attr in _BRIDGE_ONLY if getattr(args, attr) is not None]
        if given:
            raise ScorerError(f"{', '.join(given)}: bridge-stage flag(s); add --stage bridge, or leave them out "
                              "to train the decoder")


def _run_bridge(args: argparse.Namespace) -> int:
    from ..errors import ScorerError
    if args.decoder is None:
        raise ScorerError("--stage bridge reads a trained decoder: pass --decoder CKPT (train one with `iadgpt train "
                          "--data D --category C --out CKPT`)")
    from ..models.bridge_train import train_bridge

    config = {k: getattr(args, k) for k in ("batch_size", "lr", "weight_decay", "pool_size", "seed", "locate",
                                            "answer_position_weight") if getattr(args, k) is not None}
    if args.stage_steps:
        try:
            config["stage_steps"] = [int(x) for x in args.stage_steps.split(",")]
        except ValueError:
            raise ScorerError(f"--stage-steps {args.stage_steps!r}: give three integers, e.g. 30,300,60") from None
        if len(config["stage_steps"]) != 3 or min(config["stage_steps"]) < 0:
            raise ScorerError(f"--stage-steps {args.stage_steps!r}: give three integers >= 0 (TGE, MMF, TGE+MMF)")
    _check_bridge_numbers(config)
    if args.checkpoint_every is not None:
        config["checkpoint_every"] = args.checkpoint_every
    res = train_bridge(args.data, args.category, args.out, args.decoder, backbone=args.backbone,
                       threads=args.threads, init=args.init, resume=args.resume, **config)
    last = res["history"][-1][2] if res["history"] else float("nan")
    print(f"{res['checkpoint']}: last loss {last:.4f}; pool {res['pool_seconds']:.0f} s, training "
          f"{res['train_seconds']:.0f} s")
    print(f"evaluate: python benchmarks/bridge.py --data {args.data} --category {args.category} "
          f"--checkpoint {res['checkpoint']} --json bridge.json")
    return 0


def _check_bridge_numbers(config: dict) -> None:
    """Refuse nonsense bridge flags before the decoder, pool and LLM load (BridgeConfig does not check them)."""
    from ..errors import ScorerError
    for key, low in (("batch_size", 1), ("pool_size", 1), ("seed", 0)):
        if key in config and config[key] < low:
            raise ScorerError(f"--{key.replace('_', '-')} {config[key]}: give an integer >= {low}")
    for key, positive in (("lr", True), ("weight_decay", False), ("answer_position_weight", False)):
        value = config.get(key)
        if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise ScorerError(f"--{key.replace('_', '-')} {value}: give a finite number {'>' if positive else '>='} 0")
