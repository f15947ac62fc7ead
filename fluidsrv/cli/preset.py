"""``fluidsrv preset train | apply | list``: single-edit presets (one hard-coded edit, no generator at run time).

``train`` distils one slider move of the generator into a small image-to-image network
(:mod:`fluidsrv.training.preset`); ``apply`` runs detect → align → the preset's network → finalize's detail
transfer and paste-back (:mod:`fluidsrv.presets`) on a photo and writes a JPEG of its size, without ever loading a
generator; ``list`` prints the presets of a folder (default: the shipped ``weights/presets/``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fluidsrv.cli import CliError
from fluidsrv.cli.edit import check_output
from fluidsrv.cli.faces import build_detector, read_photo_bytes

EXAMPLES = """\
examples:
  fluidsrv preset train --direction age --strength 3.5 -o weights/presets/older.safetensors --data ../shared/data
  fluidsrv preset apply photo.jpg --preset older -o older.jpg
  fluidsrv preset apply group.jpg --preset weights/presets/smile.safetensors --face 1 -o smile.jpg
  fluidsrv preset list
"""


def register(subparsers: Any) -> None:
    """Add the ``preset`` subcommand and its actions."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "preset", help="train or apply a single-edit preset (one edit, no generator at run time)",
        description="Single-edit presets: one slider move of the generator distilled into a small network, applied "
        "to photos without the generator.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from fluidsrv.training.preset import PresetTrainConfig

    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = actions.add_parser("train", help="distil one slider move into a preset file")
    train.add_argument("--direction", required=True, help="the slider, by name or label (e.g. age, smile)")
    train.add_argument("--strength", type=float, required=True, help="the slider value the preset bakes in")
    train.add_argument("-o", "--out", type=Path, required=True, metavar="NAME.safetensors",
                       help="the preset file; its stem is the preset's name")
    train.add_argument("--label", help="what the button says (default: the slider's label)")
    train.add_argument("--generator", default="embedded", help='"embedded" (default) or a generator checkpoint')
    train.add_argument("--data", type=Path, help="folder with faces128-*.zip shards: adds real faces (needs e4e)")
    train.add_argument("--minutes", type=float, default=5.0, help="training time (default 5)")
    train.add_argument("--steps", type=int, default=0, help="stop after this many steps (default: by time only)")
    train.add_argument("--bank", type=int, default=PresetTrainConfig.bank,
                       help=f"pairs made once and reused (0: fresh ones every step; default {PresetTrainConfig.bank})")
    train.add_argument("--crop", type=int, default=PresetTrainConfig.crop,
                       help=f"train on random crops of this side (0: whole faces; default {PresetTrainConfig.crop})")
    train.add_argument("--threads", type=int, help="CPU threads for torch")
    train.set_defaults(handler=run_train)

    apply = actions.add_parser("apply", help="apply a preset to a photo and write a JPEG of its size")
    apply.add_argument("photo", type=Path, help="the photo (JPEG, PNG, WebP, ...)")
    apply.add_argument("--preset", required=True, help="a preset file, or the name of one in --presets")
    apply.add_argument("-o", "--out", type=Path, required=True, metavar="OUT.jpg", help="the edited photo (a JPEG)")
    apply.add_argument("--face", type=int, metavar="N", help="edit only face N, left to right from 0 (default: all)")
    apply.add_argument("--presets", type=Path, help="the presets folder (default: WEIGHTS/presets)")
    apply.add_argument("--detector", help="detector plugin (default: settings, i.e. $FLUIDSRV_DETECTOR or dlib)")
    apply.add_argument("--device", help='"auto", "cpu" or a CUDA device such as "cuda:0"')
    apply.set_defaults(handler=run_apply)

    listing = actions.add_parser("list", help="print the presets of a folder as JSON")
    listing.add_argument("--presets", type=Path, help="the presets folder (default: WEIGHTS/presets)")
    listing.set_defaults(handler=run_list)


def presets_folder(settings: Any, given: Path | None) -> Path:
    """The presets folder: ``given``, else the settings' weights folder's ``presets``."""
    from fluidsrv.presets import PRESETS_FOLDER

    return given if given is not None else Path(settings.weights_dir) / PRESETS_FOLDER


