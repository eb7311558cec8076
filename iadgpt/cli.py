"""`iadgpt <command>`: thin argparse shells over importable functions (the CLI prints, the library logs)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .commands import load_commands
from .errors import IadGptError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iadgpt", description="IAD-GPT Edge: anomaly detection for inspection stations")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in load_commands():
        module.add_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except IadGptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path this user cannot write, a full disk, a folder where a file belongs
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check the path, its permissions and the free space",
              file=sys.stderr)
        if args.verbose:
            raise
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
