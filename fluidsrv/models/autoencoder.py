"""The preview student's autoencoder: an aligned face → a 512×4×4 code → an image.

The encoder is a plain strided-convolution ResNet that halves the side down to 4×4; the decoder mirrors it with
nearest-neighbour upsampling and residual 3×3 convolutions, then a 1×1 ToRGB. It is trained (see
:mod:`fluidsrv.training.student`) with pixel, perceptual and adversarial losses to reproduce faces of one
generator; the :mod:`fluidsrv.models.modulator` edits its codes. Images are ``[N, 3, H, W]`` in [-1, 1]; the
decoder's output is not clamped (callers clamp when they convert to pixels).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CODE_SIDE = 4  # the code is [N, code_channels, 4, 4]


def _default_widths(resolution: int) -> dict[int, int]:
    """Feature widths per side from 4² up to ``resolution``: 256 at 4², 192 at 8², then halving, at least 12."""
    widths = {CODE_SIDE: 256}
    side, width = 2 * CODE_SIDE, 192
    while side <= resolution:
        widths[side] = max(12, width)
        width //= 2
        side *= 2
    return widths


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of a :class:`FaceAutoencoder`: input side, output side, code width and feature widths per side."""

    resolution: int = 128  # input side (a power of two ≥ 8)
    out_resolution: int = 128  # decoder output side (a power of two ≥ 8)
    code_channels: int = 512
    widths: Mapping[int, int] = field(default_factory=dict)  # side -> channels; empty: _default_widths

    def __post_init__(self) -> None:
        for side in (self.resolution, self.out_resolution):
            if side < 8 or side & (side - 1):
                raise ValueError(f"autoencoder sides must be powers of two >= 8, got {side}")
        top = max(self.resolution, self.out_resolution)
        widths = {int(side): int(width) for side, width in self.widths.items()} or _default_widths(top)
        missing = [side for side in _sides(top) if side not in widths]
        if missing:
            raise ValueError(f"autoencoder widths lack sides {missing}")
        object.__setattr__(self, "widths", widths)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (width keys become strings)."""
        data = dataclasses.asdict(self)
        data["widths"] = {str(side): width for side, width in self.widths.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoencoderConfig:
        """Build from :meth:`to_dict` output; unknown fields are an error."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig fields: {unknown}")
        values = dict(data)
        values["widths"] = {int(side): int(width) for side, width in dict(values.get("widths", {})).items()}
        return cls(**values)


def _sides(resolution: int) -> list[int]:
    """4, 8, …, ``resolution``."""
    return [CODE_SIDE * 2**i for i in range(int(math.log2(resolution // CODE_SIDE)) + 1)]


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with leaky ReLUs and a (1×1 when the width changes) skip, scaled by 1/√2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, I, H, W] -> [N, O, H, W]."""
        y = self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.2)), 0.2))
        skip = x if self.skip is None else self.skip(x)
        return (skip + y) * (1.0 / math.sqrt(2.0))


class FaceEncoder(nn.Module):
    """Image [N, 3, R, R] -> code [N, C, 4, 4]: a 1×1 FromRGB, then one residual block + 2× downsampling per octave."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        sides = _sides(config.resolution)[::-1]  # R, R/2, …, 4
        widths = config.widths
        self.from_rgb = nn.Conv2d(3, widths[sides[0]], 1)
        self.blocks = nn.ModuleList(ResidualBlock(widths[side], widths[side // 2]) for side in sides[:-1])
        self.to_code = nn.Conv2d(widths[CODE_SIDE], config.code_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Encode images [N, 3, R, R] to codes [N, C, 4, 4]."""
        x = self.from_rgb(image)
        for block in self.blocks:
            x = F.avg_pool2d(block(x), 2)
        return self.to_code(F.leaky_relu(x, 0.2))


class FaceDecoder(nn.Module):
    """Code [N, C, 4, 4] -> image [N, 3, R', R']: one residual block per octave after a 2× nearest upsampling."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        sides = _sides(config.out_resolution)  # 4, 8, …, R'
        widths = config.widths
        self.from_code = ResidualBlock(config.code_channels, widths[CODE_SIDE])
        self.blocks = nn.ModuleList(ResidualBlock(widths[side // 2], widths[side]) for side in sides[1:])
        self.to_rgb = nn.Conv2d(widths[sides[-1]], 3, 1)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """Decode codes [N, C, 4, 4] to images [N, 3, R', R'] (unclamped, about [-1, 1])."""
        x = self.from_code(code)
        for block in self.blocks:
            x = block(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.to_rgb(F.leaky_relu(x, 0.2))

    def tail_names(self, blocks: int) -> list[str]:
        """Parameter-name prefixes of the last ``blocks`` blocks and ToRGB (what a session may fine-tune)."""
        count = len(self.blocks)
        return [f"blocks.{index}." for index in range(max(0, count - blocks), count)] + ["to_rgb."]


class FaceAutoencoder(nn.Module):
    """The student's autoencoder: :class:`FaceEncoder` and :class:`FaceDecoder` sharing one config."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = FaceEncoder(config)
        self.decoder = FaceDecoder(config)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Encode images [N, 3, R, R] (resized to the input side when they differ) to codes [N, C, 4, 4]."""
        side = self.config.resolution
        if image.shape[-1] != side or image.shape[-2] != side:
            image = F.interpolate(image, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return self.encoder(image)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Decode codes [N, C, 4, 4] to images [N, 3, R', R']."""
        return self.decoder(code)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruct images: decode(encode(image))."""
        return self.decode(self.encode(image))
