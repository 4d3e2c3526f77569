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
# modules that import no torch: their commands (submit, jobs, logs, ...) parse and run without the others,
# a few seconds instead of ten for a client polling a Ray cluster
LIGHT_MODULES = ("cluster",)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command; given the `command` asked for and a light module registers it, only that module."""
    if command is not None:
        for name in LIGHT_MODULES:
            parser, subparsers = _parser((name,))
            if command in subparsers.choices:
                return parser
    return _parser(COMMAND_MODULES)[0]


def _parser(modules: tuple[str, ...]) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="autorank",
        description="Search per-layer decomposition, ranks and precision for a trained CNN.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"autorank.cli.{name}").register(subparsers)
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    try:  # Ctrl-C while the commands import (torch alone takes seconds) is an interrupt too, not a traceback
        args = build_parser(given[0] if given else None).parse_args(argv)
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
