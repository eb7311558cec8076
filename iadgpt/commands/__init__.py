"""CLI commands, one module each with `add_parser(sub)`; parsers set `run(args) -> int`.

Modules are imported when the parser is built, but each imports its heavy dependencies (torch,
onnxruntime) inside `run`, so `iadgpt --help` and station commands stay light.
"""
from __future__ import annotations

import importlib
from types import ModuleType

COMMAND_MODULES = ("demo", "run", "eval")


def load_commands() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{name}") for name in COMMAND_MODULES]
