"""`iadgpt calibrate`: onboard a product (bank + thresholds, optionally an INT8 encoder) into a bundle."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="memory bank from K normal shots, thresholds from the held-out normals, "
                                         "optional INT8 encoder; prints the expected false-reject/miss rates")
    p.add_argument("bundle", type=Path, help="bundle to calibrate (rewritten in place unless --out)")
    p.add_argument("--normal", required=True, type=Path, help="folder of normal (good) images of the product")
    p.add_argument("--shots", type=int, default=4,
                   help="normal images in the memory bank (seeded choice); 0 keeps the bundle's bank")
    p.add_argument("--holdout", type=int, default=None,
                   help="held-out normal images for the thresholds (default: all images not in the bank)")
    p.add_argument("--defects", type=Path, default=None,
                   help="folder of defective images (subfolders ok, 'good' skipped; MVTec ground_truth masks used) "
                        "to estimate the miss rate, needed by --method f1/recall")
    p.add_argument("--int8", action="store_true", help="write a static INT8 (Q/DQ) encoder calibrated on the normals")
    p.add_argument("--int8-keep-float", choices=("stem", "none", "auto"), default=None,
                   help="stem (CPU default): the layers reading the image stay float; none: every conv INT8, the "
                        "encoder takes the uint8 pixels (the fastest on a CPU; features further from fp32, so not for a "
                        "describer bridge trained on fp32 features); auto: also keep the "
                        "layers that lose most accuracy in float")
    p.add_argument("--out", type=Path, default=None, help="write the calibrated bundle here instead of in place")
    p.add_argument("--target-frr", type=float, default=0.005, help="target false-reject rate (0.005 = 0.5%%)")
    p.add_argument("--method", choices=("quantile", "tail", "f1", "recall"), default="quantile",
                   help="quantile: distribution-free (needs >= 1/FRR - 1 images); tail: Gumbel fit (>= 20 images); "
                        "f1/recall: need --defects")
    p.add_argument("--target-recall", type=float, default=0.95, help="for --method recall")
    p.add_argument("--coreset", type=float, default=None,
                   help="coreset fraction of the new bank, e.g. 0.1 (default: the bundle's)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="do not add rotations/flips of few (<= 8) shots to the bank")
    p.add_argument("--backend", default="onnxruntime",
                   help="backend the station runs: onnxruntime | tensorrt | torch | cuda-graph")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--weights", type=Path, default=None,
                   help="CLIP weights folder for --backend torch / cuda-graph (default: the local Hugging Face cache)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shot and hold-out choice")
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--histogram", type=Path, default=None,
                   help="score histogram PNG (default: next to --json, else BUNDLE.calibration.png)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration.onboard import calibrate

    if args.shots > 0 and not _has_torch():  # a station install: say what does work there
        from ..cli import _TORCH_SIDE
        from ..errors import CalibrationError
        raise CalibrationError(f"--shots {args.shots} builds a new memory bank, which needs torch ({_TORCH_SIDE}); "
                               "on a station without torch, keep the bundle's bank and refit its thresholds with "
                               "--shots 0")

    histogram = args.histogram or (args.json.with_suffix(".png") if args.json else None)
    report = calibrate(args.bundle, args.normal, shots=args.shots, holdout=args.holdout, defects_dir=args.defects,
                       int8=args.int8, out=args.out, target_frr=args.target_frr, method=args.method,
                       target_recall=args.target_recall, coreset=args.coreset, augment=args.augment,
                       backend=args.backend, threads=args.threads, seed=args.seed, weights=args.weights,
                       int8_keep_float=args.int8_keep_float, histogram=histogram)
    print("\n".join(report.lines()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _has_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken install, or torch blocked in sys.modules
        return False
