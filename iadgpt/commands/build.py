"""`iadgpt build`: TensorRT engines for a bundle's encoder and scorer, on (and for) this GPU."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

BANK_MAX_ROWS = 65536  # largest memory bank a built scorer engine accepts (swap banks without a rebuild)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build TensorRT engines into a bundle (run it on the station's GPU)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", choices=("fp16", "int8"), default="fp16",
                   help="encoder precision; int8 needs the Q/DQ graph of `iadgpt calibrate --int8`. "
                        "The scorer is built in fp16.")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engines accept")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bundle import Bundle
    from ..errors import ExportError
    from ..runtime.tensorrt_engine import build_trt_engine, read_engine_info

    bundle = Bundle.load(args.bundle, verify=True)
    graphs = bundle.graphs
    if args.precision == "int8":
        if "encoder_int8" not in graphs:
            raise ExportError(f"bundle {bundle.path} has no INT8 (Q/DQ) encoder graph; calibrate one first with "
                              f"`iadgpt calibrate --int8 {bundle.path}`, or build with --precision fp16")
        jobs = [("encoder", "encoder_int8", "int8"), ("scorer", "scorer", "fp16")]
    else:
        jobs = [("encoder", bundle.float_encoder_role, "fp16"), ("scorer", "scorer", "fp16")]
    batch_range = (1, 1, int(args.max_batch))
    with tempfile.TemporaryDirectory(prefix=".build-", dir=bundle.path.parent) as tmp:
        for role, source, precision in jobs:
            shapes = None
            inputs, _ = bundle.graph_io(source)
            bank = next((t for t in inputs if t.name == "bank"), None)
            if bank is not None:
                rows = int(bundle.array(bundle.scorer["references"]["bank"], mmap=True).shape[0])
                dim = int(bank.shape[1])
                shapes = {"bank": ((1, dim), (rows, dim), (max(rows, BANK_MAX_ROWS), dim))}
            print(f"building {role} ({precision}) from {graphs[source]['file']} ...", flush=True)
            path = build_trt_engine(bundle.graph_path(source), tmp, precision, workspace_gb=args.workspace_gb,
                                    batch_range=batch_range, input_shapes=shapes,
                                    timing_cache=bundle.path / "engines" / "timing.cache")
            info = read_engine_info(path)[0]
            cc = f"{info.compute_capability[0]}.{info.compute_capability[1]}"
            key = path.name[: -len(".engine")]
            bundle.add_engine(key, path, precision=precision, trt_version=info.trt_version, compute_capability=cc,
                              role=role, source_graph=source, source_sha256=graphs[source]["sha256"])
            print(f"  {role}: engines/{path.name}")
    return 0
