"""Latent-math tools on the command line: ``fluidsrv mix | morph | loop`` and ``fluidsrv directions list | compute``.

Faces are given as saved latents (a ``.pt`` / ``.safetensors`` file holding ``ws`` [1, num_ws, w_dim] or ``w``)
or as ``seed:N`` (a random face of the generator, truncated by ``--truncation``). The generator is
``--generator PATH`` (rosinality / e4e ``.pt`` or our safetensors), by default the embedded one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluidsrv.cli import CliError

if TYPE_CHECKING:
    import torch

    from fluidsrv.models.stylegan2 import Generator

EMBEDDED_GENERATOR = "generator-128.safetensors"
SEED_PREFIX = "seed:"


def register(subparsers: Any) -> None:
    """Add the ``mix``, ``morph``, ``loop`` and ``directions`` subcommands."""
    mix = subparsers.add_parser(
        "mix",
        help="style-mix two faces (or move one toward the other)",
        description="Take the LAYERS of face B into face A (style mixing), or with --percent move A that many "
        "percent toward B on those layers (100 = B, > 100 exaggerates, < 0 moves away). Writes a PNG.",
    )
    mix.add_argument("face_a", help="latents file or seed:N")
    mix.add_argument("face_b", help="latents file or seed:N")
    mix.add_argument("--layers", default="coarse", help="coarse | middle | fine | START:STOP | all (default coarse)")
    mix.add_argument("--percent", type=float, help="blend A toward B by this many percent instead of swapping")
    mix.add_argument("--out", type=Path, default=Path("mix.png"), help="output image (default mix.png)")
    mix.add_argument("--save-latents", type=Path, help="also write the result's ws as safetensors")
    _add_common(mix, run_mix)

    morph = subparsers.add_parser(
        "morph", help="morph video through several faces", description="Interpolate through the faces in order."
    )
    morph.add_argument("faces", nargs="+", help="two or more latents files or seed:N")
    _add_video_output(morph, "morph.mp4", frames=24, frames_help="frames per transition")
    morph.add_argument("--loop", action="store_true", help="return to the first face at the end")
    morph.add_argument("--linear", action="store_true", help="constant speed (no easing at each face)")
    _add_common(morph, run_morph)

    loop = subparsers.add_parser(
        "loop",
        help="seamless 'deform' loop around one face",
        description="Wobble FACE with sine-modulated random offsets on the chosen layers; the last frame flows "
        "into the first.",
    )
    loop.add_argument("face", help="latents file or seed:N")
    _add_video_output(loop, "loop.gif", frames=48, frames_help="frames in one loop")
    loop.add_argument("--layers", default="all", help="coarse | middle | fine | START:STOP | all (default all)")
    loop.add_argument("--amplitude", type=float, default=0.5, help="offset size in stds of w (default 0.5)")
    loop.add_argument("--harmonics", type=int, default=2, help="random offsets, at 1..H cycles per loop (default 2)")
    loop.add_argument("--seed", type=int, default=0, help="seed of the random offsets (default 0)")
    _add_common(loop, run_loop)

    directions = subparsers.add_parser("directions", help="list edit directions or compute attribute directions")
    actions = directions.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="print the directions a source offers for the generator")
    listing.add_argument("--source", default="sefa", help="direction plugin name (default sefa)")
    listing.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a plugin option")
    _add_common(listing, run_directions_list)
    compute = actions.add_parser(
        "compute",
        help="fit and cache the attribute directions of the generator",
        description="Sample faces, score them (age, gender), fit InterFaceGAN boundaries and cluster-mean "
        "directions, and cache them where the 'attributes' direction plugin reads them.",
    )
    compute.add_argument(
        "--source",
        choices=("attributes", "named", "flow"),
        default="attributes",
        help="attributes: age/gender boundaries and cluster means (default); named: the named sliders (Age, Smile, "
        "Head turn, ...) with measured layer and slider ranges; flow: a conditional normalizing flow whose sliders "
        "read in attribute units (years, degrees)",
    )
    compute.add_argument("--out", type=Path, help="write the named sliders (or the flow) here instead of the cache")
    compute.add_argument("--scorer", default="classifier", help="scorer plugin (default classifier)")
    compute.add_argument("--samples", type=int, help="faces to render and score (default 2000; flow: 5000)")
    compute.add_argument("--steps", type=int, default=1_500, help="flow training steps (default 1500)")
    compute.add_argument("--batch", type=int, default=16, help="render batch size (default 16)")
    compute.add_argument("--fraction", type=float, default=0.3, help="top/bottom share per class (default 0.3)")
    compute.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_common(compute, run_directions_compute)


def _add_video_output(parser: argparse.ArgumentParser, out: str, frames: int, frames_help: str) -> None:
    """Add --out (a video file, default ``out``), --frames (default ``frames``) and --fps."""
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output .mp4 or .gif (default {out})")
    parser.add_argument("--frames", type=int, default=frames, help=f"{frames_help} (default {frames})")
    parser.add_argument("--fps", type=float, default=24.0, help="frames per second (default 24)")


def _add_common(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
    """Add the generator, truncation and device flags every command takes, and the command's handler."""
    parser.add_argument("--generator", type=Path, help=f"generator checkpoint (default weights/{EMBEDDED_GENERATOR})")
    parser.add_argument("--truncation", type=float, default=0.7, help="truncation psi for seed:N faces (default 0.7)")
    parser.add_argument("--device", default="cpu", help='"cpu" (default), "cuda" or "cuda:N"')
    parser.set_defaults(handler=handler)


