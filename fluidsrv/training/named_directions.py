"""Fit a generator's named sliders (Age, Gender, Smile, Head turn, ...) and measure where and how far they act.

The recipe, for every attribute a scorer plugin measures on rendered faces:

1. **Sample and score**: ``samples`` codes w (truncated toward w_avg), rendered and scored by the attribute
   scorers (``classifier``: age, gender; ``geometry``: smile, mouth and eyes open, yaw, pitch) and by the
   colour / lighting measures of :func:`colour_scores` (brightness, redness, warmth, side light).
2. **Direction**: the difference of the mean w of the highest and the lowest ``fraction`` of samples
   (InterFaceGAN's cluster means), made orthogonal to every *other* attribute's direction and to the colour /
   lighting ones (conditional manipulation), so a slider moves its own attribute and keeps the others.
3. **Layers**: the direction is tried on each candidate ws layer range at a fixed strength on fresh samples;
   the chosen range keeps most of the all-layer effect with the least leakage into the other attributes.
4. **Range**: the slider's maximum is the smallest strength (in standard deviations of w, see
   :func:`fluidsrv.latents.apply_sliders`) whose mean change reaches the attribute's target (e.g. +15 years),
   capped at :data:`MAX_STRENGTH` so that +max stays a plausible face.

Everything measured (per-range effects, the response curve) is stored in the file's metadata, so the model
card's table comes from the file itself.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fluidsrv import latents
from fluidsrv.directions import conditional_orthogonalize, mean_difference
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.stages import Direction, Progress, Scorer, StepJob

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

log = logging.getLogger(__name__)

NAMED_FORMAT_VERSION = "1"
MAX_STRENGTH = 5.0  # slider maximum never beyond this many standard deviations of w
MIN_STRENGTH = 1.0
STRENGTHS = (1.0, 2.0, 3.0, 4.0, 5.0)  # where the response curve is measured
PROBE_STRENGTH = 2.5  # strength of the layer-range trials


@dataclass(frozen=True)
class NamedAttribute:
    """One named slider: which score it moves, what a person reads, and how far +max should go."""

    score: str  # the scorer's attribute name
    name: str  # the direction's name (the slider id)
    label: str
    group: str
    unit: str
    target: float  # the mean change (in ``unit``) that +max should reach on generated faces


NAMED_ATTRIBUTES: tuple[NamedAttribute, ...] = (
    NamedAttribute("age", "age", "Age", "Face", "years", 20.0),
    NamedAttribute("gender", "gender", "Gender (→ male)", "Face", "P(male)", 0.45),
    NamedAttribute("smile", "smile", "Smile", "Expression", "mouth width / eye distance", 0.14),
    NamedAttribute("mouth_open", "mouth_open", "Mouth open", "Expression", "lip gap / mouth width", 0.12),
    NamedAttribute("eyes_open", "eyes_open", "Eyes open", "Expression", "eye aspect ratio", 0.08),
    NamedAttribute("yaw", "yaw", "Head turn", "Pose", "degrees", 20.0),
    NamedAttribute("pitch", "pitch", "Head tilt (up)", "Pose", "degrees", 12.0),
)
"""The sliders fitted by default, in the order the app lists them."""

LAYER_CANDIDATES_FRACTIONS: tuple[tuple[float, float], ...] = (
    (0.0, 1.0),
    (0.0, 0.34),
    (0.0, 0.5),
    (0.0, 0.67),
    (0.17, 0.5),
    (0.17, 0.67),
    (0.34, 0.67),
    (0.34, 1.0),
)
"""Candidate [start, stop) ws ranges as fractions of num_ws (coarse, middle, fine and their unions)."""


def layer_candidates(num_ws: int) -> list[tuple[int, int]]:
    """The candidate [start, stop) ws layer ranges for a generator with ``num_ws`` layers, without repeats."""
    found: list[tuple[int, int]] = []
    for start, stop in LAYER_CANDIDATES_FRACTIONS:
        layer_range = (round(start * num_ws), max(round(start * num_ws) + 1, round(stop * num_ws)))
        if layer_range not in found:
            found.append(layer_range)
    return found


def colour_scores(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Colour and lighting of the face's centre: brightness, redness, warmth, side light; each [N] in [-1, 1] units.

    ``images`` are aligned faces [N, 3, H, W] in [-1, 1]; the centre box covers cheeks, nose and mouth.
    """
    _, _, height, width = images.shape
    centre = images[:, :, round(0.4 * height) : round(0.8 * height), round(0.3 * width) : round(0.7 * width)]
    red, green, blue = centre[:, 0], centre[:, 1], centre[:, 2]  # [N, h, w]
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    half = luminance.shape[2] // 2
    return {
        "brightness": luminance.mean(dim=(1, 2)),
        "redness": (red - green).mean(dim=(1, 2)),
        "warmth": ((red + green) / 2 - blue).mean(dim=(1, 2)),
        "side_light": luminance[:, :, :half].mean(dim=(1, 2)) - luminance[:, :, half:].mean(dim=(1, 2)),
    }


