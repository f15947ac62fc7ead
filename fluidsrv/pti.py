"""Pivotal tuning (PTI, Roich et al., 2022): fine-tune a generator so a pivot ``ws`` reproduces a photo.

The result of a session is a *delta*, never a modified generator: the base generator is shared by every session
and is never written to (its tensors are read, detached, and rendered through :func:`synthesize_with`, which
substitutes tensors for one call only). Two kinds of delta:

* ``full``: one difference tensor per trainable synthesis parameter (convolution and modulation weights, biases,
  noise strengths, ToRGB, the constant input); keys are the parameter names. The mapping network is not tuned:
  PTI works from a fixed ``ws``, so it receives no gradient.
* ``lowrank``: LoRA factors on the 3×3 modulated convolution weights of every synthesis layer
  (``conv1`` and ``convs.*``): ``ΔW = up @ down`` with ``down`` [rank, I·k·k] (key ``<name>.lora_down``) and
  ``up`` [O, rank] (``<name>.lora_up``), and on the style affines of every layer (``*.conv.modulation.weight``
  [I, w_dim] of the convs and the ToRGBs: ``down`` [rank, w_dim], ``up`` [I, rank]). The 1×1 ToRGB weights are
  left alone: with three output channels a factorisation would not be smaller than the weight itself. Measured
  on the embedded 128² generator (two photos, 100 steps at lr 1e-2): the affines' factors add +0.5 / +0.65 dB
  PSNR and keep the locality renders 3× closer to the base, for 1.6× the bytes (309 kB -> 495 kB); a full delta
  on the ToRGB weights and biases added nothing (-0.07 dB).

The loss is PTI's: ``mse_weight``·pixel L2 + ``perceptual_weight``·a perceptual distance between the render of
the pivot and the target (LPIPS-VGG when its weights are cached, else the offline distance: see
:func:`fluidsrv.perceptual.finetune_distance`), plus PTI's *locality* term: random ``w_r`` (mapped at truncation
0.5) give points ``w_z = w_p + α·(w_r − w_p)/‖w_r − w_p‖`` at a fixed distance α from the pivot ``w_p`` (the norm
is over the whole [num_ws, w_dim] code, as in PTI), and the tuned generator's renders of them are kept close to
the base generator's. PTI's α = 30 is for an 18×512 code; :func:`default_locality_radius` keeps the same step per
coordinate, α = 30·sqrt(num_ws·w_dim / (18·512)) (17.3 for the embedded 12×256 code). Training stops early once
the perceptual distance of the pivot's render falls to ``early_stop_distance`` (PTI's LPIPS threshold 0.06; no
threshold is known for the offline distances) or the pixel MSE below ``early_stop_mse``, and, with ``seconds``, after
as many steps as fit in that budget (timed on the first steps, see :mod:`fluidsrv.step_budget`).

:func:`pti_config` is the one place the per-resolution defaults (steps, learning rates of both modes) and the
early-stop threshold of each distance are chosen.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fluidsrv.models.stylegan2 import Generator, NoiseMode
from fluidsrv.perceptual import ImageDistance, LaplacianPyramidDistance
from fluidsrv.stages import Progress, StepJob
from fluidsrv.step_budget import StepBudget

DeltaMode = Literal["full", "lowrank"]
LORA_DOWN = ".lora_down"  # key suffix of a down factor [rank, I·k·k]
LORA_UP = ".lora_up"  # key suffix of an up factor [O, rank]
DEFAULT_LR: dict[str, float] = {"full": 3e-4, "lowrank": 3e-3}  # PTIConfig.lr None (pti_config picks per resolution)
_MAPPING_PREFIX = "style."
_LOWRANK_TARGET = re.compile(r"^(conv1|convs\.\d+)\.conv\.weight$|^(conv1|convs\.\d+|to_rgb1|to_rgbs\.\d+)\.conv"
                             r"\.modulation\.weight$")


PTI_ALPHA, PTI_CODE_SIZE = 30.0, 18 * 512  # PTI's locality radius, for its 18 × 512 code
EARLY_STOP_DISTANCE: dict[str, float] = {"lpips-vgg": 0.06}  # PTI's LPIPS threshold; by ImageDistance.name


@dataclass(frozen=True)
class PTIDefaults:
    """The default steps and learning rates of one range of resolutions."""

    steps: int
    lr: dict[str, float]  # by delta mode


PTI_DEFAULTS: tuple[tuple[int, PTIDefaults], ...] = (
    # (up to this resolution, defaults). 128² (the embedded generator, often on a CPU): 100 steps; at 100 steps
    # lr 1e-2 (lowrank) gave +1.4 / +1.2 dB over 3e-3 on two photos, and 1e-3 (full) +2.1 dB over 3e-4 on one
    (256, PTIDefaults(steps=100, lr={"full": 1e-3, "lowrank": 1e-2})),
    # 512² and 1024²: PTI's 350 steps at its 3e-4 (full); low-rank factors (one of them starts at zero) take 10×
    (1024, PTIDefaults(steps=350, lr={"full": 3e-4, "lowrank": 3e-3})),
)


def pti_defaults(resolution: int) -> PTIDefaults:
    """The default steps and learning rates for a generator of ``resolution`` (see :data:`PTI_DEFAULTS`)."""
    for limit, defaults in PTI_DEFAULTS:
        if resolution <= limit:
            return defaults
    return PTI_DEFAULTS[-1][1]


def default_locality_radius(num_ws: int, w_dim: int) -> float:
    """PTI's α = 30 scaled to a [num_ws, w_dim] code, keeping its step per coordinate (30 at 18 × 512)."""
    return PTI_ALPHA * math.sqrt(num_ws * w_dim / PTI_CODE_SIZE)


