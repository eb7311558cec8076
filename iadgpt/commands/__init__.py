"""CLI commands, one module each with `add_parser(sub)`; parsers set `run(args) -> int`.

Every module in this package is a command (found with pkgutil, so adding a command touches no
shared file). Modules import their heavy dependencies (torch, onnxruntime) inside `run`, so
`iadgpt --help` and the station commands stay light.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

FIRST = ("demo", "run", "eval", "export")  # shown first in --help, the rest alphabetically


def load_commands() -> list[ModuleType]:
    names = sorted((m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")),
                   key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))
    return [importlib.import_module(f"{__name__}.{name}") for name in names]
