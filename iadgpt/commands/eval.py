"""`iadgpt eval`: metrics of the torch model or of an exported bundle on a dataset category."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="image/pixel AUROC, AUPRO and F1-max on an MVTec-layout category")
    p.add_argument("--data", required=True, type=Path, help="dataset root holding <category>/train, test, ground_truth")
    p.add_argument("--category", required=True)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--weights", default=None, help="local weights directory (CLIP) or file")
    p.add_argument("--scorer", choices=("bank", "text"), default="bank",
                   help="bank: k-shot memory bank; text: CLIP zero-shot prompts (CLIP backbones only)")
    p.add_argument("--shots", type=int, default=0, help="normal images in the memory bank; 0 = all train images")
    p.add_argument("--seeds", type=int, default=1, help="repeat with this many random shot draws")
    p.add_argument("--coreset", type=float, default=None, help="greedy coreset fraction of the bank, e.g. 0.1")
    p.add_argument("--resolution", type=int, default=None, help="input size in px (default: the backbone's)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="do not add rotations/flips of few shots to the bank")
    p.add_argument("--bundle", type=Path, default=None, help="evaluate an exported bundle through an engine")
    p.add_argument("--backend", default="onnxruntime",
                   help="engine for --bundle: onnxruntime | torch | tensorrt | cuda-graph")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    p.add_argument("--plots", type=Path, default=None, help="write a ROC curve and hardest-case overlays here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import evaluate

    if args.bundle:
        result = evaluate.evaluate_bundle(args.data, args.category, args.bundle, backend=args.backend,
                                          threads=args.threads, plots=args.plots)
    else:
        result = evaluate.evaluate_torch(args.data, args.category, args.backbone, shots=args.shots, seeds=args.seeds,
                                         coreset=args.coreset, resolution=args.resolution, weights=args.weights,
                                         scorer=args.scorer, augment=args.augment, plots=args.plots)
    print(evaluate.format_table(result))
    if args.json:
        evaluate.write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


