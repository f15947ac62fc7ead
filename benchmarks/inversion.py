"""Inversion quality and cost on held-out faces: encoder only, projector, encoder + PTI (both delta modes).

Usage::

    .venv/bin/python benchmarks/inversion.py [--generator FILE] [--encoder FILE | --untrained-encoder ARCH]
        [--data ../shared/data] [--photos ../shared/photos] [--faces 32] [--photo-limit 0]
        [--projector-steps 300] [--projector-wplus-steps 100] [--pti-steps 100] [--pti-modes lowrank,full]
        [--methods encoder,projector,encoder+pti] [--discriminator CKPT] [--device auto] [--threads N]
        [--json out.json]

Faces: the first ``--faces`` of the held-out split of the shards (ids >= 44,000, never trained on) and the
largest face of every photo in ``--photos`` (dlib-detected, FFHQ-aligned at the generator's resolution; at most
``--photo-limit`` photos, 0 = all). For each method and face: PSNR and MS-SSIM of the reconstruction against
the aligned face, the identity distance between the two (Euclidean distance of dlib's 128-d face embeddings,
``dlib_face_recognition_resnet_model_v1``; dlib calls < 0.6 the same person; landmarks are predicted on each
image inside the face box found on the aligned original, so a reconstruction is judged in the same frame), and
wall time per face (the encoder's load excluded by a warm-up; PTI's time includes its encoder pass).
Bytes per session are the PTI deltas' sizes.

Defaults are the embedded models. A missing generator file is replaced by an UNTRAINED generator of the
embedded architecture (``--random-generator``), and a missing encoder file by an untrained encoder only with
``--untrained-encoder ARCH``: the JSON says so (``generator.trained`` / ``encoder.trained``), and such figures prove
only that the pipeline runs, not its quality.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluidsrv import dlib_faces
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.perceptual import ImageDistance, inversion_distance, ms_ssim, psnr
from fluidsrv.plugins import StageCatalog, build_plugin_manager
from fluidsrv.pti import apply_delta, delta_nbytes, finetune, pti_config
from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR, REPO_ROOT, default_cache_dir
from fluidsrv.stages import Latents, PluginContext, StepJob

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_PHOTOS = REPO_ROOT.parent / "shared" / "photos"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
SAME_PERSON = 0.6  # dlib's threshold on the embedding distance


# ------------------------------------------------------------------------------------------------ faces


@dataclass(frozen=True)
class TestFace:
    """One aligned face to invert: where it came from and its pixels (uint8 [R, R, 3])."""

    name: str
    source: str  # "heldout" or "photos"
    pixels: np.ndarray


def heldout_faces(data_dir: Path, resolution: int, count: int) -> list[TestFace]:
    """The first ``count`` faces of the held-out split (ids >= 44,000), at the generator's resolution."""
    from fluidsrv.training.data import FaceShardDataset

    if count <= 0:
        return []
    dataset = FaceShardDataset(data_dir, "heldout", resolution=resolution, limit=count)
    return [TestFace(f"id{dataset.face_id(i)}", "heldout", dataset.load_face(i)) for i in range(dataset.num_faces)]


def photo_faces(photos_dir: Path, resolution: int, limit: int, detector: Any) -> list[TestFace]:
    """The largest face of each photo, FFHQ-aligned at ``resolution`` (photos without a face are skipped)."""
    from fluidsrv.geometry import align_face, face_landmarks
    from fluidsrv.image_io import decode_image

    faces = []
    paths = sorted(path for path in photos_dir.iterdir() if path.suffix.lower() in PHOTO_SUFFIXES)
    for path in paths[:limit] if limit > 0 else paths:
        photo = decode_image(path.read_bytes(), max_bytes=None).pixels
        found = detector.detect(photo)
        if not found:
            print(f"  {path.name}: no face found, skipped", file=sys.stderr)
            continue
        aligned = align_face(photo, face_landmarks(found[0]), size=resolution).inner_image
        faces.append(TestFace(path.stem, "photos", aligned))
    return faces


