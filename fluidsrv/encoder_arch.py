"""The e4e encoder shapes shared by the ``e4e`` plugin and encoder training (kept out of :mod:`fluidsrv.training`).

An :class:`EncoderArchitecture` fixes the backbone and style-block widths; :func:`encoder_config` adapts it to a
generator (its num_ws, w_dim and resolution). :func:`resize_for_encoder` brings images to the encoder's input
side, and :func:`generator_fingerprint` is the short hash an encoder file records (under :data:`FINGERPRINT_KEY`)
of the generator it was trained with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fluidsrv.models.e4e import E4EConfig
from fluidsrv.models.stylegan2 import Generator, GeneratorConfig

FINGERPRINT_KEY = "generator_fingerprint"
MIN_INPUT_SIZE = 32  # the coarse map (input / 16) must be at least 2×2 for the style blocks
MAX_INPUT_SIZE = 256  # e4e's input size; larger generators see their image downsampled


@dataclass(frozen=True)
class EncoderArchitecture:
    """The backbone and style-block widths of an encoder; the generator fixes num_ws, w_dim and the input size."""

    stage_blocks: tuple[int, int, int, int]  # IR-SE units per stage
    stage_widths: tuple[int, int, int, int]  # channels per stage (the last is the pyramid width)
    style_channels: int  # conv width inside each per-layer style block
    se_reduction: int = 16  # squeeze-excitation reduction (stage widths must be ≥ it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_blocks", tuple(int(n) for n in self.stage_blocks))
        object.__setattr__(self, "stage_widths", tuple(int(n) for n in self.stage_widths))
        widths = self.stage_widths
        if any(widths[i] == widths[i + 1] for i in range(len(widths) - 1)):
            # stages are found where the width changes when an e4e-layout state dict is read back
            raise ValueError(f"consecutive stage widths must differ, got {widths}")


ARCHITECTURES: dict[str, EncoderArchitecture] = {
    # 6.5M parameters (13 MB in fp16), 32 ms a face on one CPU thread at 128²: the shipped encoder
    "encoder-128": EncoderArchitecture((1, 2, 3, 1), (16, 32, 96, 192), style_channels=96),
    # 3.0M parameters, 31 ms a face, ~2× faster to train: the CPU fallback
    "cpu-128": EncoderArchitecture((1, 2, 3, 1), (16, 32, 64, 128), style_channels=64),
    # for tests and smoke runs
    "tiny": EncoderArchitecture((1, 1, 1, 1), (8, 12, 16, 24), style_channels=8, se_reduction=4),
}


def encoder_config(architecture: EncoderArchitecture, generator: GeneratorConfig) -> E4EConfig:
    """Return the :class:`E4EConfig` of ``architecture`` for a generator (its num_ws, w_dim and resolution)."""
    num_ws = generator.num_ws
    return E4EConfig(
        num_ws=num_ws,
        w_dim=generator.w_dim,
        input_size=max(MIN_INPUT_SIZE, min(generator.resolution, MAX_INPUT_SIZE)),
        stage_blocks=architecture.stage_blocks,
        stage_widths=architecture.stage_widths,
        style_channels=architecture.style_channels,
        se_reduction=architecture.se_reduction,
        coarse_end=min(3, num_ws),  # e4e's split: 4²–8² styles read the coarse map, 16²–32² the middle one
        middle_end=min(7, num_ws),
    )


def generator_fingerprint(generator: Generator) -> str:
    """A short hash of a generator's parameters rounded to fp16 (equal for an fp32 model and its fp16 file)."""
    digest = hashlib.sha256(json.dumps(generator.config.to_dict(), sort_keys=True).encode())
    for name, parameter in generator.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def resize_for_encoder(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """Resize images [N, 3, R, R] to the encoder's input side (antialiased bilinear) when they differ."""
    if images.shape[-1] == input_size:
        return images
    return F.interpolate(images, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
