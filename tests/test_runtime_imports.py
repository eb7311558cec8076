"""The station side must run on a box without torch: nothing in runtime/ (but the opt-in torch
CUDA engine) nor the CLI entry point may import it."""
from __future__ import annotations

import subprocess
import sys

TORCH_BACKEND = "torch_cuda_engine"  # the torch-on-CUDA path: importing it is asking for torch


def test_runtime_and_cli_do_not_import_torch():
    code = f"""
import importlib, pkgutil, sys
import iadgpt.runtime as runtime
for m in pkgutil.iter_modules(runtime.__path__):
    if m.name != {TORCH_BACKEND!r}:
        importlib.import_module("iadgpt.runtime." + m.name)
import iadgpt.bundle, iadgpt.cli
iadgpt.cli.build_parser()
heavy = sorted(k for k in ("torch", "transformers", "onnx") if k in sys.modules)
print(",".join(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"station-side import pulled in: {out.stdout.strip()}"
