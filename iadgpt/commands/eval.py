"""`iadgpt eval`: metrics of the torch model or of an exported bundle on a dataset category."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="image/pixel AUROC, AUPRO and F1-max on an MVTec-layout category")
    p.add_argument("--data", required=True, type=Path, help="dataset root holding <category>/train, test, ground_truth")
    p.add_argument("--category", required=True)
    p.add_argument("--backbone", default=None, help="torch model (default efficientnet-lite0)")
    p.add_argument("--weights", default=None, help="local weights directory (CLIP) or file")
    p.add_argument("--scorer", choices=("bank", "text"), default=None,
                   help="bank: k-shot memory bank; text: CLIP zero-shot prompts (CLIP backbones only)")
    p.add_argument("--shots", type=int, default=None, help="normal images in the memory bank; 0 (default) = all train images")
    p.add_argument("--seeds", type=int, default=None, help="repeat with this many random shot draws (default 1)")
    p.add_argument("--coreset", type=float, default=None, help="greedy coreset fraction of the bank, e.g. 0.1")
    p.add_argument("--resolution", type=int, default=None, help="input size in px (default: the backbone's)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="do not add rotations/flips of few shots to the bank")
    p.add_argument("--bundle", type=Path, default=None, help="evaluate an exported bundle through an engine")
    p.add_argument("--backend", default=None,
                   help="engine for --bundle: onnxruntime (default) | torch | tensorrt | cuda-graph")
    p.add_argument("--threads", type=int, default=None, help="engine threads for --bundle")
    p.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    p.add_argument("--plots", type=Path, default=None, help="write a ROC curve and hardest-case overlays here")
    p.set_defaults(run=run)


# flags of the torch model; a bundle carries its own (flag -> attribute)
MODEL_FLAGS = {"--backbone": "backbone", "--scorer": "scorer", "--shots": "shots", "--seeds": "seeds",
               "--coreset": "coreset", "--resolution": "resolution", "--no-augment": "augment"}


def run(args: argparse.Namespace) -> int:
    from .. import evaluate
    from ..cli import writable_output
    from ..errors import ConfigError

    writable_output(args.json)  # found out now, not after the whole test set was scored
    if args.bundle:
        given = [flag for flag, name in MODEL_FLAGS.items() if getattr(args, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} describe the torch model, but --bundle scores with the bundle's own "
                              "model and bank: drop them (re-export, or `iadgpt calibrate BUNDLE --shots K`, to change "
                              "the bundle)")
        result = evaluate.evaluate_bundle(args.data, args.category, args.bundle, backend=args.backend or "onnxruntime",
                                          threads=args.threads, plots=args.plots, weights=args.weights)
    else:
        given = [flag for flag in ("--backend", "--threads") if getattr(args, flag[2:]) is not None]
        if given:  # the torch model runs here as it is; an engine flag it cannot honour was ignored silently
            raise ConfigError(f"{', '.join(given)} choose the engine that runs --bundle; without --bundle the torch "
                              "reference model is evaluated: export a bundle and pass --bundle, or drop them")
        result = evaluate.evaluate_torch(args.data, args.category, args.backbone or "efficientnet-lite0",
                                         shots=args.shots or 0, seeds=1 if args.seeds is None else args.seeds,
                                         coreset=args.coreset, resolution=args.resolution, weights=args.weights,
                                         scorer=args.scorer or "bank", augment=args.augment, plots=args.plots)
    print(evaluate.format_table(result))
    if args.json:
        evaluate.write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


