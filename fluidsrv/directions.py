"""Edit-direction maths shared by the direction plugins, plus saving / loading directions.

* **SeFa** (closed-form factorisation, Shen & Zhou 2021): the directions that the style modulations of the
  chosen synthesis layers amplify most are the top eigenvectors of ``Σ_l A_lᵀ A_l`` over their modulation
  weights ``A_l`` [channels, w_dim]. The rosinality variant stacks the raw weights of every conv layer; the
  genforce variant normalises each channel's weight row first and uses only the chosen layers.
* **GANSpace** (Härkönen et al. 2020): principal components of sampled ``w``'s.
* **Attribute directions** (InterFaceGAN, Shen et al. 2020): the normal of a linear boundary (logistic
  regression) between ``w``'s whose images score high and low on an attribute, or the difference of the two
  groups' means ("cluster means"); conditional orthogonalisation removes other attributes' normals.

Conv layer ``j`` of the generator (``conv1``, ``convs.0``, ``convs.1``, ...) is driven by ``ws[:, j]``, so a
SeFa layer range is a ws layer range. Directions are unit vectors in W; :func:`fluidsrv.latents.apply_sliders`
scales them by the spread of ``w``.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluidsrv.latents import parse_layers
from fluidsrv.stages import Direction, Progress, Scorer, StepJob

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

DIRECTIONS_FORMAT = "fluidsrv-directions"
MORE_SLIDERS = "More sliders"
"""UI group of the generator's unnamed directions (SeFa, GANSpace), listed after the named sliders."""


@dataclass(frozen=True)
class Factorization:
    """Directions [K, w_dim] (unit rows, most important first) with their importance [K] (eigenvalues / variances)."""

    directions: torch.Tensor
    values: torch.Tensor


def canonical_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row [K, D] so that its largest-magnitude entry is positive (eigenvectors have no sign of their own)."""
    peak = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))  # [K, 1]
    return rows * torch.where(peak < 0, -1.0, 1.0).to(rows)


def _descending_eigh(matrix: torch.Tensor) -> Factorization:
    """Eigen-decompose a symmetric matrix [D, D] in float64; eigenvectors as rows, largest eigenvalue first."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double())  # ascending; columns
    order = eigenvalues.argsort(descending=True)
    rows = canonical_signs(eigenvectors[:, order].T.contiguous())  # [D, D]
    return Factorization(rows.float(), eigenvalues[order].float())


# ---------------------------------------------------------------------------------------------- SeFa


def conv_layer_count(generator: Generator) -> int:
    """Number of style-modulated conv layers (``conv1`` + ``convs``): num_ws − 1."""
    return 1 + len(generator.convs)


def modulation_weights(generator: Generator, layers: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Raw modulation weights [channels, w_dim] of the conv layers in ``layers`` ([start, stop) ws layers).

    Conv layer j (``conv1``, then ``convs.0``, ...) is driven by ws layer j; the last ws layer drives only a
    ToRGB and has no conv, so the range is cut at :func:`conv_layer_count`.
    """
    convs = [generator.conv1, *generator.convs]
    start, stop = layers if layers is not None else (0, len(convs))
    stop = min(stop, len(convs))
    if not 0 <= start < stop:
        raise ValueError(f"layer range {layers} holds no conv layer (the generator has {len(convs)})")
    return [convs[j].conv.modulation.weight.detach() for j in range(start, stop)]  # each [channels, w_dim]


def sefa(generator: Generator, layers: tuple[int, int] | None = None, *, normalize: bool = True) -> Factorization:
    """SeFa directions of ``generator`` over the conv layers in ``layers`` (None = all), most important first.

    ``normalize=True`` is genforce/sefa's ``factorize_weight`` (each channel's weight row unit-normalised);
    ``normalize=False`` with ``layers=None`` is rosinality's ``closed_form_factorization.py``. Returns unit
    rows [w_dim, w_dim] and the eigenvalues [w_dim].
    """
    gram = None
    for weight in modulation_weights(generator, layers):
        rows = weight.double()  # [channels, w_dim]
        if normalize:
            rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-30)
        gram = rows.T @ rows if gram is None else gram + rows.T @ rows  # [w_dim, w_dim]
    assert gram is not None
    return _descending_eigh(gram)


# ---------------------------------------------------------------------------------------------- GANSpace


@torch.no_grad()
def sample_w(generator: Generator, n: int, seed: int = 0, batch_size: int = 1_000) -> torch.Tensor:
    """Map ``n`` seeded normal z's to w [n, w_dim] (no truncation)."""
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    for start in range(0, n, batch_size):
        z = torch.randn(min(batch_size, n - start), generator.w_dim, generator=rng, device=device)  # [B, w_dim]
        chunks.append(generator.mapping(z)[:, 0].float())  # [B, w_dim]
    return torch.cat(chunks).cpu()  # [n, w_dim]


