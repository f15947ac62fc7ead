"""The ``project`` encoder: invert a face by optimisation (the StyleGAN2 projector, then w+); see fluidsrv.projector.

It needs no trained weights: its perceptual term is the weight-free Laplacian-pyramid distance, or the features
of a discriminator when the ``discriminator`` option names a GAN checkpoint (ours, or a rosinality ``.pt`` with
``d``); LPIPS-VGG is added when its files are in the weights cache (``lpips=off`` turns that off).

Options (``context.options``; strings are converted): ``steps``, ``wplus_steps``, ``lr``, ``wplus_lr``,
``noise_regularize``, ``optimize_noise``, ``mse_weight``, ``perceptual_weight``, ``frame_every``, ``seed``
(see :class:`fluidsrv.projector.ProjectorConfig`), ``discriminator`` (path), ``lpips`` (``auto`` | ``off``),
``lpips_weight``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fluidsrv import hookimpl
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.perceptual import ImageDistance, inversion_distance
from fluidsrv.projector import ProjectorConfig, project
from fluidsrv.stages import Encoder, Latents, PluginContext, PluginFactory, StepJob

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(value: Any, kind: type) -> Any:
    """Convert an option (a CLI string, or already typed) to ``kind``."""
    if kind is bool and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise ValueError(f"expected a boolean, got {value!r}")
        return lowered in _TRUE
    return kind(value)


def config_from_options(options: Mapping[str, Any], base: Any) -> Any:
    """Return the frozen dataclass ``base`` with the fields named in ``options`` replaced (converted to their type)."""
    changes = {}
    for item in dataclasses.fields(base):
        if item.name in options:
            kind = type(getattr(base, item.name))
            try:
                changes[item.name] = _convert(options[item.name], kind)
            except (TypeError, ValueError) as error:
                raise ValueError(f"option {item.name}={options[item.name]!r}: {error}") from error
    return dataclasses.replace(base, **changes)


class ProjectorEncoder:
    """Encoder that runs :func:`fluidsrv.projector.project` with a perceptual distance built once per device."""

    def __init__(
        self,
        config: ProjectorConfig,
        cache_dir: Path | None = None,
        discriminator: Path | None = None,
        use_lpips: bool = True,
        lpips_weight: float = 1.0,
    ) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self.discriminator = discriminator
        self.use_lpips = use_lpips
        self.lpips_weight = lpips_weight
        self._distances: dict[torch.device, ImageDistance] = {}
        self._lock = threading.Lock()

    def distance(self, device: torch.device) -> ImageDistance:
        """The perceptual distance on ``device`` (loaded on first use: LPIPS's VGG-16 is ~0.5 GB)."""
        with self._lock:
            if device not in self._distances:
                self._distances[device] = inversion_distance(
                    self.cache_dir, self.discriminator, self.use_lpips, self.lpips_weight, device
                )
            return self._distances[device]

    def encode(self, image: torch.Tensor, generator: Generator) -> StepJob[Latents]:
        """Step-wise projection of ``image`` [1, 3, R, R] in [-1, 1]; yields Progress with frames."""
        return self._encode(image, generator)

    def _encode(self, image: torch.Tensor, generator: Generator) -> StepJob[Latents]:
        device = generator.w_avg.device
        latents = yield from project(generator, image.to(device), self.config, self.distance(device))
        return latents


def _discriminator_option(context: PluginContext) -> Path | None:
    value = context.options.get("discriminator")
    return Path(str(value)).expanduser() if value else None


def _unavailable(context: PluginContext) -> str | None:
    discriminator = _discriminator_option(context)
    if discriminator is not None and not discriminator.is_file():
        return f"the discriminator checkpoint {discriminator} (option 'discriminator') does not exist"
    try:
        config_from_options(context.options, ProjectorConfig())
    except ValueError as error:
        return str(error)
    return None


def _create(context: PluginContext) -> ProjectorEncoder:
    options = context.options
    lpips = str(options.get("lpips", "auto")).strip().lower()
    if lpips not in ("auto", "off"):
        raise ValueError(f"option lpips must be 'auto' or 'off', got {lpips!r}")
    return ProjectorEncoder(
        config_from_options(options, ProjectorConfig()),
        cache_dir=context.cache_dir,
        discriminator=_discriminator_option(context),
        use_lpips=lpips == "auto",
        lpips_weight=float(options.get("lpips_weight", 1.0)),
    )


@hookimpl
def fluidsrv_encoders() -> list[PluginFactory[Encoder]]:
    """Register the optimisation-based projector."""
    return [
        PluginFactory(
            "project",
            "optimise w (from w_avg, with noise regularisation), then w+: pixel L2 + a perceptual distance "
            "(LPIPS-VGG added when cached); slow but needs no encoder weights, films every step",
            create=_create,
            unavailable=_unavailable,
        )
    ]