# ---------------------------------------------------------------------------------------------- inputs


def load_cli_generator(path: Path | None, device: str) -> Generator:
    """Load ``path`` (default: the embedded generator) or raise CliError saying what is missing."""
    from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR
    from fluidsrv.weights import CheckpointError, load_generator

    if path is None:
        path = EMBEDDED_WEIGHTS_DIR / EMBEDDED_GENERATOR
        if not path.is_file():
            raise CliError(f"no embedded generator at {path} yet; pass --generator PATH")
    try:
        generator, _ = load_generator(path, device)
    except CheckpointError as error:
        raise CliError(str(error)) from None
    return generator


def load_face(spec: str, generator: Generator, truncation: float = 0.7) -> torch.Tensor:
    """``seed:N`` or a latents file -> ws [1, num_ws, w_dim] for ``generator``."""
    import torch

    device = next(generator.parameters()).device
    if spec.startswith(SEED_PREFIX):
        try:
            seed = int(spec[len(SEED_PREFIX) :])
        except ValueError:
            raise CliError(f"bad face {spec!r}: expected seed:N with an integer N") from None
        z = torch.randn(1, generator.w_dim, generator=torch.Generator().manual_seed(seed)).to(device)  # [1, w_dim]
        with torch.no_grad():
            return generator.mapping(z, truncation_psi=truncation)  # [1, num_ws, w_dim]
    return read_latents(Path(spec), generator.num_ws, generator.w_dim).to(device)


