"""`iadgpt export-bridge CKPT --out DIR`: a trained bridge's heads as ONNX graphs for the station's describer."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-bridge", help="export a trained IAD-GPT bridge (masks, TGE, MMF) to ONNX, parity-checked")
    p.add_argument("checkpoint", type=Path, help="bridge checkpoint from `iadgpt train --stage bridge`")
    p.add_argument("--out", required=True, type=Path, help="folder to write (four .onnx graphs, bank, bridge.json)")
    p.add_argument("--train-dir", type=Path, default=None,
                   help="normal images for the parity probes [the checkpoint's DATA/CATEGORY/train/good]")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import ScorerError
    from ..export.bundle_export import list_images
    from ..models.backbones import get_backbone
    from ..models.bridge_export import export_bridge
    from ..models.bridge_train import load_bridge_parts
    from ..models.references import encode, load_batch

    backbone = get_backbone(args.backbone)
    tge, mmf, maker, meta = load_bridge_parts(args.checkpoint, backbone)
    train_dir = args.train_dir or Path(str(meta.get("data", ""))) / str(meta.get("category", "")) / "train" / "good"
    if not train_dir.is_dir() or not list_images(train_dir):
        raise ScorerError(f"no normal images in {train_dir} for the parity probes; pass --train-dir DIR")
    probe = encode(backbone, load_batch(list_images(train_dir)[:2], backbone))
    with torch.inference_mode():
        cfg = export_bridge(args.out, tge, mmf, maker, probe, {"checkpoint": str(args.checkpoint.absolute()),
                                                                "category": meta.get("category")})
    print(f"{args.out}: {', '.join(cfg['graphs'])}; {cfg['mask_tokens']} mask tokens, LLM width {cfg['hidden_size']}")
    for name, p in cfg["parity"].items():
        (out, diff), = p["max_abs_diff"].items()
        print(f"  parity {name}: max |onnxruntime - torch| {diff:.2e} (tolerance {p['tolerance'][out]:.1e})")
    print(f"station.yaml: describer: {{bridge: {args.out}, bridge_llm: DIR}}  "
          f"(DIR from `iadgpt quantize-llm --embeds --out DIR`)")
    return 0