ImageScorer = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def combine_scorers(scorers: Sequence[Scorer]) -> ImageScorer:
    """One function returning every scorer's attributes plus :func:`colour_scores` for images [N, 3, H, W]."""

    def score(images: torch.Tensor) -> dict[str, torch.Tensor]:
        found = colour_scores(images)
        for scorer in scorers:
            found.update({name: values.float().cpu() for name, values in scorer.score(images).items()})
        return found

    return score


@torch.no_grad()
def render_ws(generator: Generator, ws: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Render ws [N, num_ws, w_dim] to images [N, 3, R, R] in [-1, 1] (on CPU), in batches."""
    images = [
        generator.synthesis(ws[start : start + batch_size]).clamp(-1, 1).cpu()
        for start in range(0, len(ws), batch_size)
    ]
    return torch.cat(images)


@torch.no_grad()
def sample_codes(generator: Generator, count: int, seed: int, truncation: float) -> torch.Tensor:
    """``count`` seeded codes w [count, w_dim] mapped from z and truncated toward w_avg by ``truncation``."""
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(count, generator.w_dim, generator=rng, device=device)  # [count, w_dim]
    return generator.mapping(z, truncation_psi=truncation)[:, 0].float()  # [count, w_dim]


def score_codes(
    generator: Generator, w: torch.Tensor, score: ImageScorer, batch_size: int = 64
) -> StepJob[dict[str, torch.Tensor]]:
    """Step-wise: render and score codes w [N, w_dim]; returns one [N] tensor per score."""
    found: dict[str, list[torch.Tensor]] = {}
    total = math.ceil(len(w) / batch_size)
    for step, start in enumerate(range(0, len(w), batch_size)):
        chunk = w[start : start + batch_size]
        ws = chunk[:, None].expand(-1, generator.num_ws, -1)  # [B, num_ws, w_dim]
        for name, values in score(render_ws(generator, ws)).items():
            found.setdefault(name, []).append(values.float().cpu())
        yield Progress("named-directions", step + 1, total, f"scored {start + len(chunk)} of {len(w)} faces")
    return {name: torch.cat(values) for name, values in found.items()}


def finite_rows(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool [N]: the samples where every score is finite (the geometry scorer gives NaN when landmarks fail)."""
    keep = None
    for values in scores.values():
        finite = torch.isfinite(values)
        keep = finite if keep is None else keep & finite
    assert keep is not None, "no scores"
    return keep


def attribute_vectors(w: torch.Tensor, scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Per score, the unit vector [w_dim] from the mean w of its lowest to that of its highest ``fraction``.

    Cluster means rather than a logistic boundary's normal: on the embedded generator they move the attribute
    two to three times as far per standard deviation of w once made orthogonal to the others (measured).
    """
    return {name: mean_difference(w, values, fraction) for name, values in scores.items()}


def conditioned_vectors(vectors: dict[str, torch.Tensor], named: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each named direction made orthogonal to the other named directions and to the colour / lighting ones."""
    conditioned = {}
    for name in named:
        others = [vector for key, vector in vectors.items() if key != name]
        conditioned[name] = conditional_orthogonalize(vectors[name], others) if others else vectors[name]
    return conditioned


def direction_for(attribute: NamedAttribute, vector: torch.Tensor, layers: tuple[int, int] | None) -> Direction:
    """A slider Direction of ``attribute`` along unit ``vector`` [w_dim] on ``layers`` (range set later)."""
    return Direction(
        name=attribute.name,
        label=attribute.label,
        vector=vector.reshape(1, -1),
        layers=layers,
        slider_range=(-MAX_STRENGTH, MAX_STRENGTH),
        group=attribute.group,
    )


def edit_effects(
    generator: Generator,
    w: torch.Tensor,
    baseline: dict[str, torch.Tensor],
    direction: Direction,
    strength: float,
    spread: torch.Tensor,
    score: ImageScorer,
) -> dict[str, float]:
    """Mean change of every score when ``direction`` is applied at ``strength`` to codes w [N, w_dim]."""
    ws = w[:, None].expand(-1, generator.num_ws, -1)  # [N, num_ws, w_dim]
    moved = latents.apply_sliders(ws, {direction.name: direction}, {direction.name: strength}, spread=spread)
    edited = score(render_ws(generator, moved))
    effects = {}
    for name, values in edited.items():
        change = values - baseline[name]
        finite = torch.isfinite(change)
        effects[name] = float(change[finite].mean()) if bool(finite.any()) else float("nan")
    return effects


def leakage(effects: dict[str, float], target: str, stds: dict[str, float]) -> float:
    """Sum of the other scores' absolute mean changes, each in its own standard deviations."""
    return sum(abs(value) / stds[name] for name, value in effects.items() if name != target and math.isfinite(value))


def choose_layers(
    trials: dict[tuple[int, int], dict[str, float]], target: str, stds: dict[str, float], sign: float = 1.0
) -> tuple[int, int]:
    """The layer range with the best effect per leakage among those keeping ≥ 70 % of the best effect."""
    gains = {layers: sign * effects[target] / stds[target] for layers, effects in trials.items()}
    best = max(gains.values())
    eligible = [layers for layers, gain in gains.items() if gain >= 0.7 * best]

    def merit(layers: tuple[int, int]) -> float:
        return gains[layers] / (1.0 + leakage(trials[layers], target, stds))

    return max(eligible, key=merit)


def choose_strength(curve: dict[float, float], target: float) -> float:
    """The smallest strength whose mean change reaches ``target`` (linearly interpolated), within the limits."""
    previous_strength, previous_change = 0.0, 0.0
    for strength, change in sorted(curve.items()):
        if change >= target:
            step = change - previous_change
            fraction = (target - previous_change) / step if step > 0 else 1.0
            found = previous_strength + fraction * (strength - previous_strength)
            return float(min(MAX_STRENGTH, max(MIN_STRENGTH, round(found, 1))))
        previous_strength, previous_change = strength, change
    return MAX_STRENGTH


@dataclass(frozen=True)
class FitConfig:
    """How many faces to sample and score, and how the classes are chosen."""

    samples: int = 4_000
    probes: int = 96  # fresh faces for the layer and strength trials
    seed: int = 0
    truncation: float = 0.7
    fraction: float = 0.3


def fit_named_directions(
    generator: Generator,
    scorers: Sequence[Scorer],
    attributes: Sequence[NamedAttribute] = NAMED_ATTRIBUTES,
    config: FitConfig | None = None,
) -> StepJob[tuple[list[Direction], dict[str, str]]]:
    """Step-wise: sample, score, fit, measure layers and ranges; returns the directions and the file metadata."""
    config = config or FitConfig()
    score = combine_scorers(scorers)
    w = sample_codes(generator, config.samples, config.seed, config.truncation)
    scores = yield from score_codes(generator, w, score)
    available = [attribute for attribute in attributes if attribute.score in scores]
    missing = [attribute.score for attribute in attributes if attribute.score not in scores]
    if missing:
        log.warning("no scorer measures %s: those sliders are left out", ", ".join(missing))
    keep = finite_rows(scores)
    w, scores = w[keep], {name: values[keep] for name, values in scores.items()}
    stds = {name: float(values.std().clamp(min=1e-6)) for name, values in scores.items()}
    vectors = conditioned_vectors(attribute_vectors(w, scores, config.fraction), [a.score for a in available])

    probes = sample_codes(generator, config.probes, config.seed + 1, config.truncation)
    baseline = yield from score_codes(generator, probes, score)
    spread = latents.latent_spread(generator)
    directions, measured = [], {}
    for index, attribute in enumerate(available):
        trials = {
            layers: edit_effects(
                generator,
                probes,
                baseline,
                direction_for(attribute, vectors[attribute.score], layers),
                PROBE_STRENGTH,
                spread,
                score,
            )
            for layers in layer_candidates(generator.num_ws)
        }
        layers = choose_layers(trials, attribute.score, stds)
        candidate = direction_for(attribute, vectors[attribute.score], layers)
        curve = {
            strength: edit_effects(generator, probes, baseline, candidate, strength, spread, score)
            for strength in STRENGTHS
        }
        maximum = choose_strength({s: effects[attribute.score] for s, effects in curve.items()}, attribute.target)
        direction = Direction(
            name=attribute.name,
            label=attribute.label,
            vector=candidate.vector,
            layers=None if layers == (0, generator.num_ws) else layers,
            slider_range=(-maximum, maximum),
            group=attribute.group,
            provenance=(
                f"InterFaceGAN cluster means: mean w of the top minus the bottom {config.fraction:.0%} of {len(w)} "
                f"generated faces by "
                f"{attribute.score} ({attribute.unit}), orthogonal to the other attributes and to colour/lighting; "
                f"ws layers {layers[0]}:{layers[1]}; +max = {maximum} std of w (target {attribute.target:+g} "
                f"{attribute.unit})"
            ),
        )
        directions.append(direction)
        measured[attribute.name] = {
            "unit": attribute.unit,
            "layers": list(layers),
            "max": maximum,
            "trials": {f"{a}:{b}": effects for (a, b), effects in trials.items()},
            "curve": {str(strength): effects for strength, effects in curve.items()},
        }
        yield Progress("named-directions", index + 1, len(available), f"fitted {attribute.label}: layers {layers}")
    metadata = {
        "kind": "named",
        "version": NAMED_FORMAT_VERSION,
        "generator_sha256": generator_sha256(generator),
        "samples": str(len(w)),
        "seed": str(config.seed),
        "truncation": str(config.truncation),
        "fraction": str(config.fraction),
        "score_stds": json.dumps(stds),
        "measured": json.dumps(measured),
    }
    return directions, metadata
