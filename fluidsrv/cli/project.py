"""``fluidsrv project PHOTO``: invert a face by optimisation and film the search (``--video steps.mp4``).

The face is detected, FFHQ-aligned at the generator's resolution and encoded by the server's own pipeline
(:func:`fluidsrv.pipeline.detect_faces` and :func:`fluidsrv.pipeline.prepare`, without its fine-tune), or taken as
is with ``--aligned``; the encoder is the ``project`` plugin, run step by step, and every ``--frame-every``-th
step's render becomes a video frame (the aligned target on the left, the current render on the right).
``--pti N`` continues with N steps of pivotal tuning and films those too.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fluidsrv.cli import CliError
from fluidsrv.cli.faces import build_detector, parse_options, read_photo

if TYPE_CHECKING:
    from fluidsrv.pipeline import StageBundle

EMBEDDED_GENERATOR = "generator-128.safetensors"
MIN_VIDEO_SIDE = 256  # small generators' frames are enlarged (nearest neighbour) to at least this
MACRO_BLOCK = 16  # H.264 frame sides must be multiples of this (imageio would otherwise resize)
PREVIEWER = "generator"  # prepare fits a previewer; this built-in one has nothing to fit
UNSHOWN_STAGES = ("align", "distill")  # prepare's steps around the encoder: neither filmed nor printed


def register(subparsers: Any) -> None:
    """Add the ``project`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "project",
        help="invert a face by optimisation and film the steps",
        description="Detect and align the face in PHOTO, project it into the generator (w, then w+) with the "
        "'project' encoder, optionally fine-tune the generator (PTI), and write the steps as a video.",
    )
    parser.add_argument("photo", type=Path, help="the photo (JPEG, PNG, WebP, ...)")
    parser.add_argument("--video", type=Path, help="write the steps as an MP4 video here")
    parser.add_argument("--out", type=Path, help="write the final reconstruction as a PNG here")
    parser.add_argument("--latents", type=Path, help="write w, ws (and the PTI delta) as safetensors here")
    parser.add_argument(
        "--generator",
        default="embedded",
        help="generator file (our safetensors, a rosinality .pt or a GAN checkpoint); default: the embedded one",
    )
    parser.add_argument("--aligned", action="store_true", help="PHOTO is already an aligned face crop: no detection")
    parser.add_argument("--face", type=int, default=0, help="which detected face, numbered left to right (default 0)")
    parser.add_argument("--detector", help="detector plugin (default: settings, i.e. $FLUIDSRV_DETECTOR or dlib)")
    parser.add_argument("--steps", type=int, default=300, help="w steps (default 300)")
    parser.add_argument("--wplus-steps", type=int, default=100, help="w+ steps (default 100)")
    parser.add_argument("--frame-every", type=int, default=5, help="film every k-th step (default 5)")
    parser.add_argument("--fps", type=float, default=24.0, help="video frame rate (default 24)")
    parser.add_argument("--pti", type=int, default=0, metavar="STEPS", help="then fine-tune the generator (PTI)")
    parser.add_argument("--pti-mode", choices=("lowrank", "full"), default="lowrank", help="PTI delta kind")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a projector option, e.g. --option lr=0.05 or --option discriminator=CKPT (repeatable)",
    )
    parser.add_argument("--device", help='"auto", "cpu" or a CUDA device such as "cuda:0"')
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Align the face, project it (and tune), and write the video / image / latents asked for."""
    import torch

    from fluidsrv.settings import Settings

    if args.steps < 1 or args.wplus_steps < 0 or args.frame_every < 1 or args.pti < 0 or args.fps <= 0:
        raise CliError("need --steps >= 1, --wplus-steps >= 0, --frame-every >= 1, --pti >= 0 and --fps > 0")
    settings = Settings.from_env(detector=args.detector, device=args.device)
    device = torch.device(settings.resolved_device())
    generator = load_cli_generator(args.generator, settings, device)
    options: dict[str, Any] = {"steps": args.steps, "wplus_steps": args.wplus_steps, "frame_every": args.frame_every}
    options.update(parse_options(args.option))
    encoder = build_stage(settings, device, "encoder", "project", options)
    frames: list[np.ndarray] = []
    face, w, ws = invert(args, settings, device, generator, encoder, frames)
    tensors = {"w": w.detach().cpu(), "ws": ws.detach().cpu()}
    final = generator
    if args.pti > 0:
        # the CLI's own PTI: it films every --frame-every-th step and uses the encoder's perceptual distance,
        # which the pipeline's fine-tune (the server's fixed recipe) does not
        from fluidsrv.convert import image_to_tensor
        from fluidsrv.pti import apply_delta, finetune, pti_config

        distance = encoder.distance(device)
        config = pti_config(generator.resolution, args.pti_mode, steps=args.pti, distance_name=distance.name,
                            frame_every=args.frame_every)
        target = image_to_tensor(face, device)  # [1, 3, R, R]
        delta = drive(finetune(generator, target, ws, config, distance), frames)
        final = apply_delta(generator, delta)
        tensors.update({f"delta.{name}": value.detach().cpu().contiguous() for name, value in delta.items()})
    with torch.no_grad():
        result = final.synthesis(ws.to(device), noise_mode="const")  # [1, 3, R, R]
    write_outputs(args, face, frames, result, tensors)
    return 0


def load_cli_generator(name: str, settings: Any, device: Any) -> Any:
    """Load ``--generator`` ("embedded" = weights/generator-128.safetensors) or raise CliError."""
    from fluidsrv.training.encoder import load_training_generator

    path = settings.weights_dir / EMBEDDED_GENERATOR if name == "embedded" else Path(name).expanduser()
    if not path.is_file():
        hint = " (the embedded generator is not trained yet; pass --generator FILE)" if name == "embedded" else ""
        raise CliError(f"generator {path} does not exist{hint}")
    try:
        return load_training_generator(path, device)
    except ValueError as error:
        raise CliError(f"{path}: {error}") from None


def projection_stages(settings: Any, device: Any, generator: Any, encoder: Any) -> StageBundle:
    """The pipeline's stages for a projection: the configured detector, segmenter and inpainter, ``encoder``, the
    generator previewer and no fine-tune (``--pti`` fine-tunes here, filmed)."""
    from fluidsrv.pipeline import StageBundle

    return StageBundle(
        generator=generator, detector=build_detector(settings, {})[1], encoder=encoder,
        segmenter=configured_stage(settings, device, "segmenter"),
        inpainter=configured_stage(settings, device, "inpainter"),
        previewer=build_stage(settings, device, "previewer", PREVIEWER, {}), device=device, finetune="none")


def invert(
    args: argparse.Namespace, settings: Any, device: Any, generator: Any, encoder: Any, frames: list[np.ndarray]
) -> tuple[np.ndarray, Any, Any]:
    """Return (the face, uint8 RGB [R, R, 3]; w; ws): found, aligned and encoded by the pipeline's detect and
    prepare, or with ``--aligned`` PHOTO resized to the generator's resolution and encoded as it is."""
    from PIL import Image

    from fluidsrv import pipeline
    from fluidsrv.convert import image_to_tensor

    photo = read_photo(args.photo, settings.max_pixels)
    if args.aligned:  # nothing to detect or align: no detector is needed
        side = generator.resolution
        face = np.asarray(Image.fromarray(photo).resize((side, side), Image.Resampling.LANCZOS))
        latents = drive(encoder.encode(image_to_tensor(face, device), generator), frames)
        return face, latents.w, latents.ws
    stages = projection_stages(settings, device, generator, encoder)
    faces = pipeline.detect_faces(stages.detector, photo)
    if not faces:
        raise CliError(f"{args.photo}: no face found (pass --aligned if it is already an aligned crop)")
    if not 0 <= args.face < len(faces):
        raise CliError(f"--face {args.face}: only {len(faces)} face(s) found (numbered left to right from 0)")
    made = drive(pipeline.prepare(stages, photo, faces, args.face), frames)
    prepared = made.prepared
    return prepared.alignment.inner_image, prepared.w, prepared.ws


def configured_stage(settings: Any, device: Any, stage: str) -> Any:
    """Build the first available plugin of ``stage`` among the settings' preferences, or raise CliError."""
    from fluidsrv.plugins import PluginError, catalog_for

    try:
        name = catalog_for(settings, device=device).first_available(stage, settings.stage_preferences(stage))
    except PluginError as error:
        raise CliError(str(error)) from None
    return build_stage(settings, device, stage, name, {})


def build_stage(settings: Any, device: Any, stage: str, name: str, options: dict[str, Any]) -> Any:
    """Build a stage plugin through the process's plugin catalog (its configured options with ``options`` on top),
    or raise CliError with its reason."""
    from fluidsrv.plugins import PluginError, catalog_for

    catalog = catalog_for(settings, device=device)
    try:
        return catalog.create(stage, name, {**catalog.configured_options(stage, name), **options})
    except PluginError as error:
        raise CliError(str(error)) from None


def drive(job: Any, frames: list[np.ndarray]) -> Any:
    """Run a step job to the end, collecting its frames and printing progress about ten times; return its result.

    Prepare's align and distill steps (UNSHOWN_STAGES) are skipped: the aligned face is the left half of every
    frame already.
    """
    while True:
        try:
            progress = next(job)
        except StopIteration as stop:
            return stop.value
        if progress.stage in UNSHOWN_STAGES:
            continue
        if progress.frame is not None:
            frames.append(progress.frame)
        if progress.step == progress.total or progress.step % max(1, progress.total // 10) == 0:
            print(f"{progress.stage} {progress.step}/{progress.total}: {progress.message}", file=sys.stderr)


def video_frame(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Target and current render side by side, enlarged (nearest) to ≥ 256 px high with sides multiple of 16."""
    pair = np.concatenate([target, current], axis=1)  # [R, 2R, 3]
    scale = max(1, math.ceil(MIN_VIDEO_SIDE / pair.shape[0]))
    pair = pair.repeat(scale, axis=0).repeat(scale, axis=1)  # [sR, 2sR, 3]
    pad_h, pad_w = (-pair.shape[0]) % MACRO_BLOCK, (-pair.shape[1]) % MACRO_BLOCK
    return np.pad(pair, ((0, pad_h), (0, pad_w), (0, 0)))


def write_video(path: Path, target: np.ndarray, frames: list[np.ndarray], fps: float) -> None:
    """Write ``frames`` (uint8 [R, R, 3]) beside ``target`` as an H.264 MP4."""
    import imageio.v2 as imageio

    if not frames:
        raise CliError("no frames to film")
    writer: Any = imageio.get_writer(
        path, fps=fps, codec="libx264", macro_block_size=MACRO_BLOCK, ffmpeg_log_level="error"
    )
    with writer:
        for frame in frames:
            writer.append_data(video_frame(target, frame))


def write_outputs(
    args: argparse.Namespace, face: np.ndarray, frames: list[np.ndarray], result: Any, tensors: dict[str, Any]
) -> None:
    """Write the video, the final image and the latents that were asked for, and say where they went."""
    from PIL import Image
    from safetensors.torch import save_file

    from fluidsrv.pti import image_to_frame

    if args.video is not None:
        write_video(args.video, face, frames, args.fps)
        print(f"wrote {args.video} ({len(frames)} frames)")
    if args.out is not None:
        Image.fromarray(image_to_frame(result)).save(args.out)
        print(f"wrote {args.out}")
    if args.latents is not None:
        save_file(tensors, str(args.latents), metadata={"format": "fluidsrv-latents"})
        print(f"wrote {args.latents}")
