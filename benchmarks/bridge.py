"""IAD-GPT bridge accuracy: yes/no over the whole test split, 3x3 position on the defective images.

    python benchmarks/bridge.py --data ../shared/data/mvtec_ad --category bottle [--decoder DEC.safetensors] \
        [--checkpoint BRIDGE.safetensors] [--onnx] [--encoder BUNDLE/graphs/encoder.onnx] --json bridge.json

Trains the bridge first (`iadgpt train --stage bridge`, default configuration) when no --checkpoint
is given, and the decoder before it (`iadgpt train`) when no --decoder is given either (22 min of
training on 2 cores, measured). Routes: "torch" (float32 heads + float32 SmolLM2 through transformers) and, with --onnx,
"onnx-int4" (the exported heads on ONNX Runtime + the int4 inputs_embeds LLM, `OnnxBridge`). Both
routes read the same torch encoder features. Decodings (never sampling): "greedy" text, or "choice", the
most likely of the ten template answers (No / Yes at each 3x3 cell). `--encoder` reads the features
from an ONNX encoder instead (a bundle's INT8 graph: what the station's detector hands the bridge). The position is parsed from the
text and compared with the 3x3 cell of the largest ground-truth region's centroid.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iadgpt.cli import run_reporting_errors, writable_output  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def locator_choices(mmf, masks, labels) -> Optional[list[Optional[str]]]:
    """MMF's own cell choice (no LLM) on the defective images: its position words, or None where
    the centroid locator's presence logit says there is nothing to locate (the LLM is then handed
    NONE_WORD, so "none" is the choice, and a wrong one on a defective image). None without 'words'."""
    import torch

    from iadgpt.runtime.facts import POSITION_WORDS

    if getattr(mmf, "summary", None) != "words":
        return None
    idx = [i for i, lab in enumerate(labels) if lab]
    with torch.no_grad():
        cells = mmf.where_logits(masks[idx]).argmax(-1).tolist()
        presence = mmf.presence_logits(masks[idx])
    present = [True] * len(idx) if presence is None else (presence > 0).tolist()
    return [POSITION_WORDS[c] if p else None for c, p in zip(cells, present)]


def locator_report(chosen: Optional[list[Optional[str]]], texts, labels, positions) -> dict:
    """How often the locator's choice is the true cell, how often it says "nothing here" on a defect,
    and how often the LLM's answer names the chosen cell (does it follow the words it is handed)."""
    import numpy as np

    from iadgpt.runtime.bridge_runtime import parse_answer

    if chosen is None:
        return {}
    idx = [i for i, lab in enumerate(labels) if lab]
    said = [parse_answer(texts[i])[1] for i in idx]
    return {"locator_accuracy": float(np.mean([c == positions[i] for c, i in zip(chosen, idx)])),
            "locator_none": float(np.mean([c is None for c in chosen])),
            "answers_follow_locator": float(np.mean([s == c for s, c in zip(said, chosen)]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--category", required=True)
    ap.add_argument("--checkpoint", type=Path, default=None, help="trained bridge; trains one when absent")
    ap.add_argument("--decoder", type=Path, default=None,
                    help="decoder checkpoint the bridge is trained with; trained first (`iadgpt train`) when absent")
    ap.add_argument("--out", type=Path, default=Path("bridge.safetensors"), help="where a trained bridge goes")
    ap.add_argument("--resume", action="store_true",
                    help="finish the trainings a stopped run of this benchmark left in --out (and its decoder)")
    ap.add_argument("--stage-steps", default=None, help="bridge training stages [the BridgeConfig default, 30,300,60]")
    ap.add_argument("--onnx", action="store_true", help="also evaluate the ONNX heads + int4 LLM route")
    ap.add_argument("--export-dir", type=Path, default=None, help="where the ONNX bridge goes [next to the checkpoint]")
    ap.add_argument("--decoding", choices=("greedy", "choice", "both"), default="both",
                    help="greedy text, or the most likely of the ten template answers (closed set) [both]")
    ap.add_argument("--encoder", type=Path, default=None,
                    help="read the features from this ONNX encoder (e.g. a bundle's graphs/encoder.onnx, INT8: what "
                         "the station's detector hands the bridge) instead of the float torch backbone")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=2, help="dialogues to print")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    writable_output(args.json)
    if args.checkpoint is None and args.out.exists() and not args.resume:  # train_bridge refuses it too, but later
        ap.error(f"--out {args.out} exists: pass it as --checkpoint to evaluate a finished bridge, add --resume to "
                 "finish a training this benchmark was stopped in, or choose another --out")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        ap.error(f"--checkpoint {args.checkpoint} does not exist; train one (drop --checkpoint) or fix the path")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import numpy as np
    import torch
    from tqdm import tqdm

    from iadgpt.models.backbones import get_backbone
    from iadgpt.models.bridge import BridgeLM
    from iadgpt.models.bridge_train import (MAP_KINDS, load_bridge_parts, load_llm, score_answers, test_set,
                                            train_bridge)
    from iadgpt.runtime.bridge_runtime import QUESTION

    torch.set_num_threads(args.threads)
    decodings = ("greedy", "choice") if args.decoding == "both" else (args.decoding,)
    train_s = None
    if args.checkpoint is None:
        train_s = 0.0
        if args.decoder is None:
            from iadgpt.models.train import train
            args.decoder = args.out.with_name(args.out.stem + "_decoder.safetensors")
            dec = train(args.data, args.category, args.decoder, threads=args.threads, resume=args.resume)
            train_s += dec.pool_seconds + dec.train_seconds
        steps = {"stage_steps": [int(x) for x in args.stage_steps.split(",")]} if args.stage_steps else {}
        res = train_bridge(args.data, args.category, args.out, args.decoder, threads=args.threads, resume=args.resume,
                           **steps)
        args.checkpoint = args.out
        train_s += res["train_seconds"] + res["pool_seconds"]
    bb = get_backbone("efficientnet-lite0")
    tge, mmf, maker, meta = load_bridge_parts(args.checkpoint, bb)
    llm, encode, decode, eos = load_llm()
    bridge = BridgeLM(llm, encode, decode, tge, mmf, eos).eval()
    size = int(bb.input_spec.size[0])
    images, labels, positions, names = test_set(args.data, args.category, size)

    t0 = time.perf_counter()
    if args.encoder:  # the ONNX graph behind a backbone-like callable, as calibration builds banks with it
        from iadgpt.calibration.onboard import GraphFeatures
        encoder = GraphFeatures(args.encoder, args.threads)
    else:
        encoder = bb
    feats_all: list[list[torch.Tensor]] = []
    masks_all = {k: [] for k in MAP_KINDS}
    tge_in = []
    for i in range(0, len(images), 16):
        x = torch.from_numpy(np.stack(images[i:i + 16]).transpose(0, 3, 1, 2).astype(np.float32))
        with torch.inference_mode():
            f = encoder(x)
        t, m = maker(f)
        feats_all.append(f)
        tge_in.append(t)
        for k in MAP_KINDS:
            masks_all[k].append(m[k])
    feats = [torch.cat([f[layer] for f in feats_all]) for layer in range(len(feats_all[0]))]
    tge_in = torch.cat(tge_in)
    encode_s = time.perf_counter() - t0
    masks_all = {k: torch.cat(v) for k, v in masks_all.items()}
    chosen = {kind: locator_choices(mmf, masks_all[kind], labels) for kind in MAP_KINDS}  # no LLM: once per map
    rows, answers = [], {}
    for decoding, kind in itertools.product(decodings, MAP_KINDS):
        masks = masks_all[kind]
        t0 = time.perf_counter()
        texts = []
        for i in tqdm(range(0, len(images), 8), desc=f"torch {decoding} {kind}", unit="batch"):
            if decoding == "greedy":
                texts += bridge.generate(tge_in[i:i + 8], masks[i:i + 8], max_new_tokens=20)
            else:
                texts += bridge.choose(tge_in[i:i + 8], masks[i:i + 8])
        dt = time.perf_counter() - t0
        answers[("torch", decoding, kind)] = texts
        rows.append({"map": kind, "route": "torch", "decoding": decoding, **score_answers(texts, labels, positions),
                     **locator_report(chosen[kind], texts, labels, positions),
                     "seconds_per_image": round(dt / len(images), 3)})
        logging.info("%s", rows[-1])

    export_meta = {}
    if args.onnx:
        from iadgpt.export.llm import ensure_default_llm
        from iadgpt.models.bridge_export import export_bridge
        from iadgpt.runtime.bridge_runtime import OnnxBridge
        from iadgpt.runtime.llm_runtime import OnnxLLM

        out_dir = args.export_dir or args.checkpoint.with_suffix(".onnx-bridge")
        cfg = export_bridge(out_dir, tge, mmf, maker, [f[:4] for f in feats],
                            {"checkpoint": str(args.checkpoint), "category": args.category})
        export_meta = {"dir": str(out_dir), "parity": cfg["parity"]}
        llm = OnnxLLM(ensure_default_llm(4, embeds=True), threads=args.threads)
        runtimes = {d: OnnxBridge(out_dir, llm, threads=args.threads, max_new_tokens=20, decoding=d) for d in decodings}
        for decoding, kind in itertools.product(decodings, MAP_KINDS):
            t0 = time.perf_counter()
            texts = [runtimes[decoding].ask([f[i:i + 1].numpy() for f in feats], kind).text
                     for i in tqdm(range(len(images)), desc=f"onnx-int4 {decoding} {kind}", unit="img")]
            dt = time.perf_counter() - t0
            answers[("onnx-int4", decoding, kind)] = texts
            rows.append({"map": kind, "route": "onnx-int4", "decoding": decoding, **score_answers(texts, labels, positions),
                         **locator_report(chosen[kind], texts, labels, positions),  # the same heads, parity-checked
                         "seconds_per_image": round(dt / len(images), 3)})
            agree = np.mean([a == b for a, b in zip(texts, answers[("torch", decoding, kind)])])
            rows[-1]["same_text_as_torch"] = float(agree)
            logging.info("%s", rows[-1])

    examples = []
    picks = [i for i, lab in enumerate(labels) if lab][: max(0, args.examples - 1)] + \
        [i for i, lab in enumerate(labels) if not lab][:1]
    for i in picks[:args.examples]:
        examples.append({"image": names[i], "truth": {"anomalous": labels[i], "position": positions[i]},
                         "question": QUESTION,
                         **{"/".join(key): texts[i] for key, texts in answers.items()}})
    for r in rows:
        extra = (f"  locator {100 * r['locator_accuracy']:.1f}% (says none {100 * r['locator_none']:.1f}%), "
                 f"answers follow it {100 * r['answers_follow_locator']:.1f}%"
                 if "locator_accuracy" in r else "")
        print(f"{r['route']:10s} {r['decoding']:7s} {r['map']:12s} yes/no {100 * r['yes_no_accuracy']:.1f}%  position "
              f"{100 * r['position_accuracy']:.1f}%  ({r['n_images']} images, {r['n_defective']} defective){extra}")
    for e in examples:
        print(json.dumps(e, indent=1))
    report = {"rows": rows, "examples": examples, "train_seconds": train_s, "encode_seconds": round(encode_s, 1),
              "checkpoint": str(args.checkpoint), "checkpoint_meta": {k: meta.get(k) for k in
                                                                      ("config", "train_seconds", "pool_seconds", "threads", "history")},
              "export": export_meta, "machine": {"cpu_threads": args.threads, "platform": platform.platform()}}
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    args.json.with_name(args.json.stem + ".full.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
