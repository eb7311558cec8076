#!/usr/bin/env python3
"""The decoder + memory-bank table of the README: bank alone vs decoder fused with it, per shot.

    python benchmarks/fusion.py --data-root ../shared/data --decoders DIR --json fusion.json

For each category and seed (each seed draws another 1-shot bank), two bundles are exported and
evaluated as `iadgpt export` / `iadgpt eval --backend onnxruntime` would: the bank alone and the
decoder fused with the same bank (`--fusion-weight`, default auto: the one-standard-error rule).
The P-AUROC gain of the fused bundle over the bank comes with a 95 % interval from a paired
bootstrap over the test images (`metrics.pixel_auroc_gain`, `--resamples`): the table's gains are
hundredths of a point, and the interval says whether the test set can tell them from zero.
The decoders are `DIR/<category>.safetensors` (train them with `iadgpt train`, or pass --train to
train missing ones here: 2-5 min each on 2 cores). One bank bundle + one fused bundle + their two
evals take about 30 s per seed on 2 cores (bottle, 2026-11-28).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402

from iadgpt.evaluate import run_bundle  # noqa: E402
from iadgpt.export.bundle_export import export_bundle  # noqa: E402
from iadgpt.metrics import pixel_auroc_gain  # noqa: E402

DATASETS = {"bottle": "mvtec_ad", "metal_plate": "mpdd"}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _row(metrics) -> dict:
    return {k: float(getattr(metrics, k)) for k in METRICS}


def _fmt(r: dict) -> str:
    return " / ".join(f"{100 * r[k]:.2f}" for k in METRICS)


def _gain(row: dict) -> str:
    points = [round(100 * v, 2) + 0.0 for v in (row["pixel_auroc_gain"], *row["pixel_auroc_gain_95"])]  # no "-0.00"
    return "{:+.2f} ({:+.2f} .. {:+.2f})".format(*points)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--decoders", type=Path, required=True, help="folder holding <category>.safetensors")
    p.add_argument("--categories", default="bottle,metal_plate")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated shot seeds")
    p.add_argument("--fusion-weight", default="auto")
    p.add_argument("--train", action="store_true", help="train a missing decoder with `iadgpt train` defaults")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap draws of the test images for the gain's interval")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    writable_output(args.json)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    for category in categories:  # every category's inputs before the first one's minutes of work
        if category not in DATASETS:
            p.error(f"unknown category {category!r}; choose from {', '.join(DATASETS)}")
        ckpt = args.decoders / f"{category}.safetensors"
        if not ckpt.is_file() and not args.train:
            p.error(f"{ckpt} does not exist: train it (`iadgpt train --data {args.data_root / DATASETS[category]} "
                    f"--category {category} --out {ckpt}`) or pass --train")
    rows = []
    for category in categories:
        data = args.data_root / DATASETS[category]
        ckpt = args.decoders / f"{category}.safetensors"
        if not ckpt.is_file():
            from iadgpt.models.train import train
            t0 = time.perf_counter()
            train(data, category, ckpt, "efficientnet-lite0", threads=args.threads)
            print(f"{category}: decoder trained in {time.perf_counter() - t0:.0f} s", flush=True)
        train_dir = data / category / "train" / "good"
        with tempfile.TemporaryDirectory(prefix="iadgpt-fusion-") as tmp:
            for seed in seeds:
                bank_b, _ = export_bundle("efficientnet-lite0", train_dir, Path(tmp) / f"bank{seed}", shots=1,
                                          seed=seed, progress=False)
                fused_b, _ = export_bundle("efficientnet-lite0", train_dir, Path(tmp) / f"fused{seed}", shots=1,
                                           seed=seed, decoder=ckpt, fusion_weight=args.fusion_weight, progress=False)
                bank_run = run_bundle(data, category, bank_b.path, threads=args.threads, progress=False)
                fused_run = run_bundle(data, category, fused_b.path, threads=args.threads, progress=False)
                bank, fused = _row(bank_run.metrics), _row(fused_run.metrics)
                gain = pixel_auroc_gain(bank_run.test.masks, fused_run.metrics.maps, bank_run.metrics.maps,
                                        resamples=args.resamples, seed=seed)
                fusion = fused_b.scorer["fusion"]
                shot = fused_b.references["memory_bank"]["provenance"]["files"]
                row = {"category": category, "seed": seed, "shot": shot, "weight": fusion["weight"],
                       "weight_choice": fusion["weight_choice"], "bank": bank, "fused": fused,
                       "pixel_auroc_gain": gain.gain, "pixel_auroc_gain_se": gain.se,
                       "pixel_auroc_gain_95": [gain.low, gain.high], "resamples": gain.resamples}
                rows.append(row)
                print(f"{category} seed {seed} (shot {', '.join(row['shot'])}): bank {_fmt(bank)} | fused w "
                      f"{fusion['weight']:g} {_fmt(fused)} | P-AUROC {_gain(row)}", flush=True)
    print("\n| category | seed | bank I / P / PRO | w | fused I / P / PRO | P-AUROC gain (95 % interval) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['category']} | {r['seed']} | {_fmt(r['bank'])} | {r['weight']:g} | {_fmt(r['fused'])} | "
              f"{_gain(r)} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "decoders": str(args.decoders),
                                         "fusion_weight": args.fusion_weight}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
