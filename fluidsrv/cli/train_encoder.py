"""``fluidsrv train encoder``: train the e4e-style encoder of a generator (a target of ``fluidsrv train``).

Registered through :data:`fluidsrv.cli.train.TARGET_MODULES` (this module's ``register_target``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fluidsrv.cli import CliError


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
    parser.add_argument("--data", type=Path, required=True, help="folder with faces128-*.zip shards")
    parser.add_argument(
        "--generator",
        type=Path,
        required=True,
        help="the generator: our generator .safetensors, a rosinality .pt, or a GAN training checkpoint "
        "(whose discriminator then also gives the perceptual features)",
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder to write into")
    parser.add_argument("--kimg", type=float, required=True, help="train until this many thousand real faces in total")
    parser.add_argument("--resume", type=Path, help="checkpoint file, or a run folder (its newest checkpoint)")
    parser.add_argument("--config", choices=sorted(TRAIN_CONFIGS), help="training config (default encoder-128)")
    parser.add_argument("--discriminator", type=Path, help="GAN checkpoint or rosinality .pt for perceptual features")
    parser.add_argument("--cache-dir", type=Path, help="weights cache holding LPIPS-VGG (default: the settings')")
    parser.add_argument("--export", type=Path, help="also copy the final encoder.safetensors here")
    parser.add_argument(
        "--generator-file", help="generator file name recorded in the encoder (default: --generator's name)"
    )
    parser.add_argument("--batch", type=int, help="real faces per step (as many generated pairs again)")
    parser.add_argument("--lr", type=float, help="Adam learning rate of the encoder")
    parser.add_argument("--snapshot-kimg", type=float, help="checkpoint interval in thousand real faces")
    parser.add_argument("--log-every", type=int, help="steps between log lines")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--minutes", type=float, help="stop (with a snapshot) after this many minutes")
    parser.add_argument("--device", default="auto", help='"auto" (CUDA when available), "cpu" or "cuda:N"')
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints to keep in RUN (default 2)")
    parser.add_argument("--limit", type=int, help="train on only the first N faces (smoke tests)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.set_defaults(handler=run_encoder)


def _train_config(args: argparse.Namespace) -> Any:
    from fluidsrv.training.encoder import get_train_config, latest_checkpoint, stored_train_config, with_overrides

    if args.config is not None:
        config = get_train_config(args.config)
    elif args.resume is not None:
        resume = latest_checkpoint(args.resume) if args.resume.is_dir() else args.resume
        if resume is None or not resume.is_file():
            raise CliError(f"no checkpoint to resume from at {args.resume}")
        config = stored_train_config(resume)
    else:
        config = get_train_config("encoder-128")
    try:
        return with_overrides(
            config,
            batch_size=args.batch,
            lr=args.lr,
            snapshot_kimg=args.snapshot_kimg,
            log_every=args.log_every,
            seed=args.seed,
        )
    except ValueError as error:
        raise CliError(str(error)) from error


def run_encoder(args: argparse.Namespace) -> int:
    """Train the encoder as the flags say and print where the result went."""
    import shutil

    import torch

    from fluidsrv.settings import Settings
    from fluidsrv.training.encoder import ENCODER_EXPORT, EncoderRun, train_encoder

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise CliError(f"--data {args.data} is not a folder")
    if not args.generator.is_file():
        raise CliError(f"--generator {args.generator} does not exist")
    if args.keep < 1:
        raise CliError("--keep must be ≥ 1")
    config = _train_config(args)
    run = EncoderRun(
        data_dir=args.data,
        generator_path=args.generator,
        run_dir=args.out,
        kimg=args.kimg,
        resume=args.resume,
        discriminator=args.discriminator,
        cache_dir=args.cache_dir if args.cache_dir is not None else Settings.from_env().cache_dir,
        minutes=args.minutes,
        device=args.device,
        num_workers=args.workers,
        keep=args.keep,
        limit=args.limit,
        generator_file=args.generator_file,
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
