"""Command line: a thin layer over the Python API.

Each command lives in its own module exposing `register(subparsers)`; the module's handler is set
with `parser.set_defaults(handler=...)` and receives the parsed arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from autorank.errors import AutorankError

COMMAND_MODULES = ("engine", "compress", "search", "export", "ui", "demo", "cluster")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autorank",
        description="Search per-layer decomposition, ranks and precision for a trained CNN.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"autorank.cli.{name}")
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name == f"autorank.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.handler(args)
    except AutorankError as exc:
        print(f"autorank: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("autorank: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
