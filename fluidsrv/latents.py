"""w / w+ algebra on latents: ``w`` is [N, w_dim], ``ws`` (w+) is [N, num_ws, w_dim].

Three families live here:

* **the slider model F** (:func:`apply_sliders`): slider values and named :class:`~fluidsrv.stages.Direction`s
  turn into one Δws, added to a face's ws. Each direction acts on its own layers, a slider value is measured
  in standard deviations of ``w`` along the direction (given the generator's :func:`latent_spread`), sliders add
  up, and they can be made orthogonal to each other at apply time. The per-direction work is cached, so a call
  is one small matrix product (well under a millisecond on a CPU for 20 sliders at 18 layers);
* **latent math**: truncation, style mixing by layer range with coarse / middle / fine presets, the average of
  faces, "x % more like B", morph paths through several faces and seamless deform loops;
* **spread**: :func:`latent_spread` measures how far ``w`` varies under the mapping network.

Everything is deterministic: random draws take an explicit seed.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fluidsrv.stages import Direction, LatentWarp

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

LAYER_PRESETS = ("coarse", "middle", "fine")
_FULL_PRESET_MIN_LAYERS = 10  # from 64 px (10 ws) on, the presets follow StyleGAN's resolutions
_RESIDUAL_EPS = 1e-6  # a direction whose orthogonalised remainder is below this (relative) is dropped
_BASIS_CACHE_SIZE = 32


# ---------------------------------------------------------------------------------------------- basic algebra


def _check_ws(ws: torch.Tensor, name: str = "ws") -> None:
    assert ws.ndim == 3, f"{name} must be [N, num_ws, w_dim], got {tuple(ws.shape)}"


def mix_styles(ws_a: torch.Tensor, ws_b: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """Style mixing: ``ws_a`` [N, num_ws, w_dim] with its layers in [start, stop) taken from ``ws_b``.

    ``ws_b`` may have batch 1 (broadcast to every sample of ``ws_a``); ``stop`` defaults to num_ws.
    Differentiable with respect to both inputs; neither is modified.
    """
    assert ws_a.ndim == 3 and ws_b.ndim == 3, f"ws must be [N, num_ws, w_dim], got {ws_a.shape} and {ws_b.shape}"
    assert ws_a.shape[1:] == ws_b.shape[1:], f"ws shapes differ: {tuple(ws_a.shape)} vs {tuple(ws_b.shape)}"
    assert ws_b.shape[0] in (1, ws_a.shape[0]), f"cannot broadcast batch {ws_b.shape[0]} to {ws_a.shape[0]}"
    num_ws = ws_a.shape[1]
    stop = num_ws if stop is None else stop
    assert 0 <= start <= stop <= num_ws, f"layer range [{start}, {stop}) is outside [0, {num_ws})"
    layers = torch.arange(num_ws, device=ws_a.device)  # [num_ws]
    from_b = ((layers >= start) & (layers < stop)).reshape(1, num_ws, 1)  # [1, num_ws, 1]
    return torch.where(from_b, ws_b, ws_a)  # [N, num_ws, w_dim]


def preset_layers(preset: str, num_ws: int) -> tuple[int, int]:
    """Return the [start, stop) ws layers of a "coarse" / "middle" / "fine" preset for a generator with ``num_ws``.

    From 64 px (10 ws) up the presets follow StyleGAN's resolutions: coarse = 4²–8² (layers 0–3), middle =
    16²–32² (4–7), fine = 64² and up (8 to the end). Smaller generators are split into thirds.
    """
    if preset not in LAYER_PRESETS:
        raise ValueError(f"unknown layer preset {preset!r}; expected one of {', '.join(LAYER_PRESETS)}")
    assert num_ws >= 3, f"a generator with {num_ws} ws layers cannot be split into presets"
    full = num_ws >= _FULL_PRESET_MIN_LAYERS
    bounds = (0, 4, 8, num_ws) if full else (0, num_ws // 3, 2 * num_ws // 3, num_ws)
    index = LAYER_PRESETS.index(preset)
    return bounds[index], bounds[index + 1]


def parse_layers(spec: str, num_ws: int) -> tuple[int, int]:
    """Parse a layer range: a preset name, ``start:stop`` (either side may be empty) or one index ``i``."""
    spec = spec.strip()
    if spec in LAYER_PRESETS:
        return preset_layers(spec, num_ws)
    try:
        if ":" in spec:
            first, _, last = spec.partition(":")
            start = int(first) if first.strip() else 0
            stop = int(last) if last.strip() else num_ws
        else:
            start = int(spec)
            stop = start + 1
    except ValueError:
        raise ValueError(f"bad layer range {spec!r}: use coarse, middle, fine, START:STOP or one index") from None
    if not 0 <= start < stop <= num_ws:
        raise ValueError(f"layer range {spec!r} = [{start}, {stop}) is empty or outside [0, {num_ws})")
    return start, stop


def blend(ws_a: torch.Tensor, ws_b: torch.Tensor, amount: float) -> torch.Tensor:
    """``ws_a`` moved ``amount`` of the way to ``ws_b``: 0 = A, 1 = B, > 1 past B (caricature), < 0 away from B."""
    _check_ws(ws_a, "ws_a")
    assert ws_a.shape[1:] == ws_b.shape[1:], f"ws shapes differ: {tuple(ws_a.shape)} vs {tuple(ws_b.shape)}"
    return ws_a + amount * (ws_b - ws_a)  # [N, num_ws, w_dim]


def more_like(ws_a: torch.Tensor, ws_b: torch.Tensor, percent: float) -> torch.Tensor:
    """Face A made ``percent`` % more like face B (``blend`` with ``percent / 100``; may exceed 100 or be < 0)."""
    return blend(ws_a, ws_b, percent / 100.0)


def smoothstep(t: torch.Tensor) -> torch.Tensor:
    """Ease in and out: 3t² − 2t³ (0 → 0, 1 → 1, zero slope at both ends)."""
    return t * t * (3.0 - 2.0 * t)


def morph_path(
    keyframes: torch.Tensor, frames_per_transition: int, *, loop: bool = False, ease: bool = True
) -> torch.Tensor:
    """Interpolate through the faces ``keyframes`` [K, num_ws, w_dim]; returns [F, num_ws, w_dim].

    Each transition takes ``frames_per_transition`` frames and each keyframe appears exactly once (frame
    ``i · frames_per_transition``). Without ``loop`` the path ends on the last face: F = (K − 1)·n + 1; with
    ``loop`` it returns toward the first face, ready to repeat: F = K·n. ``ease`` slows down at every face.
    """
    _check_ws(keyframes, "keyframes")
    count = keyframes.shape[0]
    assert frames_per_transition >= 1, "frames_per_transition must be >= 1"
    assert count >= 2 or (loop and count >= 1), f"a morph needs two faces (or one with loop), got {count}"
    stops = torch.cat([keyframes, keyframes[:1]]) if loop else keyframes  # [K', num_ws, w_dim]
    transitions = stops.shape[0] - 1
    total = transitions * frames_per_transition + (0 if loop else 1)
    t = torch.arange(total, dtype=torch.float64) / frames_per_transition  # [F] in [0, transitions]
    segment = t.floor().long().clamp(max=transitions - 1)  # [F]
    local = (t - segment).to(keyframes.dtype).to(keyframes.device)  # [F] in [0, 1]
    if ease:
        local = smoothstep(local)
    segment = segment.to(keyframes.device)
    start, end = stops[segment], stops[segment + 1]  # [F, num_ws, w_dim] each
    return start + local.reshape(-1, 1, 1) * (end - start)  # [F, num_ws, w_dim]


def deform_loop(
    ws: torch.Tensor,
    frames: int,
    *,
    layers: tuple[int, int] | None = None,
    amplitude: float = 1.0,
    harmonics: int = 2,
    spread: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A seamless loop of ``frames`` latents [frames, num_ws, w_dim] wobbling around ``ws`` [1, num_ws, w_dim].

    Random offsets (one per harmonic, shared by the chosen ``layers``, drawn like ``w`` itself when ``spread``
    is given) are modulated by sines of whole periods per loop, so frame ``frames`` would equal frame 0.
    ``amplitude`` is in standard deviations of ``w`` (of a unit normal when ``spread`` is None).
    """
    _check_ws(ws)
    assert ws.shape[0] == 1, f"deform_loop takes one face, got a batch of {ws.shape[0]}"
    assert frames >= 2 and harmonics >= 1, "need at least 2 frames and 1 harmonic"
    num_ws, w_dim = ws.shape[1:]
    start, stop = layers if layers is not None else (0, num_ws)
    assert 0 <= start < stop <= num_ws, f"layers [{start}, {stop}) outside [0, {num_ws})"
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(harmonics, w_dim, generator=generator, dtype=torch.float64)  # [H, w_dim]
    offsets = _shape_like_w(noise, spread) / math.sqrt(harmonics)  # [H, w_dim]
    phases = torch.rand(harmonics, generator=generator, dtype=torch.float64) * 2 * math.pi  # [H]
    t = torch.arange(frames, dtype=torch.float64) / frames  # [F] in [0, 1)
    frequency = torch.arange(1, harmonics + 1, dtype=torch.float64)  # [H]
    waves = torch.sin(2 * math.pi * t[:, None] * frequency[None] + phases[None])  # [F, H]
    wobble = amplitude * waves @ offsets  # [F, w_dim]
    mask = torch.zeros(num_ws, 1, dtype=torch.float64)  # [num_ws, 1]
    mask[start:stop] = 1.0
    delta = wobble[:, None, :] * mask[None]  # [F, num_ws, w_dim]
    return ws + delta.to(ws)  # [F, num_ws, w_dim]


