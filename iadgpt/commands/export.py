"""`iadgpt export`: backbone + reference images (or prompts) -> a station bundle, parity-checked."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export encoder + scorer ONNX graphs and references into a bundle")
    p.add_argument("--backbone", required=True, help="efficientnet-lite0, clip-vit-h14, clip-tiny, ...")
    p.add_argument("--weights", default=None, help="local weights directory (CLIP) or file")
    p.add_argument("--train-dir", type=Path, default=None,
                   help="folder of normal images for the memory bank (needed by --scorer bank)")
    p.add_argument("--shots", type=int, default=None,
                   help="normal images in the bank: 0 = all (default for bank), k = a seeded choice of k")
    p.add_argument("--coreset", type=float, default=None, help="greedy coreset fraction of the bank, e.g. 0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the shot choice and the coreset")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="do not add rotations/flips of few (<= 8) shots to the bank")
    p.add_argument("--scorer", choices=("auto", "bank", "text"), default="auto",
                   help="auto: text prompts for CLIP without --shots, else memory bank")
    p.add_argument("--prompts", default=None, help="prompt YAML file or object name (text scorer)")
    p.add_argument("--resolution", type=int, default=None, help="input size in px (default: the backbone's)")
    p.add_argument("--decoder", type=Path, default=None,
                   help="trained decoder checkpoint (iadgpt train): alone, or fused with the --shots K bank")
    p.add_argument("--fusion-weight", default=None,
                   help="decoder+bank fusion weight of the decoder in [0, 1], or auto: the smallest weight within one "
                        "standard error of the best pixel AUROC on held-out normal images with painted defects [auto]")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write (replaced atomically)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export.bundle_export import export_bundle

    bundle, report = export_bundle(args.backbone, args.train_dir, args.out, weights=args.weights, shots=args.shots,
                                    coreset=args.coreset, seed=args.seed, augment=args.augment, scorer=args.scorer,
                                    prompts=args.prompts, resolution=args.resolution,
                                    decoder=args.decoder, fusion_weight=args.fusion_weight)
    print("\n".join(report.lines()))
    fusion = bundle.scorer.get("fusion")
    if fusion:
        choice = fusion["weight_choice"]
        print(f"fusion weight {fusion['weight']:g} ({choice['method']})")
        for w, auroc, *se in choice.get("grid", []):  # bundles before the one-SE rule have no standard error
            spread = f" +- {100 * se[0]:.2f}" if se else ""
            print(f"  w {w:<4g}  validation P-AUROC {100 * auroc:.2f}{spread}  ({len(choice['images'])} images)")
    return 0
