"""``fluidsrv train TARGET``: train the embedded models (``generator`` here; other targets register beside it).

A target is a function ``register_target(targets)`` that adds one sub-subcommand to ``targets`` (the
subparsers of ``train``) with a ``handler``. ``generator`` is defined in this module; a module that adds
another target (e.g. ``train encoder``) defines ``register_target`` and is named in :data:`TARGET_MODULES`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fluidsrv.cli import CliError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

TARGET_MODULES: tuple[str, ...] = (
    "fluidsrv.cli.train_encoder", "fluidsrv.training.attributes", "fluidsrv.training.student")
"""Modules that add a ``train`` target, each defining ``register_target(targets) -> None``."""

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand and its targets."""
    parser: argparse.ArgumentParser = subparsers.add_parser("train", help="train an embedded model")
    _add_targets(parser.add_subparsers(dest="target", required=True, metavar="TARGET"))


def _add_targets(targets: Any) -> None:
    """Register ``generator`` and every target module's target."""
    register_generator(targets)
    for module_name in TARGET_MODULES:
        importlib.import_module(module_name).register_target(targets)


def register_generator(targets: Any) -> None:
    """Add ``train generator``: the StyleGAN2 GAN loop on the aligned-face shards."""
    from fluidsrv.training.configs import CONFIGS

    parser: argparse.ArgumentParser = targets.add_parser(
        "generator",
        help="train a StyleGAN2 generator on aligned-face zip shards",
        description="Train (or resume) a StyleGAN2 generator. RUN receives checkpoint-*.safetensors (+ -optim), "
        "generator.safetensors (the fp16 EMA generator with w_avg), samples-*.png and log.jsonl.",
    )
    add_run_arguments(parser, counted="images")
    parser.add_argument(
        "--config", choices=sorted(CONFIGS), help="training config (default embedded-128, or the resumed one's)"
    )
    parser.add_argument("--batch", type=int, help="batch size")
    parser.add_argument("--lr", type=float, help="Adam learning rate of G and D")
    parser.add_argument("--gamma", type=float, help="R1 weight γ")
    parser.add_argument("--augment", help='DiffAugment policies, e.g. "color,translation,cutout" or "none"')
    parser.add_argument("--pl-weight", type=float, help="path-length regularisation weight (0 = off)")
    parser.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        help="decode all faces onto the device first (default: on CUDA)",
    )
    parser.set_defaults(handler=run_generator)


def add_run_arguments(parser: argparse.ArgumentParser, counted: str) -> None:
    """Add the flags every checkpointed training target shares; ``counted`` names what --kimg counts."""
    parser.add_argument("--data", type=Path, required=True, help="folder with faces128-*.zip shards")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write into")
    parser.add_argument("--kimg", type=float, required=True, help=f"train until this many thousand {counted} in total")
    parser.add_argument("--resume", type=Path, help="checkpoint file, or a run folder (its newest checkpoint)")
    parser.add_argument("--snapshot-kimg", type=float, help=f"checkpoint interval in thousand {counted}")
    parser.add_argument("--log-every", type=int, help="steps between log lines")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--minutes", type=float, help="stop (with a snapshot) after this many minutes")
    parser.add_argument("--device", default="auto", help='"auto" (CUDA when available), "cpu" or "cuda:N"')
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints to keep in RUN (default 2)")
    parser.add_argument("--limit", type=int, help="train on only the first N faces (smoke tests)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def check_run_arguments(args: argparse.Namespace) -> None:
    """Apply --threads and check --data and --keep (see :func:`add_run_arguments`), or raise CliError."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise CliError(f"--data {args.data} is not a folder")
    if args.keep < 1:
        raise CliError("--keep must be ≥ 1")


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run-length and data options of :func:`add_run_arguments`, as the trainers' keyword arguments."""
    return {
        "kimg": args.kimg,
        "resume": args.resume,
        "minutes": args.minutes,
        "device": args.device,
        "num_workers": args.workers,
        "keep": args.keep,
        "limit": args.limit,
    }


def train_config(
    args: argparse.Namespace,
    named: Callable[[str], ConfigT],
    stored: Callable[[Path], ConfigT],
    default: str,
    overrides: Mapping[str, tuple[str, ...]],
) -> ConfigT:
    """The config named by --config (else the resumed checkpoint's, else ``default``) with the flags applied.

    ``overrides`` maps a flag's dest to the config fields it sets (when given); an invalid result is a CliError.
    """
    from fluidsrv.training.checkpoints import resume_checkpoint

    if args.config is not None:
        config = named(args.config)
    elif args.resume is not None:
        try:
            config = stored(resume_checkpoint(args.resume))
        except FileNotFoundError:
            raise CliError(f"no checkpoint to resume from at {args.resume}") from None
    else:
        config = named(default)
    changes = {
        field: getattr(args, flag)
        for flag, fields in overrides.items()
        if getattr(args, flag) is not None
        for field in fields
    }
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as error:
        raise CliError(str(error)) from error


_OVERRIDES = {
    "batch": ("batch_size",),
    "lr": ("g_lr", "d_lr"),
    "gamma": ("r1_gamma",),
    "augment": ("augment",),
    "snapshot_kimg": ("snapshot_kimg",),
    "log_every": ("log_every",),
    "pl_weight": ("pl_weight",),
    "seed": ("seed",),
}
"""The generator's config flags and the TrainConfig fields they set."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill PID``, a job's time limit) raises KeyboardInterrupt, so a run snapshots."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_generator(args: argparse.Namespace) -> int:
    """Train the generator as the flags say and print where the result went."""
    from fluidsrv.training.configs import get_config
    from fluidsrv.training.gan import GENERATOR_EXPORT, stored_train_config, train_gan

    check_run_arguments(args)
    config = train_config(args, get_config, stored_train_config, "embedded-128", _OVERRIDES)
    try:
        with _sigterm_as_interrupt():
            state = train_gan(config, args.data, args.out, preload=args.preload, **run_options(args))
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from error
    except KeyboardInterrupt:  # before training started: there is nothing to snapshot yet
        print("fluidsrv: interrupted before the first training step", file=sys.stderr)
        return 130
    print(
        f"trained {config.name} to {state.kimg:.2f} kimg ({state.step} steps); generator: {args.out / GENERATOR_EXPORT}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``train`` alone (``python -m fluidsrv.cli.train generator ...``), without the other subcommands' imports.

    For machines that have only the training dependencies, such as a remote GPU with PyTorch but no server stack.
    """
    parser = argparse.ArgumentParser(prog="python -m fluidsrv.cli.train", description="Train an embedded model.")
    _add_targets(parser.add_subparsers(dest="target", required=True, metavar="TARGET"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except CliError as error:
        print(f"fluidsrv train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