def _shape_like_w(noise: torch.Tensor, spread: torch.Tensor | None) -> torch.Tensor:
    """Turn unit normal draws [K, w_dim] into draws with ``spread`` (scalar, per-axis [w_dim] or [w_dim, w_dim])."""
    if spread is None:
        return noise
    spread = spread.to(noise)
    if spread.ndim == 2:
        return noise @ spread.T  # [K, w_dim]: S @ n for each draw
    return noise * spread  # scalar or per-axis std


# ---------------------------------------------------------------------------------------------- spread


@torch.no_grad()
def latent_spread(generator: Generator, n: int = 10_000, seed: int = 0, batch_size: int = 1_000) -> torch.Tensor:
    """Measure how ``w`` varies under ``generator``'s mapping: the square root of its covariance [w_dim, w_dim].

    ``S`` is symmetric with ``S @ S = Cov(w)``, so the standard deviation of ``w`` along a unit vector ``u``
    is ``‖S u‖``. Pass it as ``spread`` to :func:`apply_sliders`; compute it once per generator (``n`` mapped
    z's, in float64).
    """
    assert n >= 2 and batch_size >= 1, "need n >= 2 samples"
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    total = torch.zeros(generator.w_dim, dtype=torch.float64, device=device)  # [w_dim]
    outer = torch.zeros(generator.w_dim, generator.w_dim, dtype=torch.float64, device=device)  # [w_dim, w_dim]
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        z = torch.randn(count, generator.w_dim, generator=rng, device=device)  # [B, w_dim]
        w = generator.mapping(z)[:, 0].double()  # [B, w_dim]
        total += w.sum(dim=0)
        outer += w.T @ w
    mean = total / n  # [w_dim]
    covariance = (outer - n * torch.outer(mean, mean)) / (n - 1)  # [w_dim, w_dim]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending, [w_dim], [w_dim, w_dim]
    root = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T  # [w_dim, w_dim]
    return root.float().cpu()


