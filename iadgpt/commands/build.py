"""`iadgpt build`: TensorRT engines for a bundle's encoder and scorer, on (and for) this GPU."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build TensorRT engines into a bundle (run it on the station's GPU)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", choices=("fp16", "int8"), default="fp16",
                   help="encoder precision; int8 needs the Q/DQ graph of `iadgpt calibrate --int8 --backend "
                        "tensorrt`. "
                        "The scorer is built in fp16.")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engines accept")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..runtime import tensorrt_engine

    bundle = Bundle.load(args.bundle, verify=True)
    for key in tensorrt_engine.build_bundle_engines(bundle, args.precision, workspace_gb=args.workspace_gb,
                                                    max_batch=args.max_batch):
        print(f"  {bundle.engines[key]['file']}  ({bundle.engines[key]['role']})")
    return 0
