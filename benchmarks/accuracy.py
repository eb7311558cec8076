#!/usr/bin/env python3
"""The accuracy table of the README: k-shot and all-shot memory banks on the shared datasets.

    python benchmarks/accuracy.py --data-root ../shared/data --json accuracy.json

Each row is one `iadgpt eval` run (same function, same defaults): few-shot rows average 3 seeds
(different shot draws), all-shot rows use a 10% greedy coreset.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402

from iadgpt.evaluate import evaluate_torch  # noqa: E402

DATASETS = [("mvtec_ad", "bottle"), ("mpdd", "metal_plate")]
SETTINGS = [(1, 3, None), (2, 3, None), (4, 3, None), (0, 1, 0.1)]  # shots, seeds, coreset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    writable_output(args.json)

    rows = []
    for dataset, category in DATASETS:
        for shots, seeds, coreset in SETTINGS:
            r = evaluate_torch(args.data_root / dataset, category, args.backbone, shots=shots, seeds=seeds,
                               coreset=coreset, resolution=args.resolution)
            rows.append({"dataset": dataset, "category": category, **r.to_json()})
            print(f"{category} shots={shots or 'all'}: I-AUROC {100 * r.image_auroc:.2f} P-AUROC {100 * r.pixel_auroc:.2f} "
                  f"AUPRO {100 * r.aupro:.2f}", flush=True)
    print("\n| data | shots | seeds | coreset | I-AUROC | P-AUROC | AUPRO | F1-max | ms/image |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pm = lambda k: f"{100 * r[k]:.2f}" + (f" ± {100 * r[k + '_std']:.2f}" if r["seeds"] > 1 else "")  # noqa: E731
        print(f"| {r['category']} | {r['shots'] or 'all'} | {r['seeds']} | {r['coreset'] or '-'} | {pm('image_auroc')} "
              f"| {pm('pixel_auroc')} | {pm('aupro')} | {100 * r['f1_max']:.2f} | {1000 * r['seconds_per_image']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