def early_stop_threshold(distance_name: str) -> float | None:
    """The early-stop threshold known for the distance named ``distance_name`` (PTI's 0.06 for LPIPS), or None."""
    return EARLY_STOP_DISTANCE.get(distance_name)


@dataclass(frozen=True)
class PTIConfig:
    """How one pivotal-tuning session runs."""

    mode: DeltaMode = "lowrank"  # "full": per-parameter differences; "lowrank": LoRA factors (3×3 convs, affines)
    steps: int = 350  # optimisation steps at most (PTI's default; pti_config picks it per resolution)
    lr: float | None = None  # Adam learning rate; None: 3e-4 for full (PTI's), 3e-3 for lowrank
    rank: int = 8  # rank of the low-rank factors (lowrank mode)
    mse_weight: float = 1.0  # weight of the pixel L2 reconstruction loss
    perceptual_weight: float = 1.0  # weight of the perceptual distance to the target
    locality_weight: float = 0.1  # weight of the locality term (PTI's 0.1 on its L2 and LPIPS parts); 0: off
    locality_samples: int = 1  # random w's per locality evaluation (PTI's 1)
    locality_every: int = 1  # evaluate the locality term every this many steps
    locality_radius: float | None = None  # α: distance of the locality points from the pivot; None: the scaled 30
    locality_truncation: float = 0.5  # the random w's are mapped at this truncation (PTI's 0.5)
    early_stop_distance: float | None = None  # stop once the pivot's perceptual distance is at most this
    early_stop_mse: float | None = None  # stop once the pivot's pixel MSE (images in [-1, 1]) is below this
    seconds: float | None = None  # the fine-tune's own time budget: as many steps as fit (None: all)
    frame_every: int = 10  # attach the current render to every this-many-th Progress (0: never)
    seed: int = 0  # seeds the low-rank initialisation and the locality samples

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lowrank"):
            raise ValueError(f"mode must be 'full' or 'lowrank', got {self.mode!r}")
        if self.steps < 1 or self.rank < 1 or self.locality_samples < 1 or self.locality_every < 1:
            raise ValueError("steps, rank, locality_samples and locality_every must be >= 1")
        if self.frame_every < 0 or not 0.0 <= self.locality_truncation <= 1.0:
            raise ValueError("frame_every must be >= 0 and locality_truncation in [0, 1]")
        if (self.locality_radius is not None and self.locality_radius <= 0) or (
            self.seconds is not None and self.seconds <= 0
        ):
            raise ValueError("locality_radius and seconds must be positive (or None)")

    @property
    def learning_rate(self) -> float:
        """The Adam learning rate in use (``lr`` or the mode's default)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def radius_for(self, generator: Generator) -> float:
        """The locality radius α for ``generator``'s code (``locality_radius`` or the scaled default)."""
        if self.locality_radius is not None:
            return self.locality_radius
        return default_locality_radius(generator.num_ws, generator.w_dim)


