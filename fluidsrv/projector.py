"""Optimisation-based inversion in the manner of the StyleGAN2 projector (Karras et al., 2020, Appendix D).

Phase 1 (``steps``) optimises one ``w`` [1, w_dim], starting from ``w_avg``, together with the generator's
per-layer noise images (copies: the shared generator is never written to):

* Adam with a learning rate ramped up over the first ``lr_rampup`` and down (cosine) over the last
  ``lr_rampdown`` of the steps;
* Gaussian noise of ``initial_noise_factor``·σ_w, decaying quadratically to 0 at ``noise_ramp``, added to ``w``
  (σ_w is the RMS distance of mapped random w's to ``w_avg``), so the search explores early on;
* noise regularisation: the squared auto-correlation of every noise image at 1-pixel shifts, over a pyramid
  down to 8×8, weighted by ``noise_regularize``; after each step the noise images are renormalised to zero mean
  and unit variance. This keeps detail out of the noise, so it has to be explained by ``w``.

Phase 2 (``wplus_steps``, optional) refines a separate code per layer (w+), starting from the phase-1 ``w``,
rendered with the generator's own stored noise (``noise_mode="const"``), the noise every later stage renders
with; so the returned ``ws`` reproduce what the last frames show (up to the last step's update). Phase 1's
optimised noise is a nuisance variable and is discarded.

The loss is ``mse_weight``·pixel L2 + ``perceptual_weight``·a perceptual distance (the weight-free Laplacian
pyramid by default; see :mod:`fluidsrv.perceptual` for the discriminator-feature and LPIPS options). Every step
yields a :class:`~fluidsrv.stages.Progress`; every ``frame_every``-th carries the current render, so the search
can be filmed (``fluidsrv project PHOTO --video steps.mp4``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fluidsrv.models.stylegan2 import Generator
from fluidsrv.perceptual import ImageDistance, LaplacianPyramidDistance
from fluidsrv.pti import image_to_frame, synthesize_with, wants_frame
from fluidsrv.stages import Latents, Progress, StepJob


@dataclass(frozen=True)
class ProjectorConfig:
    """Settings of one projection (defaults follow the StyleGAN2 projector where it has one)."""

    steps: int = 500  # phase 1: steps optimising w and the noise images
    wplus_steps: int = 200  # phase 2: steps refining per-layer codes (0 = return w repeated)
    lr: float = 0.1  # phase-1 peak Adam learning rate
    wplus_lr: float = 0.01  # phase-2 peak Adam learning rate
    lr_rampup: float = 0.05  # fraction of a phase spent ramping the learning rate up
    lr_rampdown: float = 0.25  # fraction of a phase spent ramping it down (cosine)
    initial_noise_factor: float = 0.05  # exploration noise added to w at the start, in units of σ_w
    noise_ramp: float = 0.75  # fraction of phase 1 after which the exploration noise is 0
    noise_regularize: float = 1e5  # weight of the noise-image auto-correlation penalty
    optimize_noise: bool = True  # optimise the noise images in phase 1 (else render with the stored ones)
    mse_weight: float = 1.0  # weight of the pixel L2 loss (images in [-1, 1])
    perceptual_weight: float = 1.0  # weight of the perceptual distance
    w_std_samples: int = 2000  # mapped random z's used to estimate σ_w
    frame_every: int = 10  # attach the current render to every this-many-th step (and each phase's last); 0 = never
    seed: int = 0  # seeds the noise images, σ_w's samples and the exploration noise

    def __post_init__(self) -> None:
        if self.steps < 1 or self.wplus_steps < 0 or self.frame_every < 0 or self.w_std_samples < 2:
            raise ValueError("need steps >= 1, wplus_steps >= 0, frame_every >= 0 and w_std_samples >= 2")

    @property
    def total_steps(self) -> int:
        """Steps of both phases."""
        return self.steps + self.wplus_steps


def learning_rate_factor(t: float, rampup: float, rampdown: float) -> float:
    """The StyleGAN2 projector's schedule at phase fraction ``t`` in [0, 1]: linear ramp-up, cosine ramp-down."""
    down = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    factor = 0.5 - 0.5 * math.cos(down * math.pi)
    return factor * (min(1.0, t / rampup) if rampup > 0 else 1.0)


def noise_regularisation(noises: list[torch.Tensor]) -> torch.Tensor:
    """Σ over noise images and pyramid levels (down to 8×8) of squared 1-pixel auto-correlations (x and y)."""
    total = noises[0].new_zeros(())
    for noise in noises:
        level = noise  # [1, 1, S, S]
        while True:
            total = total + (level * torch.roll(level, shifts=1, dims=3)).mean().square()
            total = total + (level * torch.roll(level, shifts=1, dims=2)).mean().square()
            if level.shape[2] <= 8:
                break
            level = F.avg_pool2d(level, kernel_size=2)  # [1, 1, S/2, S/2]
    return total


@torch.no_grad()
def _normalise_noises(noises: list[torch.Tensor]) -> None:
    for noise in noises:
        noise.sub_(noise.mean()).mul_(noise.square().mean().rsqrt())


