"""The preset network: a small U-Net that draws one hard-coded edit of an aligned face as a residual.

A preset distils a single slider move of a generator (``G(w) → G(w + S·d)``) into an image-to-image network, so
applying it needs no generator, no encoder and no fine-tuning: ``edited = face + residual(face)``. The U-Net has one
residual block per level on the way down (strided 2× downsampling), a middle block at the coarsest side, and one
block per level on the way up (nearest 2× upsampling, the skip of the same side concatenated). The final 1×1
convolution starts at zero, so an untrained preset is exactly the identity. Images are ``[N, 3, R, R]`` in [-1, 1];
the output is not clamped (callers clamp when they convert to pixels).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PresetNetConfig:
    """Shape of a :class:`PresetNet`: the face side it works at and the channel width of each level."""

    resolution: int = 128  # side of the aligned inner crop (the generator's resolution it was distilled from)
    widths: tuple[int, ...] = (24, 48, 96, 144)  # channels at R, R/2, R/4, R/8 (one entry per level)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(width) for width in self.widths))
        levels = len(self.widths)
        if levels < 2 or any(width < 4 for width in self.widths):
            raise ValueError(f"a preset net needs at least two levels of >= 4 channels, got {self.widths}")
        if self.resolution < 2**levels or self.resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {self.resolution} cannot be halved {levels - 1} times")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {"resolution": self.resolution, "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PresetNetConfig:
        """Build from :meth:`to_dict` output; unknown fields are an error."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PresetNetConfig fields: {unknown}")
        values = dict(data)
        if "widths" in values:
            values["widths"] = tuple(values["widths"])
        return cls(**values)


class ConvBlock(nn.Module):
    """Two 3×3 convolutions with leaky ReLUs and a (1×1 when the width changes) skip, scaled by 1/√2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, I, H, W] -> [N, O, H, W]."""
        y = self.conv2(F.leaky_relu(self.conv1(x), 0.2))
        skip = x if self.skip is None else self.skip(x)
        return F.leaky_relu((skip + y) * (1.0 / math.sqrt(2.0)), 0.2)


class PresetNet(nn.Module):
    """Aligned face [N, 3, R, R] -> the same face with the preset's edit: ``face + residual(face)``."""

    def __init__(self, config: PresetNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        self.from_rgb = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(ConvBlock(widths[i], widths[i]) for i in range(len(widths) - 1))
        self.downsamples = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(len(widths) - 1))
        self.middle = ConvBlock(widths[-1], widths[-1])
        self.up_blocks = nn.ModuleList(
            ConvBlock(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.to_residual = nn.Conv2d(widths[0], 3, 1)
        nn.init.zeros_(self.to_residual.weight)  # an untrained preset is the identity
        assert self.to_residual.bias is not None
        nn.init.zeros_(self.to_residual.bias)

    def residual(self, face: torch.Tensor) -> torch.Tensor:
        """The edit's change [N, 3, R, R] of faces [N, 3, R, R] (in [-1, 1] units; R is ``config.resolution`` when
        applied, a crop of it in training)."""
        step = 2 ** (len(self.config.widths) - 1)  # fully convolutional: any side it can halve (training crops)
        assert face.ndim == 4 and face.shape[1] == 3 and face.shape[2] % step == 0 and face.shape[3] % step == 0, (
            f"expected [N, 3, H, W] with sides divisible by {step}, got {tuple(face.shape)}")
        x = F.leaky_relu(self.from_rgb(face), 0.2)  # [N, C0, R, R]
        skips = []
        for block, downsample in zip(self.down_blocks, self.downsamples, strict=True):
            x = block(x)
            skips.append(x)
            x = F.leaky_relu(downsample(x), 0.2)  # [N, C(i+1), H/2, W/2]
        x = self.middle(x)
        for block, skip in zip(self.up_blocks, reversed(skips), strict=True):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], dim=1))
        return self.to_residual(x)  # [N, 3, R, R]

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        """The edited faces [N, 3, R, R] (unclamped)."""
        return face + self.residual(face)
