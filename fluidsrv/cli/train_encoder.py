"""``fluidsrv train encoder``: train the e4e-style encoder of a generator (a target of ``fluidsrv train``).

Registered through :data:`fluidsrv.cli.train.TARGET_MODULES` (this module's ``register_target``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fluidsrv.cli import CliError
from fluidsrv.cli.train import add_run_arguments, check_run_arguments, run_options, train_config

_OVERRIDES = {
    "batch": ("batch_size",),
    "lr": ("lr",),
    "snapshot_kimg": ("snapshot_kimg",),
    "log_every": ("log_every",),
    "seed": ("seed",),
}
"""The encoder's config flags and the EncoderTrainConfig fields they set."""


def register_target(targets: Any) -> None:
    """Add ``train encoder`` to the targets of ``fluidsrv train``."""
    from fluidsrv.training.encoder import TRAIN_CONFIGS

    parser: argparse.ArgumentParser = targets.add_parser(
        "encoder",
        help="train the e4e-style encoder (image -> ws) of a generator",
        description="Train (or resume) an Encoder4Editing-style encoder against a frozen generator, on real faces "
        "from the zip shards plus generated (w, image) pairs. RUN receives checkpoint-*.safetensors (+ -optim), "
        "encoder.safetensors (fp16, loadable by the e4e plugin), recon-*.png and log.jsonl.",
    )
    add_run_arguments(parser, counted="real faces")
    parser.add_argument(
        "--generator",
        type=Path,
        required=True,
        help="the generator: our generator .safetensors, a rosinality .pt, or a GAN training checkpoint "
        "(whose discriminator then also gives the perceptual features)",
    )
    parser.add_argument("--config", choices=sorted(TRAIN_CONFIGS), help="training config (default encoder-128)")
    parser.add_argument("--discriminator", type=Path, help="GAN checkpoint or rosinality .pt for perceptual features")
    parser.add_argument("--cache-dir", type=Path, help="weights cache holding LPIPS-VGG (default: the settings')")
    parser.add_argument("--export", type=Path, help="also copy the final encoder.safetensors here")
    parser.add_argument(
        "--generator-file", help="generator file name recorded in the encoder (default: --generator's name)"
    )
    parser.add_argument("--batch", type=int, help="real faces per step (as many generated pairs again)")
    parser.add_argument("--lr", type=float, help="Adam learning rate of the encoder")
    parser.set_defaults(handler=run_encoder)


def run_encoder(args: argparse.Namespace) -> int:
    """Train the encoder as the flags say and print where the result went."""
    import shutil

    from fluidsrv.settings import Settings
    from fluidsrv.training.encoder import (
        ENCODER_EXPORT,
        EncoderRun,
        get_train_config,
        stored_train_config,
        train_encoder,
    )

    check_run_arguments(args)
    if not args.generator.is_file():
        raise CliError(f"--generator {args.generator} does not exist")
    config = train_config(args, get_train_config, stored_train_config, "encoder-128", _OVERRIDES)
    run = EncoderRun(
        data_dir=args.data,
        generator_path=args.generator,
        run_dir=args.out,
        discriminator=args.discriminator,
        cache_dir=args.cache_dir if args.cache_dir is not None else Settings.from_env().cache_dir,
        generator_file=args.generator_file,
        **run_options(args),
    )
    try:
        state = train_encoder(config, run)
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from error
    export = args.out / ENCODER_EXPORT
    if args.export is not None:
        shutil.copyfile(export, args.export)
        export = args.export
    print(f"trained encoder {config.name} to {state.kimg:.2f} kimg ({state.step} steps); encoder: {export}")
    return 0
