"""``fluidsrv faces PHOTO``: list the faces a detector finds; optionally save their aligned crops."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fluidsrv.cli import CliError
from fluidsrv.stages import Face

BOX_COLOUR = (0, 255, 0)
LANDMARK5_COLOUR = (255, 0, 0)
LANDMARK68_COLOUR = (255, 255, 0)
INNER_QUAD_COLOUR = (0, 255, 255)
OUTER_QUAD_COLOUR = (64, 128, 255)
QUAD_TOP_COLOUR = (255, 0, 255)  # the crop's top edge, so the overlay shows the crop's orientation


def register(subparsers: Any) -> None:
    """Add the ``faces`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "faces",
        help="list the faces found in a photo",
        description="Detect faces in PHOTO and print box, score and landmark count of each, numbered left to right "
        "(as the server and `fluidsrv edit` number them).",
    )
    parser.add_argument("photo", type=Path, help="the photo (JPEG, PNG, WebP, ...)")
    parser.add_argument("--detector", help="detector plugin name (default: settings, i.e. $FLUIDSRV_DETECTOR or dlib)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a detector option, e.g. --option model=/path/to/yunet.onnx (repeatable)",
    )
    parser.add_argument(
        "--save-aligned", type=Path, metavar="DIR", help="write each face's inner/outer crops and an overlay PNG here"
    )
    parser.add_argument("--size", type=int, default=1024, help="inner crop size in pixels (default 1024)")
    parser.add_argument("--device", help='"auto", "cpu" or a CUDA device such as "cuda:0"')
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Detect the faces, print them, and save crops and the overlay when asked."""
    from fluidsrv import pipeline
    from fluidsrv.settings import Settings

    if args.size < 16:
        raise CliError(f"--size must be at least 16, got {args.size}")
    settings = Settings.from_env(detector=args.detector, device=args.device)
    photo = read_photo(args.photo, settings.max_pixels)
    name, detector = build_detector(settings, parse_options(args.option))
    faces = pipeline.detect_faces(detector, photo)
    print(f"{args.photo.name}: {photo.shape[1]}x{photo.shape[0]}, {len(faces)} face(s) by {name}")
    for index, face in enumerate(faces):
        print(f"  {describe_face(index, face)}")
    if args.save_aligned is not None:
        for path in save_aligned(photo, faces, args.save_aligned, args.photo.stem, args.size):
            print(f"wrote {path}")
    return 0


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """Return ``KEY=VALUE`` strings as a dict (values stay strings; plugins convert them)."""
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise CliError(f"--option wants KEY=VALUE, got {pair!r}")
        options[key.strip()] = value
    return options


def read_photo_bytes(path: Path) -> bytes:
    """Return the bytes of the photo at ``path`` or raise CliError saying why it cannot be read."""
    if path.is_dir():
        raise CliError(f"{path} is a folder, not a photo")
    try:
        return path.read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}") from None


def read_photo(path: Path, max_pixels: int) -> np.ndarray:
    """Return the photo at ``path`` as uint8 RGB [H, W, 3], upright per its EXIF orientation."""
    from fluidsrv.image_io import ImageError, decode_image

    data = read_photo_bytes(path)
    try:
        return decode_image(data, max_pixels=max_pixels, max_bytes=None).pixels  # a local file: no upload limit
    except ImageError as error:
        raise CliError(f"{path}: {error}") from None


def build_detector(settings: Any, options: dict[str, str]) -> tuple[str, Any]:
    """Return (name, detector) of the first available configured detector, with ``options`` added to its own.

    Raises CliError with every candidate's reason when none is available.
    """
    from fluidsrv.plugins import PluginError, catalog_for

    catalog = catalog_for(settings)
    reasons = []
    for name in settings.stage_preferences("detector"):
        if name not in catalog.names("detector"):
            reasons.append(f"{name}: unknown (known: {', '.join(sorted(catalog.names('detector')))})")
            continue
        merged = {**catalog.configured_options("detector", name), **options}
        try:
            return name, catalog.create("detector", name, merged)
        except PluginError as error:
            reasons.append(str(error))
    raise CliError("no detector is available: " + "; ".join(reasons))


def describe_face(index: int, face: Face) -> str:
    """Return one line about ``face``: index, box, size, score and landmark count."""
    x0, y0, x1, y1 = face.box
    landmarks = 68 if face.landmarks68 is not None else len(face.landmarks5)
    return (
        f"#{index}  box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f})  {x1 - x0:.0f}x{y1 - y0:.0f} px"
        f"  score {face.score:.2f}  landmarks {landmarks}"
    )


def save_aligned(photo: np.ndarray, faces: Sequence[Face], folder: Path, stem: str, size: int) -> list[Path]:
    """Write ``{stem}_face{i}_inner.png`` / ``_outer.png`` per face and ``{stem}_overlay.png``; return the paths."""
    from PIL import Image

    from fluidsrv.geometry import align_face, face_landmarks

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    quads = []
    for index, face in enumerate(faces):
        alignment = align_face(photo, face_landmarks(face), size=size)
        quads.append((alignment.inner.quad, alignment.outer.quad))
        for crop in ("inner", "outer"):
            path = folder / f"{stem}_face{index}_{crop}.png"
            Image.fromarray(alignment.image(crop)).save(path)
            written.append(path)
    path = folder / f"{stem}_overlay.png"
    Image.fromarray(draw_overlay(photo, faces, quads)).save(path)
    written.append(path)
    return written


def draw_overlay(
    photo: np.ndarray, faces: Sequence[Face], quads: Sequence[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Return a copy of ``photo`` with each face's box, landmarks, index and inner/outer quads drawn on it."""
    import cv2

    canvas = np.ascontiguousarray(photo.copy())  # [H, W, 3] uint8 RGB
    thickness = max(1, round(max(photo.shape[:2]) / 600))
    for index, face in enumerate(faces):
        x0, y0, x1, y1 = (round(value) for value in face.box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), BOX_COLOUR, thickness, cv2.LINE_AA)
        label_scale = 0.6 * thickness
        cv2.putText(canvas, str(index), (x0, max(0, y0 - 4 * thickness)), 0, label_scale, BOX_COLOUR, thickness)
        if face.landmarks68 is not None:
            for x, y in face.landmarks68:
                cv2.circle(canvas, (round(x), round(y)), thickness, LANDMARK68_COLOUR, -1, cv2.LINE_AA)
        for x, y in face.landmarks5:
            cv2.circle(canvas, (round(x), round(y)), 2 * thickness, LANDMARK5_COLOUR, -1, cv2.LINE_AA)
    for inner, outer in quads:
        for quad, colour in ((outer, OUTER_QUAD_COLOUR), (inner, INNER_QUAD_COLOUR)):
            corners = np.round(quad).astype(np.int32).reshape(-1, 1, 2)  # [4, 1, 2]: TL, BL, BR, TR
            cv2.polylines(canvas, [corners], True, colour, thickness, cv2.LINE_AA)
        top_left, top_right = np.round(inner[0]).astype(int), np.round(inner[3]).astype(int)
        cv2.line(canvas, tuple(top_left.tolist()), tuple(top_right.tolist()), QUAD_TOP_COLOUR, thickness, cv2.LINE_AA)
    return canvas
