#!/usr/bin/env python3
"""Do calibrated thresholds hold on the test split? Observed false-reject rate and recall per category.

    python benchmarks/thresholds.py --data-root ../shared/data --json F [--target-frr 0.01] [--shots 4]

For each category: export an efficientnet-lite0 bundle (reused from --work if there), then
`iadgpt calibrate` it on train/good: K shots -> memory bank, the other train images -> threshold at
the target false-reject rate (quantile method; when a category has too few train images for it, the
refusal is recorded and the Gumbel tail method is used instead). The test split is then judged by
the station's Detector: observed FRR on test/good and recall on the defects, with 95% Clopper-Pearson
intervals. The test split never touches the threshold.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402

from iadgpt.bundle import Bundle  # noqa: E402
from iadgpt.calibration.onboard import calibrate  # noqa: E402
from iadgpt.calibration.thresholds import clopper_pearson  # noqa: E402
from iadgpt.data import load_split, read_image  # noqa: E402
from iadgpt.errors import CalibrationError  # noqa: E402
from iadgpt.runtime.detector import Detector  # noqa: E402
from iadgpt.runtime.preprocess import to_batch  # noqa: E402

CATEGORIES = (("mvtec_ad", "bottle"), ("mpdd", "metal_plate"))


def judge_test_split(bundle: Bundle, root: Path, category: str, backend: str, threads: int | None) -> dict:
    samples = load_split(root, category, "test")
    with Detector(bundle, backend, threads=threads) as det:
        scores = []
        for i in range(0, len(samples), 8):
            batch = to_batch([read_image(s.path) for s in samples[i:i + 8]], bundle.input_spec)
            scores.append(det.score_batch(batch)[1])
        threshold = det.threshold
    scores = np.concatenate(scores)
    labels = np.array([s.label for s in samples])
    flagged = scores >= threshold
    good, bad = ~labels.astype(bool), labels.astype(bool)
    fr, hits = int(flagged[good].sum()), int(flagged[bad].sum())
    per_type = {}
    for t in sorted({s.defect_type for s in samples if s.label}):
        idx = np.array([s.defect_type == t for s in samples])
        per_type[t] = {"n": int(idx.sum()), "recall": float(flagged[idx].mean())}
    return {"test_good": int(good.sum()), "false_rejects": fr, "observed_frr": fr / max(int(good.sum()), 1),
            "observed_frr_ci": list(clopper_pearson(fr, int(good.sum()))), "test_defects": int(bad.sum()),
            "detected": hits, "recall": hits / max(int(bad.sum()), 1),
            "recall_ci": list(clopper_pearson(hits, int(bad.sum()))), "recall_by_type": per_type}


def run_category(data_root: Path, dataset: str, category: str, work: Path, args: argparse.Namespace) -> dict:
    from iadgpt.export.bundle_export import export_bundle

    root = data_root / dataset
    train = root / category / "train" / "good"
    exported = work / f"{category}_export"
    if not (exported / "manifest.json").is_file():
        export_bundle("efficientnet-lite0", train, exported, shots=args.shots, seed=args.seed, progress=False)
    out = work / f"{category}_calibrated"
    result: dict = {"dataset": dataset, "category": category, "train_images": len(list(train.iterdir()))}
    method = "quantile"
    try:
        report = calibrate(exported, train, shots=args.shots, target_frr=args.target_frr, out=out, method=method,
                           backend=args.backend, threads=args.threads, seed=args.seed, progress=False,
                           histogram=work / f"{category}_calibration.png")
    except CalibrationError as exc:
        result["quantile_refused"] = str(exc)
        method = "tail"
        report = calibrate(exported, train, shots=args.shots, target_frr=args.target_frr, out=out, method=method,
                           backend=args.backend, threads=args.threads, seed=args.seed, progress=False,
                           histogram=work / f"{category}_calibration.png")
    result.update(method=method, threshold=report.threshold, shots=report.shots, holdout=report.holdout,
                  target_frr=args.target_frr, frr_estimate=report.frr_estimate, frr_ci=list(report.frr_ci),
                  calibrate_seconds=report.seconds, backend=report.backend, precision=report.precision)
    result.update(judge_test_split(Bundle.load(out), root, category, args.backend, args.threads))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--data-root", type=Path, required=True, help="folder holding mvtec_ad/ and mpdd/")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--target-frr", type=float, default=0.01)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("bench-thresholds"), help="bundles are written (and reused) here")
    p.add_argument("--category", action="append", default=None, help="only these categories (default: all)")
    args = p.parse_args(argv)
    writable_output(args.json)
    unknown = sorted(set(args.category or ()) - {cat for _, cat in CATEGORIES})
    if unknown:
        p.error(f"unknown category {', '.join(unknown)}; choose from {', '.join(cat for _, cat in CATEGORIES)}")
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    results = [run_category(args.data_root, ds, cat, args.work, args)
               for ds, cat in CATEGORIES if not args.category or cat in args.category]
    print(f"thresholds at target FRR {100 * args.target_frr:g}% from train/good ({args.shots} shots in the bank, "
          f"the rest held out); judged on the test split ({args.backend})")
    print("| category | method | held-out | threshold | expected FRR (95% CI) | test FRR (95% CI) | "
          "test recall (95% CI) |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['category']} | {r['method']} | {r['holdout']} | {r['threshold']:.4f} | "
              f"{100 * r['frr_estimate']:.2f}% ({100 * r['frr_ci'][0]:.2f}-{100 * r['frr_ci'][1]:.2f}) | "
              f"{r['false_rejects']}/{r['test_good']} = {100 * r['observed_frr']:.1f}% "
              f"({100 * r['observed_frr_ci'][0]:.1f}-{100 * r['observed_frr_ci'][1]:.1f}) | "
              f"{r['detected']}/{r['test_defects']} = {100 * r['recall']:.1f}% "
              f"({100 * r['recall_ci'][0]:.1f}-{100 * r['recall_ci'][1]:.1f}) |")
        if "quantile_refused" in r:
            print(f"  {r['category']}: quantile refused: {r['quantile_refused']}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "seconds": time.perf_counter() - t0}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