def to_model(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [R, R, 3] -> float [1, 3, R, R] in [-1, 1]."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float().div(127.5).sub(1.0).to(device)


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """float [1, 3, R, R] in [-1, 1] -> uint8 [R, R, 3]."""
    pixels = ((image[0].detach().float().cpu() + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0)
    return np.ascontiguousarray(pixels.numpy())


# ------------------------------------------------------------------------------------------------ methods


def drive(job: StepJob[Any]) -> Any:
    """Run a step job to its end and return its result."""
    while True:
        try:
            next(job)
        except StopIteration as stop:
            return stop.value


@dataclass
class Methods:
    """The inversion methods under test, sharing one generator and perceptual distance."""

    generator: Generator
    encoder: Any | None  # the e4e plugin's encoder, or None when unavailable
    projector: Any
    distance: ImageDistance
    pti_steps: int

    def encoder_only(self, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Render the encoder's ws (the encoder pass alone is timed as ``encode_seconds``)."""
        assert self.encoder is not None
        began = time.perf_counter()
        latents: Latents = drive(self.encoder.encode(target, self.generator))
        encode_seconds = time.perf_counter() - began
        with torch.no_grad():
            return self.generator.synthesis(latents.ws), {"encode_seconds": encode_seconds}

    def project(self, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Render the projector's ws."""
        latents: Latents = drive(self.projector.encode(target, self.generator))
        with torch.no_grad():
            return self.generator.synthesis(latents.ws), {}

    def encoder_pti(self, target: torch.Tensor, mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        """Encode, fine-tune (PTI) around the encoder's ws, and render with the tuned generator."""
        assert self.encoder is not None
        latents: Latents = drive(self.encoder.encode(target, self.generator))
        config = pti_config(  # the server's per-resolution defaults
            self.generator.resolution, mode, steps=self.pti_steps, distance_name=self.distance.name, frame_every=0  # type: ignore[arg-type]
        )
        delta = drive(finetune(self.generator, target, latents.ws, config, self.distance))
        with torch.no_grad():
            return apply_delta(self.generator, delta).synthesis(latents.ws), {"delta_bytes": delta_nbytes(delta)}


def measure(
    name: str,
    method: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]],
    faces: list[TestFace],
    device: torch.device,
) -> list[dict[str, Any]]:
    """Run ``method`` on every face and return one row of metrics each."""
    rows = []
    for index, face in enumerate(faces):
        target = to_model(face.pixels, device)
        began = time.perf_counter()
        reconstruction, extra = method(target)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        rows.append(
            {
                "method": name,
                "face": face.name,
                "source": face.source,
                "seconds": seconds,
                "psnr": float(psnr(reconstruction, target)),
                "ms_ssim": float(ms_ssim(reconstruction, target)) if face.pixels.shape[0] >= 48 else None,
                "identity": dlib_faces.identity_distance(face.pixels, to_pixels(reconstruction)),
                **extra,
            }
        )
        print(
            f"  {name} {index + 1}/{len(faces)} {face.name}: psnr {rows[-1]['psnr']:.2f} "
            f"id {rows[-1]['identity']:.3f} {seconds:.2f} s",
            file=sys.stderr,
        )
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means (and the identity pass rate) of one method's rows, overall and per source."""

    def stats(selected: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [row["identity"] for row in selected]
        ssims = [row["ms_ssim"] for row in selected if row["ms_ssim"] is not None]
        out = {
            "faces": len(selected),
            "psnr": statistics.fmean(row["psnr"] for row in selected),
            "ms_ssim": statistics.fmean(ssims) if ssims else None,
            "identity_mean": statistics.fmean(ids),
            "identity_median": statistics.median(ids),
            "same_person_rate": sum(value < SAME_PERSON for value in ids) / len(ids),
            "seconds_per_face": statistics.fmean(row["seconds"] for row in selected),
        }
        if "encode_seconds" in selected[0]:
            out["encode_ms_median"] = 1000 * statistics.median(row["encode_seconds"] for row in selected)
        if "delta_bytes" in selected[0]:
            out["bytes_per_session"] = statistics.fmean(row["delta_bytes"] for row in selected)
        return out

    summary = {"all": stats(rows)}
    for source in sorted({row["source"] for row in rows}):
        summary[source] = stats([row for row in rows if row["source"] == source])
    return summary


# ------------------------------------------------------------------------------------------------ main


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[Generator, dict[str, Any]]:
    """The generator under test and a description of it (trained or not)."""
    from fluidsrv.training.configs import get_config
    from fluidsrv.training.encoder import load_training_generator

    if args.generator.is_file():
        return load_training_generator(args.generator, device), {"file": str(args.generator), "trained": True}
    if args.random_generator is None:
        raise SystemExit(f"generator {args.generator} does not exist (pass --random-generator CONFIG to use one)")
    torch.manual_seed(0)
    generator = Generator(get_config(args.random_generator).generator).to(device).eval()
    generator.estimate_w_avg(num_samples=2_000)
    description = f"UNTRAINED {args.random_generator} generator ({args.generator} is missing)"
    return generator, {"file": None, "trained": False, "description": description}


def build_encoders(args: argparse.Namespace, device: torch.device) -> tuple[Any | None, Any, dict[str, Any]]:
    """The e4e encoder (or None), the projector, and a description of the encoder."""
    context = PluginContext(device=device, weights_dir=EMBEDDED_WEIGHTS_DIR, cache_dir=args.cache_dir)
    e4e_options: dict[str, Any] = {"encoder": str(args.encoder)}
    encoder_info: dict[str, Any] = {"file": str(args.encoder), "trained": True}
    if not args.encoder.is_file():
        if not args.untrained_encoder:
            encoder_info = {"file": None, "trained": None, "description": f"{args.encoder} is missing: not measured"}
            e4e_options = {}
        else:
            e4e_options = {"untrained": True, "architecture": args.untrained_encoder}
            description = f"UNTRAINED {args.untrained_encoder} encoder ({args.encoder} is missing)"
            encoder_info = {"file": None, "trained": False, "description": description}
    projector_options = {"steps": args.projector_steps, "wplus_steps": args.projector_wplus_steps, "frame_every": 0}
    if args.discriminator is not None:
        projector_options["discriminator"] = str(args.discriminator)
    options = {"encoder.e4e": e4e_options, "encoder.project": projector_options}
    catalog = StageCatalog(build_plugin_manager(load_entry_points=False), context, options=options)
    encoder = catalog.create("encoder", "e4e") if e4e_options else None
    return encoder, catalog.create("encoder", "project"), encoder_info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", type=Path, default=EMBEDDED_WEIGHTS_DIR / "generator-128.safetensors")
    parser.add_argument("--encoder", type=Path, default=EMBEDDED_WEIGHTS_DIR / "encoder-128.safetensors")
    parser.add_argument(
        "--random-generator",
        default="embedded-128",
        help="training config of the untrained stand-in for a missing generator ('' = refuse)",
    )
    parser.add_argument(
        "--untrained-encoder",
        metavar="ARCHITECTURE",
        help="stand in an untrained encoder of this architecture "
        "(e.g. encoder-128, to time it) when the encoder file is missing",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--faces", type=int, default=32, help="held-out faces from the shards")
    parser.add_argument("--photo-limit", type=int, default=0, help="photos to use (0 = all)")
    parser.add_argument("--projector-steps", type=int, default=300)
    parser.add_argument("--projector-wplus-steps", type=int, default=100)
    parser.add_argument("--pti-steps", type=int, default=100)
    parser.add_argument("--pti-modes", default="lowrank,full")
    parser.add_argument("--methods", default="encoder,projector,encoder+pti")
    parser.add_argument("--discriminator", type=Path, help="GAN checkpoint whose D gives the perceptual features")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.random_generator = args.random_generator or None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    generator, generator_info = load_models(args, device)
    encoder, projector, encoder_info = build_encoders(args, device)
    distance = inversion_distance(args.cache_dir, args.discriminator, device=device)
    resolution = generator.resolution

    from fluidsrv.cli.faces import build_detector
    from fluidsrv.settings import Settings

    faces = heldout_faces(args.data, resolution, args.faces) if args.data.is_dir() else []
    if args.photos.is_dir():
        _, detector = build_detector(Settings(detector="dlib"), {})
        faces += photo_faces(args.photos, resolution, args.photo_limit, detector)
    if not faces:
        raise SystemExit("no faces to invert (check --data / --photos)")
    methods = Methods(generator, encoder, projector, distance, args.pti_steps)
    wanted = [name.strip() for name in args.methods.split(",") if name.strip()]
    runs: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]] = {}
    skipped = {}
    for name in wanted:
        if name in ("encoder", "encoder+pti") and encoder is None:
            skipped[name] = encoder_info["description"]
            continue
        if name == "encoder":
            runs["encoder"] = methods.encoder_only
        elif name == "projector":
            runs["projector"] = methods.project
        elif name == "encoder+pti":
            for mode in (m.strip() for m in args.pti_modes.split(",") if m.strip()):
                runs[f"encoder+pti-{mode}"] = functools.partial(methods.encoder_pti, mode=mode)
        else:
            raise SystemExit(f"unknown method {name!r}")
    if encoder is not None:  # warm-up: load the encoder file once, outside the timings
        drive(encoder.encode(to_model(faces[0].pixels, device), generator))

    rows: list[dict[str, Any]] = []
    summary = {}
    for name, method in runs.items():
        method_rows = measure(name, method, faces, device)
        rows += method_rows
        summary[name] = summarise(method_rows)
    report = {
        "generator": generator_info,
        "encoder": encoder_info,
        "perceptual": distance.name,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "resolution": resolution,
        "faces": {
            "heldout": sum(f.source == "heldout" for f in faces),
            "photos": sum(f.source == "photos" for f in faces),
        },
        "settings": {
            "projector_steps": args.projector_steps,
            "projector_wplus_steps": args.projector_wplus_steps,
            "pti_steps": args.pti_steps,
        },
        "skipped": skipped,
        "summary": summary,
        "rows": rows,
    }
    print_table(report)
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
        print(f"wrote {args.json}")
    else:
        print(text)
    return 0


def print_table(report: dict[str, Any]) -> None:
    generator = report["generator"].get("description") or report["generator"]["file"]
    print(f"generator: {generator}; encoder: {report['encoder'].get('description') or report['encoder']['file']}")
    print(
        f"perceptual: {report['perceptual']}; device {report['device']} ({report['threads']} threads); "
        f"faces: {report['faces']}"
    )
    header = f"{'method':<22}{'faces':>6}{'PSNR':>8}{'MS-SSIM':>9}{'id dist':>9}{'id<0.6':>8}{'s/face':>9}{'bytes':>12}"
    print(header)
    for name, summary in report["summary"].items():
        s = summary["all"]
        ssim = f"{s['ms_ssim']:.3f}" if s["ms_ssim"] is not None else "-"
        size = f"{s['bytes_per_session']:,.0f}" if "bytes_per_session" in s else "-"
        print(
            f"{name:<22}{s['faces']:>6}{s['psnr']:>8.2f}{ssim:>9}{s['identity_mean']:>9.3f}"
            f"{s['same_person_rate']:>8.0%}{s['seconds_per_face']:>9.3f}{size:>12}"
        )
    for name, summary in report["summary"].items():
        if "encode_ms_median" in summary["all"]:
            print(f"{name}: encoder pass alone {summary['all']['encode_ms_median']:.1f} ms per face (median)")
    for name, reason in report["skipped"].items():
        print(f"{name:<22} skipped: {reason}")


if __name__ == "__main__":
    sys.exit(main())
