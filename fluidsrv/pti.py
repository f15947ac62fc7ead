"""Pivotal tuning (PTI, Roich et al., 2022): fine-tune a generator so a pivot ``ws`` reproduces a photo.

The result of a session is a *delta*, never a modified generator: the base generator is shared by every session
and is never written to (its tensors are read, detached, and rendered through :func:`synthesize_with`, which
substitutes tensors for one call only). Two kinds of delta:

* ``full``: one difference tensor per trainable synthesis parameter (convolution and modulation weights, biases,
  noise strengths, ToRGB, the constant input); keys are the parameter names. The mapping network is not tuned:
  PTI works from a fixed ``ws``, so it receives no gradient.
* ``lowrank``: LoRA factors on the 3×3 modulated convolution weights of every synthesis layer
  (``conv1`` and ``convs.*``): ``ΔW = up @ down`` with ``down`` [rank, I·k·k] (key ``<name>.lora_down``) and
  ``up`` [O, rank] (``<name>.lora_up``). The 1×1 ToRGB weights are left alone: with three output channels a
  factorisation would not be smaller than the weight itself.

The loss is PTI's: ``mse_weight``·pixel L2 + ``perceptual_weight``·a perceptual distance between the render of
the pivot and the target, plus a *locality* term that keeps the renders of a few random ``w``'s near the pivot
close to what the base generator draws for them (so edits around the pivot still behave). Training stops early
once the pixel MSE falls below ``early_stop_mse``.

Everything here runs on the thread that owns the device (the executor's worker): :func:`synthesize_with`
swaps tensors on the shared module for the duration of one call.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from fluidsrv.models.stylegan2 import Generator, NoiseMode
from fluidsrv.perceptual import ImageDistance, LaplacianPyramidDistance
from fluidsrv.stages import Progress, StepJob

DeltaMode = Literal["full", "lowrank"]
LORA_DOWN = ".lora_down"  # key suffix of a down factor [rank, I·k·k]
LORA_UP = ".lora_up"  # key suffix of an up factor [O, rank]
DEFAULT_LR: dict[str, float] = {"full": 3e-4, "lowrank": 3e-3}
_MAPPING_PREFIX = "style."
_LOWRANK_TARGET = re.compile(r"^(conv1|convs\.\d+)\.conv\.weight$")


@dataclass(frozen=True)
class PTIConfig:
    """How one pivotal-tuning session runs."""

    mode: DeltaMode = "lowrank"  # "full": per-parameter differences; "lowrank": LoRA factors on the 3×3 conv weights
    steps: int = 350  # optimisation steps at most (PTI's default)
    lr: float | None = None  # Adam learning rate; None: 3e-4 for full (PTI's), 3e-3 for lowrank
    rank: int = 8  # rank of the low-rank factors (lowrank mode)
    mse_weight: float = 1.0  # weight of the pixel L2 reconstruction loss
    perceptual_weight: float = 1.0  # weight of the perceptual distance to the target
    locality_weight: float = 0.1  # weight of the locality term (PTI's 0.1); 0 turns it off
    locality_samples: int = 1  # random w's per locality evaluation
    locality_every: int = 1  # evaluate the locality term every this many steps
    locality_mix: float = 0.5  # random w's lie this fraction of the way from the pivot to a random mapped w
    early_stop_mse: float | None = None  # stop once the pivot's pixel MSE (images in [-1, 1]) is below this
    frame_every: int = 10  # attach the current render to every this-many-th Progress (0: never)
    seed: int = 0  # seeds the low-rank initialisation and the locality samples

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lowrank"):
            raise ValueError(f"mode must be 'full' or 'lowrank', got {self.mode!r}")
        if self.steps < 1 or self.rank < 1 or self.locality_samples < 1 or self.locality_every < 1:
            raise ValueError("steps, rank, locality_samples and locality_every must be >= 1")
        if self.frame_every < 0 or not 0.0 <= self.locality_mix <= 1.0:
            raise ValueError("frame_every must be >= 0 and locality_mix in [0, 1]")

    @property
    def learning_rate(self) -> float:
        """The Adam learning rate in use (``lr`` or the mode's default)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


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
    """Names of the 3×3 modulated convolution weights that low-rank deltas act on."""
    return [name for name, _ in generator.named_parameters() if _LOWRANK_TARGET.match(name)]


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
        weight = base[name]  # [1, O, I, k, k]
        assert up.shape[0] == weight.shape[1] and down.shape[1] == weight[0, 0].numel(), f"{name}: factor shapes"
        tuned[name] = weight + (up @ down).view_as(weight)  # [O, r] @ [r, I·k·k] -> [1, O, I, k, k]
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
        weight = parameters[name]  # [1, O, I, k, k]
        out_channels, fan_in = weight.shape[1], weight[0, 0].numel()
        rank = min(config.rank, out_channels, fan_in)
        down = torch.randn(rank, fan_in, generator=rng) / rank**0.5  # [r, I·k·k]: ΔW moves ~lr per Adam step
        delta[name + LORA_DOWN] = down.to(device=device, dtype=weight.dtype).requires_grad_(True)
        delta[name + LORA_UP] = torch.zeros(out_channels, rank, device=device, dtype=weight.dtype, requires_grad=True)
    return delta


# ---------------------------------------------------------------------------------------------------------------
# The tuning job
# ---------------------------------------------------------------------------------------------------------------


def _random_neighbours(generator: Generator, ws: torch.Tensor, config: PTIConfig, rng: torch.Generator) -> torch.Tensor:
    """``locality_samples`` w's a ``locality_mix`` of the way from the pivot to random mapped w's: [S, L, D]."""
    z = torch.randn(config.locality_samples, generator.w_dim, generator=rng).to(ws.device)  # [S, w_dim]
    random_ws = generator.mapping(z)  # [S, num_ws, w_dim]
    return torch.lerp(ws.expand_as(random_ws), random_ws, config.locality_mix)  # [S, num_ws, w_dim]


def finetune(
    generator: Generator,
    target: torch.Tensor,
    ws: torch.Tensor,
    config: PTIConfig,
    perceptual: ImageDistance | None = None,
) -> StepJob[dict[str, torch.Tensor]]:
    """Step-wise pivotal tuning: yields :class:`Progress` per step and returns the session's generator delta.

    ``target`` is the aligned face [1, 3, R, R] in [-1, 1], ``ws`` the pivot [1, num_ws, w_dim] (from an encoder
    or the projector). ``perceptual`` defaults to the weight-free :class:`LaplacianPyramidDistance`. The returned
    delta is a plain dict of detached tensors (see the module docstring); :func:`apply_delta` turns it into a
    tuned generator. ``generator`` is never modified, also when the job is closed mid-way.
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

    for step in range(1, config.steps + 1):
        tuned = tuned_tensors(base, delta)
        image = synthesize_with(generator, ws, tuned)  # [1, 3, R, R]
        mse = (image - target).square().mean()
        loss = config.mse_weight * mse + config.perceptual_weight * distance(image, target).mean()
        message = f"pti {config.mode} {step}/{config.steps} mse {float(mse.detach()):.5f}"
        if config.early_stop_mse is not None and float(mse.detach()) < config.early_stop_mse:
            frame = image_to_frame(image) if config.frame_every > 0 else None
            yield Progress("finetune", step, step, message + " (reached the early-stop threshold)", frame)
            break
        if config.locality_weight > 0 and step % config.locality_every == 0:
            with torch.no_grad():
                neighbours = _random_neighbours(generator, ws, config, rng)  # [S, num_ws, w_dim]
                reference = generator.synthesis(neighbours, noise_mode="const")  # [S, 3, R, R]
            drifted = synthesize_with(generator, neighbours, tuned)  # [S, 3, R, R]
            locality = (drifted - reference).square().mean() + distance(drifted, reference).mean()
            loss = loss + config.locality_weight * locality
        # gradients of the delta only: nothing is accumulated on the shared generator's parameters
        gradients = torch.autograd.grad(loss, trainable)
        for tensor, gradient in zip(trainable, gradients):
            tensor.grad = gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        frame = image_to_frame(image) if wants_frame(step, config.steps, config.frame_every) else None
        yield Progress("finetune", step, config.steps, message, frame)
    return {name: tensor.detach() for name, tensor in delta.items()}