@torch.no_grad()
def w_spread(generator: Generator, samples: int, seed: int) -> float:
    """σ_w: the RMS distance of ``samples`` mapped random z's to ``generator.w_avg``."""
    z = torch.randn(samples, generator.w_dim, generator=torch.Generator().manual_seed(seed))  # [S, w_dim]
    w = generator.mapping(z.to(generator.w_avg.device))[:, 0]  # [S, w_dim]
    return float((w - generator.w_avg).square().sum(dim=1).mean().sqrt())


def project(
    generator: Generator, target: torch.Tensor, config: ProjectorConfig, perceptual: ImageDistance | None = None
) -> StepJob[Latents]:
    """Step-wise projection of ``target`` [1, 3, R, R] in [-1, 1] into ``generator``'s W (then W+); see the module.

    Yields one :class:`Progress` per step (stage ``"project"``) and returns :class:`Latents`: ``w`` [1, w_dim]
    from phase 1 and ``ws`` [1, num_ws, w_dim] from phase 2 (``w`` repeated when ``wplus_steps`` is 0).
    ``generator`` is never modified, also when the job is closed mid-way.
    """
    resolution = generator.resolution
    assert target.shape == (1, 3, resolution, resolution), f"target must be [1, 3, {resolution}, {resolution}]"
    device = generator.w_avg.device
    target = target.detach().to(device)  # [1, 3, R, R]
    distance = perceptual if perceptual is not None else LaplacianPyramidDistance().to(device)
    total = config.total_steps

    def reconstruction(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mse = (image - target).square().mean()
        return config.mse_weight * mse + config.perceptual_weight * distance(image, target).mean(), mse

    # ---- phase 1: w and the noise images -------------------------------------------------------------------
    rng = torch.Generator().manual_seed(config.seed)
    sigma_w = w_spread(generator, config.w_std_samples, config.seed)
    w = generator.w_avg.detach().clone().unsqueeze(0).requires_grad_(True)  # [1, w_dim]
    noise_names = [f"noises.noise_{layer}" for layer in range(generator.num_noise_layers)]
    stored = dict(generator.named_buffers())
    noises = [torch.randn(stored[name].shape, generator=rng).to(device) for name in noise_names]  # [1, 1, S, S]
    if config.optimize_noise:
        for noise in noises:
            noise.requires_grad_(True)
    trainable = [w, *noises] if config.optimize_noise else [w]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, betas=(0.9, 0.999))
    for step in range(1, config.steps + 1):
        t = (step - 1) / config.steps
        for group in optimizer.param_groups:
            group["lr"] = config.lr * learning_rate_factor(t, config.lr_rampup, config.lr_rampdown)
        exploration = sigma_w * config.initial_noise_factor * max(0.0, 1.0 - t / config.noise_ramp) ** 2
        w_noisy = w + exploration * torch.randn(w.shape, generator=rng).to(device)  # [1, w_dim]
        ws = w_noisy.unsqueeze(1).repeat(1, generator.num_ws, 1)  # [1, num_ws, w_dim]
        tensors = dict(zip(noise_names, noises)) if config.optimize_noise else {}
        image = synthesize_with(generator, ws, tensors)  # [1, 3, R, R]
        loss, mse = reconstruction(image)
        if config.optimize_noise:
            loss = loss + config.noise_regularize * noise_regularisation(noises)
        gradients = torch.autograd.grad(loss, trainable)  # nothing accumulates on the generator's parameters
        for tensor, gradient in zip(trainable, gradients):
            tensor.grad = gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if config.optimize_noise:
            _normalise_noises(noises)
        frame = image_to_frame(image) if wants_frame(step, config.steps, config.frame_every) else None
        yield Progress("project", step, total, f"w {step}/{config.steps} mse {float(mse.detach()):.5f}", frame)

    w_final = w.detach().clone()  # [1, w_dim]
    ws_final = w_final.unsqueeze(1).repeat(1, generator.num_ws, 1)  # [1, num_ws, w_dim]
    if config.wplus_steps == 0:
        return Latents(w=w_final, ws=ws_final)

    # ---- phase 2: per-layer codes with the stored noise ----------------------------------------------------
    ws_opt = ws_final.clone().requires_grad_(True)  # [1, num_ws, w_dim]
    optimizer = torch.optim.Adam([ws_opt], lr=config.wplus_lr, betas=(0.9, 0.999))
    for step in range(1, config.wplus_steps + 1):
        t = (step - 1) / config.wplus_steps
        for group in optimizer.param_groups:
            group["lr"] = config.wplus_lr * learning_rate_factor(t, config.lr_rampup, config.lr_rampdown)
        image = synthesize_with(generator, ws_opt, {})  # [1, 3, R, R]
        loss, mse = reconstruction(image)
        (gradient,) = torch.autograd.grad(loss, [ws_opt])
        ws_opt.grad = gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        overall = config.steps + step
        frame = image_to_frame(image) if wants_frame(step, config.wplus_steps, config.frame_every) else None
        message = f"w+ {step}/{config.wplus_steps} mse {float(mse.detach()):.5f}"
        yield Progress("project", overall, total, message, frame)
    return Latents(w=w_final, ws=ws_opt.detach().clone())
