"""The ``fluidsrv`` command line: one module per subcommand, each exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fluidsrv.settings import SettingsError

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "fluidsrv.cli.serve",
    "fluidsrv.cli.weights",
    "fluidsrv.cli.faces",
    "fluidsrv.cli.train",
    "fluidsrv.cli.project",
    "fluidsrv.cli.edit",
    "fluidsrv.cli.edit_tools",
    "fluidsrv.cli.preset",
)
"""Modules that add a subcommand; each defines ``register(subparsers) -> None``."""


class CliError(Exception):
    """A user-facing command-line error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="fluidsrv", description="Real-time AI face editing server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fluidsrv`` command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        result = args.handler(args)
    except (CliError, SettingsError) as error:
        print(f"fluidsrv: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)
