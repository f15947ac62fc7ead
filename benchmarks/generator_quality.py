"""Generator quality with independent, offline tools (issue 5, item 3): dlib detection rate, FD-dlib, sample grids.

Usage::

    .venv/bin/python benchmarks/generator_quality.py --generator weights/generator-128.safetensors \\
        [--data ../shared/data] [--out quality/] [--n-detect 1000] [--n-fd 2000] [--seed 0] [--json out.json]

``--generator`` takes our generator safetensors, a rosinality / e4e ``.pt`` (via ``fluidsrv.weights``), or a
training checkpoint (``checkpoint-*.safetensors``: its EMA generator).

(a) **Detection rate**: the fraction of ``--n-detect`` samples at ψ = 1.0 and at ψ = 0.7 in which dlib's HOG
    frontal face detector (upsampling once, on the 128² sample as is) finds a face. The same figure for real
    training faces is printed as the ceiling the detector allows at this size.
(b) **FD-dlib**: the Fréchet distance between dlib's 128-d face-recognition embeddings
    (``dlib_face_recognition_resnet_model_v1`` on the 68-point landmarks of the largest HOG detection) of
    ``--n-fd`` real training faces and ``--n-fd`` samples at ψ = 1.0, and, as the floor, between that real
    set and a second, disjoint real set of the same size. Faces without a detection get no embedding; those
    counts are reported and the distance uses the rest.
(c) **Sample grids**: ``samples-psi1.0.png`` and ``samples-psi0.7.png`` (8 × 4) in ``--out``.

The dlib model files come from the ``face-recognition-models`` package (located, not imported). Real faces are
drawn at random (``--seed``) from the training split (ids < 44,000). Prints a table, then the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg

from fluidsrv import dlib_faces
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.settings import REPO_ROOT
from fluidsrv.training.data import FaceShardDataset
from fluidsrv.training.gan import (
    CHECKPOINT_FORMAT,
    images_to_uint8,
    load_checkpoint_generator,
    resolve_device,
    save_image_grid,
)

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
GRID_COLUMNS, GRID_ROWS = 8, 4
DETECTOR_UPSAMPLE = 1


@dataclass
class FaceStats:
    """Detection flags of a set of images and the embeddings of those with a face."""

    detected: np.ndarray  # [N] bool
    embeddings: np.ndarray  # [M, 128] float64, M = faces embedded

    @property
    def rate(self) -> float:
        """Fraction of images with a detected face."""
        return float(self.detected.mean())


def analyse(images: np.ndarray, embed_first: int) -> FaceStats:
    """Detect faces in uint8 images ``[N, H, W, 3]``; embed the largest face of each of the first ``embed_first``."""
    detected = np.zeros(len(images), dtype=bool)
    embeddings = []
    for index, image in enumerate(images):
        found = dlib_faces.detect(image, upsample=DETECTOR_UPSAMPLE)
        detected[index] = bool(found)
        if found and index < embed_first:
            embeddings.append(dlib_faces.embedding(image, found[0]))
    return FaceStats(detected, np.asarray(embeddings, dtype=np.float64).reshape(-1, 128))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets ``[N, D]`` and ``[M, D]`` (NaN if < 2 rows)."""
    assert a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: regularise as the FID reference code does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    trace = np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(root))
    return float(np.sum((mean_a - mean_b) ** 2) + trace)


def load_any_generator(path: Path, device: torch.device) -> Generator:
    """Load a training checkpoint's EMA generator, or any generator file ``fluidsrv.weights`` reads."""
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") == CHECKPOINT_FORMAT:
                return load_checkpoint_generator(path, device)
    from fluidsrv.weights import load_generator

    generator, w_avg = load_generator(path, device)
    generator.w_avg.copy_(w_avg.to(generator.w_avg))
    return generator.eval().requires_grad_(False)