def read_latents(path: Path, num_ws: int, w_dim: int) -> torch.Tensor:
    """Read ``ws`` (or ``w``, repeated over the layers) from a ``.pt`` / ``.safetensors`` file as [1, num_ws, w_dim]."""
    import torch

    if not path.is_file():
        raise CliError(f"no latents file {path} (and not seed:N)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file: say which
        raise CliError(f"cannot read latents from {path}: {error}") from None
    if isinstance(data, dict):
        found = data.get("ws", data.get("w"))
        if not isinstance(found, torch.Tensor):
            raise CliError(f"{path} holds no 'ws' or 'w' tensor (keys: {sorted(map(str, data))})")
        data = found
    if not isinstance(data, torch.Tensor):
        raise CliError(f"{path} holds a {type(data).__name__}, not latents")
    ws = data.detach().float()
    if ws.ndim == 1:
        ws = ws[None]
    if ws.ndim == 2 and ws.shape == (1, w_dim):
        ws = ws[:, None].expand(1, num_ws, w_dim)
    elif ws.ndim == 2:
        ws = ws[None]
    if ws.shape != (1, num_ws, w_dim):
        raise CliError(f"{path}: latents of shape {tuple(data.shape)} do not fit [1, {num_ws}, {w_dim}]")
    return ws.contiguous()


def save_latents(path: Path, ws: torch.Tensor) -> None:
    """Write ``ws`` [1, num_ws, w_dim] as safetensors under the key ``ws``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"ws": ws.detach().float().cpu().contiguous()}, str(path))


def _layers(spec: str, num_ws: int) -> tuple[int, int]:
    from fluidsrv.latents import parse_layers

    if spec == "all":
        return 0, num_ws
    try:
        return parse_layers(spec, num_ws)
    except ValueError as error:
        raise CliError(str(error)) from None


def _check_video_out(path: Path) -> None:
    from fluidsrv.videos import VIDEO_SUFFIXES

    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise CliError(f"--out must end in {' or '.join(VIDEO_SUFFIXES)}, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)


def _write_video(args: argparse.Namespace, generator: Generator, path: torch.Tensor) -> int:
    """Render the latent path ``path`` [F, num_ws, w_dim] to --out at --fps; return the number of frames."""
    from fluidsrv.videos import render_frames, write_video

    frames = render_frames(generator, path)
    write_video(args.out, frames, args.fps)
    return len(frames)


# ---------------------------------------------------------------------------------------------- commands


def run_mix(args: argparse.Namespace) -> int:
    """Mix (or blend) two faces and write the image."""
    from PIL import Image

    from fluidsrv.latents import blend, mix_styles
    from fluidsrv.videos import render_frames

    generator = load_cli_generator(args.generator, args.device)
    ws_a = load_face(args.face_a, generator, args.truncation)
    ws_b = load_face(args.face_b, generator, args.truncation)
    start, stop = _layers(args.layers, generator.num_ws)
    target = ws_b if args.percent is None else blend(ws_a, ws_b, args.percent / 100.0)
    result = mix_styles(ws_a, target, start, stop)  # [1, num_ws, w_dim]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_frames(generator, result)[0]).save(args.out)
    what = f"{args.percent:g} % toward B" if args.percent is not None else "from B"
    print(f"wrote {args.out}: layers [{start}, {stop}) {what}")
    if args.save_latents is not None:
        save_latents(args.save_latents, result)
        print(f"wrote {args.save_latents}")
    return 0


def run_morph(args: argparse.Namespace) -> int:
    """Render a morph through the faces as a video."""
    import torch

    from fluidsrv.latents import morph_path

    if len(args.faces) < 2:
        raise CliError("morph needs at least two faces")
    if args.frames < 1 or args.fps <= 0:
        raise CliError("--frames must be >= 1 and --fps > 0")
    _check_video_out(args.out)
    generator = load_cli_generator(args.generator, args.device)
    keyframes = torch.cat([load_face(face, generator, args.truncation) for face in args.faces])  # [K, L, D]
    path = morph_path(keyframes, args.frames, loop=args.loop, ease=not args.linear)  # [F, L, D]
    frames = _write_video(args, generator, path)
    print(f"wrote {args.out}: {frames} frames through {len(args.faces)} faces")
    return 0


def run_loop(args: argparse.Namespace) -> int:
    """Render a seamless deform loop around one face."""
    from fluidsrv.latents import deform_loop, latent_spread

    if args.frames < 2 or args.harmonics < 1 or args.fps <= 0:
        raise CliError("--frames must be >= 2, --harmonics >= 1 and --fps > 0")
    _check_video_out(args.out)
    generator = load_cli_generator(args.generator, args.device)
    ws = load_face(args.face, generator, args.truncation)
    layers = _layers(args.layers, generator.num_ws)
    spread = latent_spread(generator, n=2_000)
    path = deform_loop(
        ws,
        args.frames,
        layers=layers,
        amplitude=args.amplitude,
        harmonics=args.harmonics,
        spread=spread,
        seed=args.seed,
    )
    frames = _write_video(args, generator, path)
    print(f"wrote {args.out}: {frames} frames, layers [{layers[0]}, {layers[1]})")
    return 0


def _plugin_context(args: argparse.Namespace, options: dict[str, str]) -> Any:
    from dataclasses import replace

    from fluidsrv.plugins import catalog_for
    from fluidsrv.settings import Settings

    return replace(catalog_for(Settings.from_env(), device=args.device).context, options=options)


def create_plugin(hook: str, name: str, context: Any) -> Any:
    """Build the plugin ``name`` of ``hook`` (e.g. ``fluidsrv_directions``) through the process's plugin catalog:
    its configured options with ``context.options`` on top; CliError if it cannot."""
    from fluidsrv.plugins import STAGE_HOOKS, PluginError

    stage = next(stage for stage, stage_hook in STAGE_HOOKS.items() if stage_hook == hook)
    catalog = context.catalog
    try:
        return catalog.create(stage, name, {**catalog.configured_options(stage, name), **context.options})
    except PluginError as error:
        raise CliError(str(error)) from None


def run_directions_list(args: argparse.Namespace) -> int:
    """Print the directions of a source for the generator."""
    from fluidsrv.cli.faces import parse_options
    from fluidsrv.direction_files import DirectionsUnavailableError

    generator = load_cli_generator(args.generator, args.device)
    context = _plugin_context(args, parse_options(args.option))
    try:
        directions = create_plugin("fluidsrv_directions", args.source, context).directions(generator)
    except (DirectionsUnavailableError, ValueError) as error:
        raise CliError(str(error)) from None
    for direction in directions:
        layers = "all" if direction.layers is None else f"{direction.layers[0]}:{direction.layers[1]}"
        low, high = direction.slider_range
        print(f"{direction.name:28} {direction.label:28} layers {layers:6} [{low:g}, {high:g}]  {direction.provenance}")
    return 0


def run_directions_compute(args: argparse.Namespace) -> int:
    """Fit the attribute directions of the generator and cache them."""
    from fluidsrv.attribute_directions import compute_attribute_directions
    from fluidsrv.direction_files import attribute_cache_path

    if args.samples is None:
        args.samples = 5_000 if args.source == "flow" else 2_000
    if args.samples < 10 or not 0 < args.fraction <= 0.5 or args.steps < 1:
        raise CliError("--samples must be >= 10, --fraction in (0, 0.5] and --steps >= 1")
    generator = load_cli_generator(args.generator, args.device)
    context = _plugin_context(args, {})
    if args.source == "named":
        return compute_named(args, generator, context)
    if args.source == "flow":
        return compute_flow(args, generator, context)
    scorer = create_plugin("fluidsrv_scorers", args.scorer, context)
    job = compute_attribute_directions(
        generator, scorer, args.scorer, context.cache_dir,
        samples=args.samples, batch_size=args.batch, seed=args.seed, truncation=args.truncation,
        fraction=args.fraction,
    )  # fmt: skip
    try:
        while True:
            progress = next(job)
            if progress.step == progress.total or progress.step % 10 == 0:
                print(f"  {progress.message}")
    except StopIteration as done:
        directions = done.value
    for direction in directions:
        print(f"{direction.name:22} {direction.label:24} {direction.provenance}")
    print(f"cached in {attribute_cache_path(context.cache_dir, generator, args.scorer)}")
    return 0


def drain(job: Any) -> Any:
    """Run a step job to its end, printing every tenth step and the last; return its result."""
    try:
        while True:
            progress = next(job)
            if progress.step == progress.total or progress.step % 10 == 0:
                print(f"  {progress.message}", flush=True)
    except StopIteration as done:
        return done.value


def compute_named(args: argparse.Namespace, generator: Generator, context: Any) -> int:
    """Fit the named sliders of the generator with the classifier and geometry scorers; write them."""
    from fluidsrv.direction_files import named_cache_path, save_directions
    from fluidsrv.training.named_directions import FitConfig, fit_named_directions

    scorers = [create_plugin("fluidsrv_scorers", name, context) for name in ("classifier", "geometry")]
    config = FitConfig(samples=args.samples, seed=args.seed, truncation=args.truncation, fraction=args.fraction)
    directions, metadata = drain(fit_named_directions(generator, scorers, config=config))
    out = args.out or named_cache_path(context.cache_dir, generator)
    save_directions(out, directions, metadata)
    for direction in directions:
        low, high = direction.slider_range
        print(f"{direction.label:18} [{low:g}, {high:g}]  {direction.provenance}")
    print(f"written to {out}")
    return 0


def compute_flow(args: argparse.Namespace, generator: Generator, context: Any) -> int:
    """Train the attribute flow of the generator with the classifier and geometry scorers; write it."""
    from fluidsrv.models.flow import read_sliders, save_flow
    from fluidsrv.training.flow import FlowFitConfig, fit_flow

    scorers = [create_plugin("fluidsrv_scorers", name, context) for name in ("classifier", "geometry")]
    fit = FlowFitConfig(samples=args.samples, seed=args.seed, truncation=args.truncation, steps=args.steps)
    flow, regressor, metadata = drain(fit_flow(generator, scorers, fit))
    out = args.out or create_plugin("fluidsrv_directions", "flow", context).cache_path(generator)
    save_flow(out, flow, regressor, metadata)
    for slider in read_sliders(metadata):
        print(f"{slider.name:18} [{slider.minimum:g}, {slider.maximum:g}] {slider.unit:28} "
              f"{slider.gain:.2f} measured per unit of condition change")
    print(f"written to {out}")
    return 0
