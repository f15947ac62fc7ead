"""Edit-direction maths shared by the direction plugins and the direction fitting.

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
scales them by the spread of ``w``. Direction files are :mod:`fluidsrv.direction_files`; fitting attribute
directions on rendered faces is :mod:`fluidsrv.attribute_directions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

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


def modulation_weights(generator: Generator, layers: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Raw modulation weights [channels, w_dim] of the conv layers in ``layers`` ([start, stop) ws layers).

    Conv layer j (``conv1``, then ``convs.0``, ...) is driven by ws layer j; the last ws layer drives only a
    ToRGB and has no conv, so the range is cut at the conv count (``1 + len(convs)``, num_ws − 1).
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