@torch.no_grad()
def generate(generator: Generator, count: int, psi: float, seed: int, batch: int) -> np.ndarray:
    """``count`` uint8 samples ``[count, R, R, 3]`` from seeded z at truncation ``psi`` (const noise)."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(count, generator.w_dim, generator=rng)  # [count, w_dim]
    device = generator.w_avg.device
    chunks = [
        images_to_uint8(generator(z[start : start + batch].to(device), truncation_psi=psi, noise_mode="const"))
        for start in range(0, count, batch)
    ]
    return np.concatenate(chunks)  # [count, R, R, 3]


def real_faces(data_dir: Path, count: int, seed: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random sets of ``count`` real training faces, uint8 ``[count, R, R, 3]`` each."""
    dataset = FaceShardDataset(data_dir, "train", resolution=resolution)
    if 2 * count > dataset.num_faces:
        raise SystemExit(f"need {2 * count} real faces, {data_dir} has {dataset.num_faces} training faces")
    order = np.random.default_rng(seed).permutation(dataset.num_faces)[: 2 * count]
    images = np.stack([dataset.load_face(int(index)) for index in order])  # [2·count, R, R, 3]
    return images[:count], images[count:]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three measurements and write the grids; return the figures."""
    device = resolve_device(args.device)
    generator = load_any_generator(args.generator, device)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "generator": str(args.generator),
        "resolution": generator.resolution,
        "w_dim": generator.w_dim,
        "detector": f"dlib HOG frontal, upsample {DETECTOR_UPSAMPLE}",
        "seed": args.seed,
    }

    samples = {}
    for psi in (1.0, 0.7):
        count = max(args.n_detect, args.n_fd if psi == 1.0 else 0)
        samples[psi] = generate(generator, count, psi, args.seed, args.batch)
        grid = torch.from_numpy(samples[psi][: GRID_COLUMNS * GRID_ROWS]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        save_image_grid(grid, args.out / f"samples-psi{psi:.1f}.png", GRID_COLUMNS)
    generated = analyse(samples[1.0], embed_first=args.n_fd)
    results["detection_rate_psi1.0"] = float(generated.detected[: args.n_detect].mean())
    results["detection_rate_psi0.7"] = analyse(samples[0.7][: args.n_detect], embed_first=0).rate

    real_a, real_b = real_faces(args.data, args.n_fd, args.seed, generator.resolution)
    stats_a, stats_b = analyse(real_a, args.n_fd), analyse(real_b, args.n_fd)
    generated_fd = FaceStats(generated.detected[: args.n_fd], generated.embeddings)
    results["detection_rate_real"] = float(np.concatenate([stats_a.detected, stats_b.detected]).mean())
    results["fd_dlib"] = _finite_or_none(frechet_distance(stats_a.embeddings, generated_fd.embeddings))
    results["fd_dlib_real_floor"] = _finite_or_none(frechet_distance(stats_a.embeddings, stats_b.embeddings))
    results["fd_sets"] = {
        name: {"images": len(stats.detected), "no_embedding": int((~stats.detected).sum())}
        for name, stats in (("real_a", stats_a), ("real_b", stats_b), ("generated_psi1.0", generated_fd))
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a distance that could not be computed (too few embeddings) is reported as null."""
    return value if np.isfinite(value) else None


def _format_distance(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_table(results: dict[str, Any]) -> None:
    """Print the headline figures as a small table."""
    rows = [
        ("detection rate ψ=1.0", f"{results['detection_rate_psi1.0']:.1%}", "goal ≥ 75 %"),
        ("detection rate ψ=0.7", f"{results['detection_rate_psi0.7']:.1%}", "goal ≥ 90 %"),
        ("detection rate, real faces", f"{results['detection_rate_real']:.1%}", "detector ceiling"),
        (
            "FD-dlib (real vs generated)",
            _format_distance(results["fd_dlib"]),
            "too few faces" if results["fd_dlib"] is None else "",
        ),
        ("FD-dlib floor (real vs real)", _format_distance(results["fd_dlib_real_floor"]), ""),
    ]
    for name, sets in results["fd_sets"].items():
        rows.append((f"no embedding: {name}", f"{sets['no_embedding']} / {sets['images']}", ""))
    for name, value, note in rows:
        print(f"{name:<32} {value:>14}  {note}")


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, measure, print the table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", type=Path, required=True, help="generator file or training checkpoint")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with faces128-*.zip shards")
    parser.add_argument("--out", type=Path, default=Path("generator-quality"), help="folder for the sample grids")
    parser.add_argument("--n-detect", type=int, default=1000, help="samples per ψ for the detection rate")
    parser.add_argument("--n-fd", type=int, default=2000, help="faces per set for FD-dlib")
    parser.add_argument("--seed", type=int, default=0, help="seeds the latents and the real-face draw")
    parser.add_argument("--batch", type=int, default=64, help="generator batch size")
    parser.add_argument("--device", default="auto", help='"auto", "cpu" or "cuda[:N]"')
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.n_detect < 1 or args.n_fd < 2:
        parser.error("--n-detect must be ≥ 1 and --n-fd ≥ 2")
    results = measure(args)
    print_table(results)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
