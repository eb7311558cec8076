"""`iadgpt describe IMAGE --bundle B`: verdict, measured facts and the LLM description of one image."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("describe", help="judge one image and describe its defect (facts + quantized LLM)")
    p.add_argument("image", type=Path)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--llm", default=None,
                   help="quantized LLM folder (iadgpt quantize-llm --out DIR); default: the bundle's extra.llm; "
                        "'none' for facts only")
    p.add_argument("--product", default=None, help="product name in the description (default: the bundle's object)")
    p.add_argument("--question", default=None, help="ask this instead of the standing cause/check question")
    p.add_argument("--examples", type=Path, default=None,
                   help="labelled defect examples folder (ExampleTypeClassifier.save) for the defect type")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threshold", type=float, default=None, help="override the bundle's calibrated threshold")
    p.add_argument("--threads", type=int, default=2, help="LLM threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from ..bundle import Bundle
    from ..data import read_image
    from ..runtime.describer import Describer, DescribeRequest, llm_spec_for, make_llm
    from ..runtime.detector import Detector
    from ..runtime.facts import ExampleTypeClassifier, PromptTypeRetriever, TypeResolver
    from ..runtime.sources import Frame

    bundle = Bundle.load(args.bundle)
    image = read_image(args.image)
    with Detector(bundle, args.backend, threshold=args.threshold) as det:
        verdict = det.detect(Frame(image=image, frame_id=0, timestamp=time.time(), source=str(args.image)))
        pixel = det.pixel_threshold
    state = "NG" if verdict.anomalous else "OK"
    print(f"{args.image}: {state}, score {verdict.score:.4f} (threshold {verdict.threshold:.4f}), "
          f"{len(verdict.regions)} region(s)")
    if not verdict.anomalous:
        print("nothing to describe: the part is OK (pass --threshold to judge it more strictly)")
        return 0
    product = args.product or (bundle.scorer.get("object") or bundle.extra.get("product") or "part")
    llm = make_llm(llm_spec_for(args.llm, bundle, threads=args.threads))
    typer = TypeResolver(PromptTypeRetriever.from_bundle(bundle),
                         ExampleTypeClassifier.load(args.examples) if args.examples else None)
    describer = Describer(llm, product, typer)
    req = DescribeRequest.from_verdict(verdict, image, pixel_threshold=pixel, question=args.question)
    record = describer.describe(req)
    if args.json:
        print(json.dumps(record, indent=2, default=str))
        return 0
    print(record["description"])
    print("facts:")
    for line in record["facts_text"]:
        print(f"  {line}")
    llm_info = record["llm"]
    if llm_info.get("rejected"):
        print(f"LLM remark not used ({'; '.join(llm_info['rejected'])}): {llm_info.get('remark')!r}")
    if "ttft_s" in llm_info:
        print(f"LLM: {llm_info['prompt_tokens']} prompt tokens ({llm_info['cached_prefix_tokens']} cached), first token "
              f"{llm_info['ttft_s']:.2f} s, {llm_info['new_tokens']} tokens at {llm_info['tokens_per_s']:.1f} tokens/s")
    return 0

