"""``fluidsrv weights list | fetch NAME | verify [NAME]``: see, download and check model weights."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fluidsrv.cli import CliError
from fluidsrv.manifest import Kind, WeightsError
from fluidsrv.progress_bar import ProgressBar, human_size
from fluidsrv.weights_manager import EntryStatus, Status, WeightsManager

T = TypeVar("T")


def register(subparsers: Any) -> None:
    """Add the ``weights`` subcommand and its ``list``, ``fetch`` and ``verify`` actions."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "weights", help="list, download and verify model weights", description="See, download and check model weights."
    )
    parser.add_argument("--manifest", type=Path, help="weights manifest to use (default: weights/manifest.toml)")
    parser.add_argument("--cache-dir", type=Path, help="download cache (default: $FLUIDSRV_CACHE or ~/.cache/fluidsrv)")
    parser.add_argument("--weights-dir", type=Path, help="embedded weights folder (default: the repository's weights/)")
    actions = parser.add_subparsers(dest="weights_action", required=True, metavar="ACTION")

    list_parser = actions.add_parser("list", help="show every known file and whether it is present")
    list_parser.add_argument("--check", action="store_true", help="hash files not yet verified (slow for big files)")
    list_parser.set_defaults(handler=run_list)

    fetch_parser = actions.add_parser("fetch", help="download a file into the cache (resumable, checksummed)")
    fetch_parser.add_argument("name", help="the weights name, as `fluidsrv weights list` shows it")
    fetch_parser.add_argument("--url", help="download from this URL instead of the manifest's mirrors")
    fetch_parser.set_defaults(handler=run_fetch)

    verify_parser = actions.add_parser("verify", help="hash present files and compare with the manifest")
    verify_parser.add_argument("name", nargs="?", help="one weights name (default: every present file)")
    verify_parser.set_defaults(handler=run_verify)


def run_list(args: argparse.Namespace) -> int:
    """Print a table of every manifest entry: name, kind, status, size, plugins."""
    manager = _manager(args)
    rows = [_row(status) for status in _guarded(lambda: manager.status(check=args.check))]
    _print_table(["NAME", "KIND", "STATUS", "SIZE", "PLUGIN"], rows)
    print(f"\ncache: {manager.cache_dir}\nembedded: {manager.weights_dir}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    """Download one entry, with a progress bar on stderr."""
    manager = _manager(args)
    entry = _guarded(lambda: manager.entry(args.name))
    if entry.kind is not Kind.EMBEDDED:
        print(f"{entry.name}: {entry.file}, licence: {entry.license}", file=sys.stderr)
    bar = ProgressBar(entry.name)
    try:
        path = _guarded(lambda: manager.fetch(args.name, url=args.url, progress=bar))
    except KeyboardInterrupt:
        bar.close()
        raise CliError(f"interrupted; run `fluidsrv weights fetch {args.name}` again to resume") from None
    bar.close()
    outcome = manager.status_of(args.name)
    note = "verified" if outcome.status is Status.VERIFIED else "present (no published checksum)"
    print(f"{entry.name}: {note}: {path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Hash one or every present file; exit 1 when a file is missing (when named) or differs."""
    manager = _manager(args)
    if args.name:
        results = [_guarded(lambda: manager.verify(args.name))]
    else:
        results = [manager.verify(name) for name in manager.entries if manager.path_for(name).is_file()]
        if not results:
            print("no weights files are present; `fluidsrv weights list` shows what can be fetched")
            return 0
    for result in results:
        line = f"{result.entry.name}: {result.status.value}"
        if result.detail:
            line += f" ({result.detail})"
        if result.status is Status.PRESENT and result.actual_sha256:
            line += f" sha256 {result.actual_sha256}"
        print(line)
    failed = [result for result in results if result.status in (Status.MISSING, Status.CHECKSUM_MISMATCH)]
    return 1 if failed else 0


def _manager(args: argparse.Namespace) -> WeightsManager:
    from fluidsrv.settings import Settings

    settings = Settings.from_env(cache_dir=args.cache_dir, weights_dir=args.weights_dir)
    return _guarded(
        lambda: WeightsManager(args.manifest, weights_dir=settings.weights_dir, cache_dir=settings.cache_dir)
    )


def _guarded(action: Callable[[], T]) -> T:
    """Run ``action()``, turning a :class:`WeightsError` into a user-facing :class:`CliError`."""
    try:
        return action()
    except WeightsError as error:
        raise CliError(str(error)) from None


def _row(status: EntryStatus) -> list[str]:
    label = status.status.value
    if status.status is Status.PRESENT and not status.entry.has_checksum:
        label += " (unverified)"
    size = status.entry.size
    if size is None and status.path.is_file():
        size = status.path.stat().st_size
    plugins = ", ".join(status.entry.plugins) or "-"
    return [status.entry.name, status.entry.kind.value, label, human_size(size), plugins]


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for cells in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip())