def pti_config(
    resolution: int,
    mode: DeltaMode,
    *,
    steps: int = 0,
    seconds: float | None = None,
    distance_name: str | None = None,
    **overrides: Any,
) -> PTIConfig:
    """The PTI settings for a generator of ``resolution``: its default steps (``steps`` > 0 overrides) and learning
    rate, the early-stop threshold of the distance named ``distance_name``, a ``seconds`` budget (0 / None:
    unbounded) and any other :class:`PTIConfig` field in ``overrides``."""
    defaults = pti_defaults(resolution)
    config = PTIConfig(
        mode=mode,
        steps=steps if steps > 0 else defaults.steps,
        lr=defaults.lr[mode],
        early_stop_distance=early_stop_threshold(distance_name) if distance_name else None,
        seconds=seconds or None,
    )
    return replace(config, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Rendering with substituted tensors, frames
# ---------------------------------------------------------------------------------------------------------------


class _Synthesis(nn.Module):
    """Wraps a generator so ``torch.func.functional_call`` can run its synthesis network."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, ws: torch.Tensor, noise_mode: NoiseMode) -> torch.Tensor:
        """Render ``ws`` [N, num_ws, w_dim] with the wrapped generator."""
        return self.generator.synthesis(ws, noise_mode=noise_mode)


def synthesize_with(
    generator: Generator, ws: torch.Tensor, tensors: Mapping[str, torch.Tensor], noise_mode: NoiseMode = "const"
) -> torch.Tensor:
    """Render ``ws`` [N, num_ws, w_dim] with some of ``generator``'s parameters/buffers replaced, for this call only.

    ``tensors`` maps state-dict names (e.g. ``"convs.0.conv.weight"``, ``"noises.noise_3"``) to the tensors to use
    instead; the generator is exactly as before when the call returns (or raises). Gradients flow to ``tensors``
    and ``ws``. Returns images [N, 3, R, R].
    """
    overrides = {f"generator.{name}": value for name, value in tensors.items()}
    return torch.func.functional_call(_Synthesis(generator), overrides, (ws,), {"noise_mode": noise_mode})


def image_to_frame(image: torch.Tensor) -> np.ndarray:
    """Convert one model-side image [1, 3, H, W] (or [3, H, W]) in [-1, 1] to uint8 RGB [H, W, 3]."""
    image = image.detach()
    if image.ndim == 4:
        assert image.shape[0] == 1, f"one image expected, got {tuple(image.shape)}"
        image = image[0]
    scaled = (image.float().cpu() + 1.0) * 127.5  # [3, H, W]
    return scaled.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]


def wants_frame(step: int, total: int, frame_every: int) -> bool:
    """Whether step ``step`` (1-based) of ``total`` carries a frame: every ``frame_every``-th and the last."""
    return frame_every > 0 and (step % frame_every == 0 or step == total)


# ---------------------------------------------------------------------------------------------------------------
# Deltas
# ---------------------------------------------------------------------------------------------------------------


def synthesis_parameters(generator: Generator) -> dict[str, torch.Tensor]:
    """The synthesis network's parameters by name, detached (the mapping network is left out)."""
    return {
        name: parameter.detach()
        for name, parameter in generator.named_parameters()
        if not name.startswith(_MAPPING_PREFIX)
    }


def lowrank_targets(generator: Generator) -> list[str]:
    """Names of the weights low-rank deltas act on: the 3×3 modulated convolutions and every style affine."""
    return [name for name, _ in generator.named_parameters() if _LOWRANK_TARGET.match(name)]


def factor_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(O, fan-in) of a low-rank target: [1, O, I, k, k] -> (O, I·k·k); an affine [O, I] -> (O, I)."""
    if weight.ndim == 5:
        return int(weight.shape[1]), int(weight[0, 0].numel())
    assert weight.ndim == 2, f"a low-rank target is [1, O, I, k, k] or [O, I], not {tuple(weight.shape)}"
    return int(weight.shape[0]), int(weight.shape[1])


def _lowrank_pairs(delta: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (weight name, down [r, I·k·k], up [O, r]) for every factor pair of a low-rank delta."""
    for key, down in delta.items():
        if key.endswith(LORA_DOWN):
            name = key[: -len(LORA_DOWN)]
            up = delta.get(name + LORA_UP)
            if up is None:
                raise KeyError(f"low-rank delta has {key} but no {name + LORA_UP}")
            yield name, down, up


def delta_mode(delta: Mapping[str, torch.Tensor]) -> DeltaMode:
    """Return whether a delta holds low-rank factors or full per-parameter differences."""
    factors = [key.endswith((LORA_DOWN, LORA_UP)) for key in delta]
    if factors and all(factors):
        return "lowrank"
    if any(factors):
        raise ValueError("a delta mixes low-rank factors and full differences")
    return "full"


def tuned_tensors(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the tuned value of every tensor a delta touches: ``base[name] + Δ`` (differentiable in the delta)."""
    tuned = {}
    if delta_mode(delta) == "full":
        for name, difference in delta.items():
            if name not in base:
                raise KeyError(f"delta key {name!r} is not a synthesis parameter of this generator")
            assert difference.shape == base[name].shape, f"{name}: delta {difference.shape} vs {base[name].shape}"
            tuned[name] = base[name] + difference
        return tuned
    for name, down, up in _lowrank_pairs(delta):
        if name not in base:
            raise KeyError(f"low-rank delta targets {name!r}, which this generator does not have")
        weight = base[name]  # [1, O, I, k, k] or [O, I]
        assert (up.shape[0], down.shape[1]) == factor_shape(weight), f"{name}: factor shapes"
        tuned[name] = weight + (up @ down).view_as(weight)  # [O, r] @ [r, fan-in] -> the weight's shape
    return tuned


def apply_delta(base_generator: Generator, delta: Mapping[str, torch.Tensor]) -> Generator:
    """Return a NEW generator equal to ``base_generator`` with ``delta`` added; the base is not modified.

    The tuned module holds new tensors only where the delta acts and *shares* every other tensor (buffers and
    untouched parameters) with the base, so it costs one session's tuned weights, not a full copy. Treat it as
    read-only (it is returned in eval mode without gradients).
    """
    with torch.no_grad():
        tuned = tuned_tensors(synthesis_parameters(base_generator), delta)
        state = dict(base_generator.state_dict())  # detached tensors sharing the base's storage
        state.update(tuned)
    with torch.device("meta"):
        generator = Generator(base_generator.config)
    generator.load_state_dict(state, strict=True, assign=True)
    generator.w_avg = base_generator.w_avg.detach().clone()  # a non-persistent buffer: not in the state dict
    leftover = [name for name, value in [*generator.named_parameters(), *generator.named_buffers()] if value.is_meta]
    assert not leftover, f"tensors left on the meta device: {leftover}"
    return generator.eval().requires_grad_(False)


def delta_nbytes(delta: Mapping[str, torch.Tensor]) -> int:
    """Return the bytes a delta's tensors occupy (what a session stores for its tuned generator)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in delta.values())


def delta_sizes(generator: Generator, rank: int = PTIConfig.rank) -> dict[str, int]:
    """The bytes per session of each delta mode for ``generator`` (from its shapes; nothing is trained)."""
    parameters = dict(generator.named_parameters())
    full = delta_nbytes(synthesis_parameters(generator))
    lowrank = 0
    for name in lowrank_targets(generator):
        out_channels, fan_in = factor_shape(parameters[name])
        lowrank += min(rank, out_channels, fan_in) * (out_channels + fan_in) * parameters[name].element_size()
    return {"lowrank": lowrank, "full": full}


def _initial_delta(generator: Generator, config: PTIConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The trainable delta at step 0 (a zero change): zeros (full), or random ``down`` and zero ``up`` (lowrank)."""
    if config.mode == "full":
        return {
            name: torch.zeros_like(value, requires_grad=True) for name, value in synthesis_parameters(generator).items()
        }
    rng = torch.Generator().manual_seed(config.seed)
    parameters = dict(generator.named_parameters())
    delta = {}
    for name in lowrank_targets(generator):
        weight = parameters[name]  # [1, O, I, k, k] or [O, I]
        out_channels, fan_in = factor_shape(weight)
        rank = min(config.rank, out_channels, fan_in)
        down = torch.randn(rank, fan_in, generator=rng) / rank**0.5  # [r, I·k·k]: ΔW moves ~lr per Adam step
        delta[name + LORA_DOWN] = down.to(device=device, dtype=weight.dtype).requires_grad_(True)
        delta[name + LORA_UP] = torch.zeros(out_channels, rank, device=device, dtype=weight.dtype, requires_grad=True)
    return delta


# ---------------------------------------------------------------------------------------------------------------
# The tuning job
# ---------------------------------------------------------------------------------------------------------------


def locality_points(
    generator: Generator, ws: torch.Tensor, config: PTIConfig, rng: torch.Generator
) -> torch.Tensor:
    """PTI's locality points: ``w_p + α·(w_r − w_p)/‖w_r − w_p‖`` for ``locality_samples`` random ``w_r``: [S, L, D].

    ``w_r`` are mapped from random z's at ``locality_truncation``; the norm is over the whole [num_ws, w_dim]
    code, so every point lies at exactly ``config.radius_for(generator)`` from the pivot ``ws`` [1, L, D].
    """
    z = torch.randn(config.locality_samples, generator.w_dim, generator=rng).to(ws.device)  # [S, w_dim]
    random_ws = generator.mapping(z, truncation_psi=config.locality_truncation)  # [S, num_ws, w_dim]
    direction = random_ws - ws  # [S, num_ws, w_dim]
    norm = direction.flatten(1).norm(dim=1).clamp_min(1e-8)  # [S]
    return ws + config.radius_for(generator) * direction / norm[:, None, None]  # [S, num_ws, w_dim]


def finetune(
    generator: Generator,
    target: torch.Tensor,
    ws: torch.Tensor,
    config: PTIConfig,
    perceptual: ImageDistance | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> StepJob[dict[str, torch.Tensor]]:
    """Step-wise pivotal tuning: yields :class:`Progress` per step and returns the session's generator delta.

    ``target`` is the aligned face [1, 3, R, R] in [-1, 1], ``ws`` the pivot [1, num_ws, w_dim] (from an encoder
    or the projector). ``perceptual`` defaults to the weight-free :class:`LaplacianPyramidDistance`. The returned
    delta is a plain dict of detached tensors (see the module docstring); :func:`apply_delta` turns it into a
    tuned generator. ``generator`` is never modified, also when the job is closed mid-way. With
    ``config.seconds`` the step count is chosen after the first steps (timed with ``clock``, from a step's start
    to its ``yield``) and every later Progress reports that total; the last Progress names the delta's bytes.
    """
    resolution = generator.resolution
    assert target.shape == (1, 3, resolution, resolution), f"target must be [1, 3, {resolution}, {resolution}]"
    assert ws.shape == (1, generator.num_ws, generator.w_dim), f"ws must be [1, {generator.num_ws}, {generator.w_dim}]"
    device = generator.input.input.device
    target = target.detach().to(device)  # [1, 3, R, R]
    ws = ws.detach().to(device)  # [1, num_ws, w_dim]
    distance = perceptual if perceptual is not None else LaplacianPyramidDistance().to(device)
    base = synthesis_parameters(generator)
    delta = _initial_delta(generator, config, device)
    trainable = list(delta.values())
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate)
    rng = torch.Generator().manual_seed(config.seed + 1)
    budget = StepBudget(config.steps, config.seconds)
    size = f"delta {delta_nbytes(delta):,} bytes"

    for step in range(1, config.steps + 1):
        began = clock()
        tuned = tuned_tensors(base, delta)
        image = synthesize_with(generator, ws, tuned)  # [1, 3, R, R]
        mse = (image - target).square().mean()
        perceptual_distance = distance(image, target).mean()
        loss = config.mse_weight * mse + config.perceptual_weight * perceptual_distance
        mse_value, distance_value = float(mse.detach()), float(perceptual_distance.detach())
        figures = f"mse {mse_value:.5f} {distance.name} {distance_value:.4f}"
        reached = (config.early_stop_mse is not None and mse_value < config.early_stop_mse) or (
            config.early_stop_distance is not None and distance_value <= config.early_stop_distance
        )
        if reached:
            frame = image_to_frame(image) if config.frame_every > 0 else None
            text = f"pti {config.mode} {step}/{step} {figures} (reached the early-stop threshold; {size})"
            yield Progress("finetune", step, step, text, frame)
            break
        if config.locality_weight > 0 and step % config.locality_every == 0:
            with torch.no_grad():
                points = locality_points(generator, ws, config, rng)  # [S, num_ws, w_dim]
                reference = generator.synthesis(points, noise_mode="const")  # [S, 3, R, R]
            drifted = synthesize_with(generator, points, tuned)  # [S, 3, R, R]
            locality = (drifted - reference).square().mean() + distance(drifted, reference).mean()
            loss = loss + config.locality_weight * locality
        # gradients of the delta only: nothing is accumulated on the shared generator's parameters
        gradients = torch.autograd.grad(loss, trainable)
        for tensor, gradient in zip(trainable, gradients):
            tensor.grad = gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if config.seconds is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # time the step's own kernels, not only their launch
        budget.record(step, clock() - began)
        last = budget.done(step)
        frame = image_to_frame(image) if wants_frame(step, budget.total, config.frame_every) else None
        text = f"pti {config.mode} {step}/{budget.total} {figures}" + (f" ({size})" if last else "")
        yield Progress("finetune", step, budget.total, text, frame)
        if last:
            break
    return {name: tensor.detach() for name, tensor in delta.items()}
