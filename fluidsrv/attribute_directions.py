"""Fit the attribute directions (InterFaceGAN) of a generator: sample faces, score them, fit, cache the result.

For every attribute a scorer measures (``classifier``: age, gender), the lowest and highest share of the
rendered faces are two classes; the direction is the normal of a logistic-regression boundary between their
codes, or the difference of the two classes' mean codes, made orthogonal to the other attributes' directions.
``fluidsrv directions compute --generator PATH`` runs it; the ``attributes`` direction plugin reads the cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluidsrv.direction_files import attribute_cache_path, save_directions
from fluidsrv.directions import conditional_orthogonalize, logistic_boundary, mean_difference, split_extremes
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.stages import Direction, Progress, Scorer, StepJob

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

ATTRIBUTE_SLIDER_RANGE = (-3.0, 3.0)  # in standard deviations of w along the direction (see fluidsrv.latents)
ATTRIBUTE_LABELS = {"age": "Age", "gender": "Gender (→ male)"}


@torch.no_grad()
def sample_and_score(
    generator: Generator,
    scorer: Scorer,
    *,
    samples: int,
    batch_size: int = 16,
    seed: int = 0,
    truncation: float = 0.8,
) -> StepJob[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Step-wise: sample ``samples`` w's (truncated toward w_avg), render and score them; returns (w, scores).

    ``w`` is [samples, w_dim] (the truncated codes that were rendered); scores are [samples] per attribute.
    """
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    codes: list[torch.Tensor] = []
    scores: dict[str, list[torch.Tensor]] = {}
    total = (samples + batch_size - 1) // batch_size
    for step, start in enumerate(range(0, samples, batch_size)):
        z = torch.randn(min(batch_size, samples - start), generator.w_dim, generator=rng, device=device)  # [B, D]
        ws = generator.mapping(z, truncation_psi=truncation)  # [B, num_ws, w_dim]
        images = generator.synthesis(ws).clamp(-1, 1)  # [B, 3, H, W]
        for name, values in scorer.score(images).items():
            scores.setdefault(name, []).append(values.detach().float().cpu())
        codes.append(ws[:, 0].float().cpu())
        yield Progress("attributes", step + 1, total, f"rendered and scored {start + len(z)} of {samples} faces")
    return torch.cat(codes), {name: torch.cat(values) for name, values in scores.items()}


def fit_attribute_directions(
    w: torch.Tensor,
    scores: dict[str, torch.Tensor],
    *,
    fraction: float = 0.3,
    orthogonalize: bool = True,
    provenance: str = "",
) -> list[Direction]:
    """Linear-boundary and cluster-means directions per attribute, each made orthogonal to the others' if asked.

    For every attribute the lowest and highest ``fraction`` of ``scores`` are the two classes; the boundary
    normal and the mean difference both point toward high scores (older, more male).
    """
    assert w.ndim == 2 and all(s.shape == (w.shape[0],) for s in scores.values()), "one score per sample"
    raw: dict[str, dict[str, torch.Tensor]] = {"boundary": {}, "means": {}}
    for name, values in scores.items():
        low, high = split_extremes(values, fraction)
        chosen = torch.cat([low, high])
        labels = torch.cat([torch.zeros(len(low)), torch.ones(len(high))])
        raw["boundary"][name] = logistic_boundary(w[chosen], labels)
        raw["means"][name] = mean_difference(w, values, fraction)
    directions = []
    for method, found in raw.items():
        for name, vector in found.items():
            others = [other for key, other in found.items() if key != name]
            conditioned = orthogonalize and bool(others)
            final = conditional_orthogonalize(vector, others) if conditioned else vector
            suffix = f", orthogonal to {', '.join(key for key in found if key != name)}" if conditioned else ""
            kind = "logistic-regression boundary normal" if method == "boundary" else "difference of cluster means"
            label = ATTRIBUTE_LABELS.get(name, name.replace("_", " ").capitalize())
            directions.append(
                Direction(
                    name=f"attr:{name}" if method == "boundary" else f"attr-means:{name}",
                    label=label if method == "boundary" else f"{label} (means)",
                    vector=final.reshape(1, -1),  # [1, w_dim]
                    layers=None,
                    slider_range=ATTRIBUTE_SLIDER_RANGE,
                    group="Attributes" if method == "boundary" else "Attributes (cluster means)",
                    provenance=f"{kind} of the top/bottom {fraction:.0%} of {w.shape[0]} samples by {name}{suffix}"
                    + (f"; {provenance}" if provenance else ""),
                )
            )
    return directions


def compute_attribute_directions(
    generator: Generator,
    scorer: Scorer,
    scorer_name: str,
    cache_dir: Path,
    *,
    samples: int = 2_000,
    batch_size: int = 16,
    seed: int = 0,
    truncation: float = 0.8,
    fraction: float = 0.3,
) -> StepJob[list[Direction]]:
    """Step-wise: sample, render, score, fit and cache the attribute directions of ``generator``; returns them."""
    w, scores = yield from sample_and_score(
        generator, scorer, samples=samples, batch_size=batch_size, seed=seed, truncation=truncation
    )
    source = f"scorer {scorer_name}, seed {seed}, truncation {truncation}"
    directions = fit_attribute_directions(w, scores, fraction=fraction, provenance=source)
    metadata = {
        "generator_sha256": generator_sha256(generator),
        "scorer": scorer_name,
        "samples": str(samples),
        "seed": str(seed),
        "truncation": str(truncation),
        "fraction": str(fraction),
        "score_means": json.dumps({name: float(values.mean()) for name, values in scores.items()}),
        "score_stds": json.dumps({name: float(values.std()) for name, values in scores.items()}),
    }
    save_directions(attribute_cache_path(cache_dir, generator, scorer_name), directions, metadata)
    return directions