def resolve_preset(spec: str, folder: Path) -> Path:
    """The preset file ``spec`` names: a path to a file, or a preset name in ``folder``; CliError otherwise."""
    from fluidsrv.presets import find_presets

    path = Path(spec)
    if path.suffix and path.is_file():
        return path
    found = find_presets(folder)
    if spec in found:
        return found[spec]
    known = ", ".join(found) or "none"
    raise CliError(f"no preset {spec!r}: not a file, and {folder} has {known}")


def build_segmenter(settings: Any) -> Any:
    """The first available segmenter of the settings' preferences (as the server picks it)."""
    from fluidsrv.plugins import PluginError, catalog_for

    catalog = catalog_for(settings)
    reasons = []
    for name in settings.stage_preferences("segmenter"):
        reason = catalog.unavailable_reason("segmenter", name) if name in catalog.names("segmenter") else "unknown"
        if reason is None:
            try:
                return catalog.create("segmenter", name)
            except PluginError as error:
                reason = str(error)
        reasons.append(f"{name}: {reason}")
    raise CliError("no segmenter is available: " + "; ".join(reasons))


def run_apply(args: argparse.Namespace) -> int:
    """Detect, edit every face (or ``--face``) with the preset and write the JPEG; never builds a generator."""
    from fluidsrv import pipeline
    from fluidsrv.image_io import ImageError, decode_image
    from fluidsrv.presets import PresetError, apply_preset, load_preset
    from fluidsrv.settings import Settings

    check_output(args.out)
    if args.face is not None and args.face < 0:
        raise CliError(f"--face must be 0 or more, got {args.face}")
    settings = Settings.from_env(detector=args.detector, device=args.device)
    path = resolve_preset(args.preset, presets_folder(settings, args.presets))
    try:
        preset = load_preset(path, settings.resolved_device())
    except PresetError as error:
        raise CliError(str(error)) from None
    data = read_photo_bytes(args.photo)
    try:
        decoded = decode_image(data, max_pixels=settings.max_pixels, max_bytes=None)
    except ImageError as error:
        raise CliError(f"{args.photo}: {error}") from None
    _, detector = build_detector(settings, {})
    started = time.perf_counter()
    try:
        photo, count = apply_preset(preset, detector, build_segmenter(settings), decoded.pixels, args.face)
    except PresetError as error:
        raise CliError(str(error)) from None
    if count == 0:
        raise CliError(f"no face was found in {args.photo}")
    args.out.write_bytes(pipeline.encode_result(photo, decoded.metadata))
    seconds = time.perf_counter() - started
    print(f"{preset.facts.label} on {count} face(s) of {args.photo.name} in {seconds:.2f} s: wrote {args.out}",
          file=sys.stderr)
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Distil the slider move into the preset file ``--out``."""
    import torch

    from fluidsrv.presets import PRESET_SUFFIX, PresetError, check_name
    from fluidsrv.training.preset import PresetTrainConfig, train_preset

    if args.out.suffix != PRESET_SUFFIX:
        raise CliError(f"-o must end in {PRESET_SUFFIX}, got {args.out}")
    try:
        check_name(args.out.stem)
    except PresetError as error:
        raise CliError(str(error)) from None
    if args.minutes <= 0 and args.steps <= 0:
        raise CliError("give --minutes or --steps above 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        run = train_preset(args.out.stem, args.direction, args.strength, args.out, generator=args.generator,
                           label=args.label, data_dir=args.data, minutes=args.minutes, max_steps=args.steps,
                           config=PresetTrainConfig(bank=args.bank, crop=args.crop))
    except (ValueError, PresetError) as error:
        raise CliError(str(error)) from None
    print(json.dumps(run.facts.describe(), indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print every preset of the folder with its facts, as JSON."""
    from fluidsrv.presets import PresetError, find_presets, read_facts
    from fluidsrv.settings import Settings

    folder = presets_folder(Settings.from_env(), args.presets)
    listed = []
    for name, path in find_presets(folder).items():
        try:
            listed.append(read_facts(path)[0].describe())
        except PresetError as error:
            listed.append({"name": name, "error": str(error)})
    print(json.dumps(listed, indent=2))
    return 0