def std_along(spread: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Standard deviation of ``w`` along unit vectors ``unit`` [K, w_dim] given ``spread``; returns [K]."""
    spread = spread.to(unit)
    if spread.ndim == 2:
        return (unit @ spread.T).norm(dim=-1)  # ‖S u‖
    if spread.ndim == 1:
        return (unit * spread).norm(dim=-1)  # per-axis std, axes taken as uncorrelated
    return spread.abs().expand(unit.shape[0])  # one std for every direction


# ---------------------------------------------------------------------------------------------- the slider model F


def direction_rows(direction: Direction, num_ws: int, w_dim: int) -> torch.Tensor:
    """The per-layer vectors [num_ws, w_dim] a direction adds at slider value 1 (before spread scaling).

    A [1, w_dim] (or [w_dim]) vector is repeated over the layers; a [num_ws, w_dim] vector is used per layer;
    both are zeroed outside ``direction.layers``.
    """
    vector = direction.vector.detach().float().cpu()  # the basis is built on the CPU, then moved to ws's device
    if vector.ndim == 1:
        vector = vector.unsqueeze(0)
    if vector.ndim == 3 and vector.shape[0] == 1:  # e4e writes per-layer boundaries as [1, num_ws, w_dim]
        vector = vector[0]
    if vector.ndim != 2 or vector.shape[-1] != w_dim or vector.shape[0] not in (1, num_ws):
        raise ValueError(
            f"direction {direction.name!r} has shape {tuple(direction.vector.shape)}; "
            f"expected [1, {w_dim}] or [{num_ws}, {w_dim}] for this generator"
        )
    start, stop = direction.layers if direction.layers is not None else (0, num_ws)
    if not 0 <= start < stop <= num_ws:
        raise ValueError(f"direction {direction.name!r} acts on layers [{start}, {stop}), outside [0, {num_ws})")
    rows = vector.expand(num_ws, w_dim).clone()  # [num_ws, w_dim]
    rows[:start] = 0.0
    rows[stop:] = 0.0
    return rows


def orthogonalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt per layer over K directions ``rows`` [K, num_ws, w_dim], in order, keeping each row's norm.

    Direction k loses its components along directions 0..k−1 on every layer, then its remaining row is scaled
    back to the original length (so a slider keeps its strength, only its side effects go); a row that is
    (almost) entirely made of earlier directions becomes zero.
    """
    assert rows.ndim == 3, f"rows must be [K, num_ws, w_dim], got {tuple(rows.shape)}"
    result = torch.zeros_like(rows, dtype=torch.float64)  # [K, num_ws, w_dim]
    units: list[torch.Tensor] = []
    for k in range(rows.shape[0]):
        original = rows[k].double()  # [num_ws, w_dim]
        remainder = original.clone()
        for unit in units:  # modified Gram–Schmidt: project out of the running remainder
            remainder -= (remainder * unit).sum(dim=-1, keepdim=True) * unit
        length, left = original.norm(dim=-1, keepdim=True), remainder.norm(dim=-1, keepdim=True)  # [num_ws, 1]
        usable = left > _RESIDUAL_EPS * length.clamp(min=1e-30)
        unit = torch.where(usable, remainder / left.clamp(min=1e-30), torch.zeros_like(remainder))
        units.append(unit)
        result[k] = unit * length
    return result.to(rows.dtype)


def _spread_scales(rows: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """One factor per direction [K] that makes slider value 1 = one std of ``w`` along the direction."""
    norms = rows.norm(dim=-1)  # [K, num_ws]
    active = norms > 0
    counts = active.sum(dim=-1).clamp(min=1)  # [K]
    rms = (norms.square().sum(dim=-1) / counts).sqrt()  # [K] typical row length over the active layers
    mean_row = rows.sum(dim=1) / counts[:, None]  # [K, w_dim] the direction the rows agree on
    mean_len = mean_row.norm(dim=-1, keepdim=True)
    fallback = rows[torch.arange(rows.shape[0]), active.float().argmax(dim=-1)]  # [K, w_dim] first active row
    representative = torch.where(mean_len > 1e-12, mean_row, fallback)
    unit = representative / representative.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # [K, w_dim]
    return torch.where(rms > 0, std_along(spread, unit) / rms.clamp(min=1e-30), torch.zeros_like(rms))


@dataclass(frozen=True)
class SliderBasis:
    """The Δws of every slider at value 1, stacked: ``deltas`` [K, num_ws · w_dim] in the order of ``names``."""

    names: tuple[str, ...]
    deltas: torch.Tensor
    num_ws: int
    w_dim: int

    def delta(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Return Δws [1, num_ws, w_dim] for slider ``values`` (one per name, in order)."""
        weights = torch.as_tensor(values, dtype=self.deltas.dtype, device=self.deltas.device)  # [K]
        assert weights.shape == (len(self.names),), f"need {len(self.names)} values, got {tuple(weights.shape)}"
        return (weights @ self.deltas).reshape(1, self.num_ws, self.w_dim)  # [1, num_ws, w_dim]


def slider_basis(
    directions: Sequence[Direction],
    num_ws: int,
    w_dim: int,
    *,
    spread: torch.Tensor | None = None,
    orthogonalize: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SliderBasis:
    """Build the per-slider Δws of ``directions`` (masked, optionally orthogonalised in order, spread-scaled
    unless a direction has a ``unit``)."""
    rows = torch.stack([direction_rows(d, num_ws, w_dim) for d in directions]) if directions else None
    if rows is None:
        deltas = torch.zeros(0, num_ws * w_dim, dtype=dtype, device=device)
        return SliderBasis((), deltas, num_ws, w_dim)
    rows = rows.double()  # [K, num_ws, w_dim]
    if orthogonalize:
        rows = orthogonalize_rows(rows)
    if spread is not None:
        scales = _spread_scales(rows, spread.double())  # [K]
        in_units = torch.tensor([bool(d.unit) for d in directions])  # [K]: the vector already is Δw per unit
        rows = rows * torch.where(in_units, torch.ones_like(scales), scales)[:, None, None]
    deltas = rows.reshape(len(directions), num_ws * w_dim).to(device=device, dtype=dtype)  # [K, num_ws·w_dim]
    return SliderBasis(tuple(d.name for d in directions), deltas, num_ws, w_dim)


def slider_extremes(
    directions: Sequence[Direction],
    num_ws: int,
    w_dim: int,
    *,
    spread: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Each slider's Δws at the far end of its range (the larger of |min| and |max|): [K, num_ws, w_dim]."""
    basis = slider_basis(directions, num_ws, w_dim, spread=spread, device=device)
    reach = torch.tensor([max(abs(d.slider_range[0]), abs(d.slider_range[1])) for d in directions],
                         dtype=basis.deltas.dtype, device=basis.deltas.device)  # [K]
    return (basis.deltas * reach[:, None]).reshape(len(directions), num_ws, w_dim)


class _BasisCache:
    """A small LRU of slider bases keyed by the identity of the directions and spread used to build them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[object, ...], tuple[tuple[object, ...], SliderBasis]] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(
        self,
        chosen: Sequence[Direction],
        num_ws: int,
        w_dim: int,
        spread: torch.Tensor | None,
        orthogonalize: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> SliderBasis:
        """Return the cached basis for these exact objects, building (and remembering) it when absent."""
        key = (tuple(map(id, chosen)), id(spread), num_ws, w_dim, orthogonalize, str(device), dtype)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found[1]
        basis = slider_basis(
            chosen, num_ws, w_dim, spread=spread, orthogonalize=orthogonalize, device=device, dtype=dtype
        )
        with self._lock:
            # the entry keeps the objects alive, so their ids cannot be reused while the key exists
            self._entries[key] = ((*chosen, spread), basis)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return basis


_basis_cache = _BasisCache(_BASIS_CACHE_SIZE)


def apply_sliders(
    ws: torch.Tensor,
    directions: Mapping[str, Direction],
    values: Mapping[str, float],
    *,
    spread: torch.Tensor | None = None,
    orthogonalize: bool = False,
) -> torch.Tensor:
    """The slider model F: ``ws`` [N, num_ws, w_dim] plus Σ value · direction, each on its own layers.

    ``values`` names sliders in ``directions`` (an unknown name raises KeyError); missing sliders count as 0.
    With ``spread`` (from :func:`latent_spread`; or a scalar / per-axis std) a value of 1 moves ``w`` by one
    standard deviation of ``w`` along the direction; without it, by the raw vector. With ``orthogonalize``
    each named slider is first made orthogonal (per layer) to the sliders named before it in ``values``, so
    the first keeps its full effect and later ones lose what they share with it. The result is linear in the
    values and exactly ``ws`` when all are 0. The per-direction work is cached by the identity of the
    ``Direction`` objects and of ``spread``: do not modify them in place.

    Sliders whose direction has a ``warp`` are the exception (nonlinear, per face): each warp gets the mean w
    over the layers of every face and its sliders' values, and its Δw is added on every layer; they take no
    part in the orthogonalisation.
    """
    _check_ws(ws)
    unknown = [name for name in values if name not in directions]
    if unknown:
        known = ", ".join(sorted(directions)) or "none"
        raise KeyError(f"unknown slider(s) {', '.join(map(repr, unknown))}; known sliders: {known}")
    if not values:
        return ws
    numbers = [float(value) for value in values.values()]
    if not all(math.isfinite(value) for value in numbers):
        raise ValueError(f"slider values must be finite numbers, got {dict(values)}")
    linear = {name: float(value) for name, value in values.items() if directions[name].warp is None}
    edited = ws + _warped_delta(ws, directions, values) if len(linear) < len(values) else ws
    if not linear:
        return edited
    chosen = [directions[name] for name in linear]
    basis = _basis_cache.get_or_build(chosen, ws.shape[1], ws.shape[2], spread, orthogonalize, ws.device, ws.dtype)
    return edited + basis.delta(list(linear.values()))  # [N, num_ws, w_dim]


def _warped_delta(ws: torch.Tensor, directions: Mapping[str, Direction], values: Mapping[str, float]) -> torch.Tensor:
    """The summed Δws [N, 1, w_dim] of the warped sliders in ``values``, one call per warp with its own sliders."""
    by_warp: dict[int, tuple[LatentWarp, dict[str, float]]] = {}
    for name, value in values.items():
        warp = directions[name].warp
        if warp is not None:
            by_warp.setdefault(id(warp), (warp, {}))[1][name] = float(value)
    face = ws.mean(dim=1)  # [N, w_dim]
    delta = torch.zeros_like(face)
    for warp, amounts in by_warp.values():
        delta = delta + warp.delta(face, amounts).to(delta)
    return delta[:, None, :]  # [N, 1, w_dim]