def pca(w: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, Factorization]:
    """Principal components of ``w`` [N, D]: (mean [D], Factorization(components [k, D], std [k]))."""
    assert w.ndim == 2 and w.shape[0] >= 2, f"need [N >= 2, D] samples, got {tuple(w.shape)}"
    mean = w.double().mean(dim=0)  # [D]
    centered = w.double() - mean
    found = _descending_eigh(centered.T @ centered / (w.shape[0] - 1))
    k = found.directions.shape[0] if k is None else k
    std = found.values[:k].clamp(min=0).sqrt()
    return mean.float(), Factorization(found.directions[:k], std)


# ---------------------------------------------------------------------------------------------- attributes


def split_extremes(scores: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the lowest and the highest ``fraction`` of ``scores`` [N] (InterFaceGAN's chosen samples)."""
    assert scores.ndim == 1 and 0.0 < fraction <= 0.5, f"bad scores {tuple(scores.shape)} / fraction {fraction}"
    count = max(1, int(len(scores) * fraction))
    order = scores.argsort()
    return order[:count], order[-count:]


def logistic_boundary(w: torch.Tensor, labels: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 200) -> torch.Tensor:
    """Unit normal [D] in W of a logistic-regression boundary separating ``labels`` [N] (1 vs 0), pointing to 1.

    Features are standardised per axis for conditioning; the normal is mapped back to W coordinates.
    """
    assert w.ndim == 2 and labels.shape == (w.shape[0],), f"bad shapes {tuple(w.shape)}, {tuple(labels.shape)}"
    assert set(labels.unique().tolist()) <= {0.0, 1.0} and labels.unique().numel() == 2, "labels must be 0 and 1"
    x = w.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-12)
    x = (x - mean) / std  # [N, D]
    y = labels.double()
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight + bias  # [N]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * weight.square().sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    normal = weight.detach() / std  # [D]: the boundary's normal in W
    return (normal / normal.norm().clamp(min=1e-30)).float()


def mean_difference(w: torch.Tensor, scores: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """Unit vector [D] from the mean ``w`` of the lowest to that of the highest ``fraction`` of ``scores``."""
    low, high = split_extremes(scores, fraction)
    difference = w[high].double().mean(dim=0) - w[low].double().mean(dim=0)  # [D]
    return (difference / difference.norm().clamp(min=1e-30)).float()


def conditional_orthogonalize(primary: torch.Tensor, conditions: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``primary`` [D] without its components along every ``conditions`` vector ([M, D]), renormalised to unit.

    InterFaceGAN's conditional manipulation: editing along the result leaves the conditioned attributes'
    (linear) scores unchanged. Raises ValueError when ``primary`` lies in the conditions' span.
    """
    basis = torch.stack(list(conditions)) if not isinstance(conditions, torch.Tensor) else conditions
    basis = basis.reshape(-1, primary.shape[-1]).double()  # [M, D]
    q, _ = torch.linalg.qr(basis.T)  # [D, M] orthonormal span of the conditions
    vector = primary.double()
    remainder = vector - q @ (q.T @ vector)  # [D]
    if remainder.norm() < 1e-6 * vector.norm():
        raise ValueError("the primary direction lies in the span of the conditions: nothing is left")
    return (remainder / remainder.norm()).float()


# ---------------------------------------------------------------------------------------------- persistence

_fingerprints: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def generator_fingerprint(generator: Generator) -> str:
    """sha256 (hex) of the generator's state dict: names, shapes, dtypes and bytes; remembered per object.

    Weights changed in place after the first call are not noticed (fine-tuning works on copies).
    """
    known = _fingerprints.get(generator)
    if known is not None:
        return known
    digest = hashlib.sha256()
    for name, tensor in sorted(generator.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    fingerprint = digest.hexdigest()
    _fingerprints[generator] = fingerprint
    return fingerprint


def save_directions(path: str | Path, directions: Sequence[Direction], metadata: dict[str, str] | None = None) -> None:
    """Write ``directions`` as safetensors (vectors as tensors, the rest as JSON metadata)."""
    names = [d.name for d in directions]
    assert len(set(names)) == len(names), f"direction names must be unique: {names}"
    described = [
        {
            "name": d.name,
            "label": d.label,
            "layers": list(d.layers) if d.layers is not None else None,
            "slider_range": list(d.slider_range),
            "group": d.group,
            "provenance": d.provenance,
        }
        for d in directions
    ]
    tensors = {f"direction.{index}": d.vector.detach().float().cpu().contiguous() for index, d in enumerate(directions)}
    extra = dict(metadata or {})
    extra.update(format=DIRECTIONS_FORMAT, directions=json.dumps(described))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=extra)


def load_directions(path: str | Path) -> tuple[list[Direction], dict[str, str]]:
    """Read directions written by :func:`save_directions`; returns them with the file's metadata."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("format") != DIRECTIONS_FORMAT:
            raise ValueError(f"{path}: not a {DIRECTIONS_FORMAT} file")
        described: list[dict[str, Any]] = json.loads(metadata["directions"])
        directions = [
            Direction(
                name=item["name"],
                label=item["label"],
                vector=handle.get_tensor(f"direction.{index}"),
                layers=tuple(item["layers"]) if item["layers"] is not None else None,
                slider_range=tuple(item["slider_range"]),
                group=item["group"],
                provenance=item["provenance"],
            )
            for index, item in enumerate(described)
        ]
    return directions, metadata


# ---------------------------------------------------------------------------------------------- plugin options


class DirectionsUnavailableError(RuntimeError):
    """A direction source cannot offer directions for this generator yet; the message says why and what to do."""


def option_int(options: Any, key: str, default: int, minimum: int = 1) -> int:
    """Read an integer plugin option (strings from the CLI or settings are converted); ValueError when invalid."""
    raw = options.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"option {key!r} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"option {key!r} must be >= {minimum}, got {value}")
    return value


def option_layer_ranges(options: Any, num_ws: int, default: str) -> list[tuple[str, tuple[int, int]]]:
    """Read the ``layers`` option: comma-separated ranges (``coarse``, ``middle``, ``fine``, ``all``, ``a:b``).

    Returns (label, [start, stop)) pairs; ``all`` is every layer.
    """
    spec = str(options.get("layers", default))
    ranges = []
    for part in (piece.strip() for piece in spec.split(",")):
        if not part:
            continue
        ranges.append((part, (0, num_ws) if part == "all" else parse_layers(part, num_ws)))
    if not ranges:
        raise ValueError(f"option 'layers' names no layer range: {spec!r}")
    return ranges


# ---------------------------------------------------------------------------------------------- attribute fitting

ATTRIBUTE_SLIDER_RANGE = (-3.0, 3.0)  # in standard deviations of w along the direction (see fluidsrv.latents)
ATTRIBUTE_LABELS = {"age": "Age", "gender": "Gender (→ male)"}


def attribute_cache_path(cache_dir: Path, generator: Generator, scorer_name: str) -> Path:
    """Where the attribute directions of ``generator`` scored by ``scorer_name`` are cached."""
    safe_scorer = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in scorer_name)
    return (
        Path(cache_dir) / "directions" / f"attributes-{generator_fingerprint(generator)[:16]}-{safe_scorer}.safetensors"
    )


def named_cache_path(cache_dir: Path, generator: Generator) -> Path:
    """Where ``fluidsrv directions compute --source named`` writes this generator's named sliders."""
    return Path(cache_dir) / "directions" / f"named-{generator_fingerprint(generator)[:16]}.safetensors"


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
        "generator_sha256": generator_fingerprint(generator),
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
