"""Encoder4Editing (e4e): an IR-SE ResNet with a feature pyramid that predicts StyleGAN2 w+ codes.

The design follows "Designing an Encoder for StyleGAN Image Manipulation" (Tov et al., 2021):

* an IR-SE backbone (input stem, then four stages of ``bottleneck_IR_SE`` units whose first unit halves the
  resolution) yields three feature maps: ``fine`` (end of stage 2, /4), ``middle`` (end of stage 3, /8) and
  ``coarse`` (end of stage 4, /16);
* a small feature pyramid (lateral 1×1 convs ``latlayer1`` / ``latlayer2``) refines the coarse map with the
  middle and fine maps, so each style sees the detail its generator layers need;
* one ``GradualStyleBlock`` per generator layer (strided 3×3 convs down to 1×1, then an equalized linear)
  reads one of the three maps: layers ``[0, coarse_end)`` the coarse map, ``[coarse_end, middle_end)`` the
  middle map and the rest the fine map;
* the output is a single base code ``w0`` (from style 0) repeated over all layers plus a per-layer delta for
  layers ≥ 1: ``codes[:, i] = w0 + delta_i``. The caller adds the generator's ``latent_avg``.

With the default :class:`E4EConfig` the module's state dict has exactly the keys and shapes of the official
``Encoder4Editing(50, 'ir_se')`` at stylegan_size 1024 (the ``encoder.*`` half of the e4e FFHQ checkpoint);
smaller backbones and widths can be configured for our own low-resolution encoders.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Units per stage of the IR-SE backbones of the ArcFace / pSp family, by depth.
IR_SE_STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
}


@dataclass(frozen=True)
class E4EConfig:
    """Shape of an Encoder4Editing network; the defaults are the official FFHQ-1024 encoder."""

    num_ws: int = 18  # generator layers to predict codes for: 2·log2(resolution) − 2
    w_dim: int = 512  # width of each predicted w code
    input_size: int = 256  # square input image side; must be a power of two ≥ 16
    stage_blocks: tuple[int, ...] = IR_SE_STAGE_BLOCKS[50]  # bottleneck units in each of the 4 stages
    stage_widths: tuple[int, ...] = (64, 128, 256, 512)  # output channels of each of the 4 stages
    style_channels: int = 512  # conv width inside each GradualStyleBlock
    se_reduction: int = 16  # squeeze-and-excitation channel reduction factor
    coarse_end: int = 3  # layers [0, coarse_end) read the coarse (/16) feature map
    middle_end: int = 7  # layers [coarse_end, middle_end) the middle (/8) map; the rest the fine (/4) map

    def __post_init__(self) -> None:
        # JSON round trips give lists; store tuples so the config stays hashable and comparable.
        object.__setattr__(self, "stage_blocks", tuple(int(n) for n in self.stage_blocks))
        object.__setattr__(self, "stage_widths", tuple(int(n) for n in self.stage_widths))
        if len(self.stage_blocks) != 4 or len(self.stage_widths) != 4:
            raise ValueError(f"the backbone has exactly 4 stages, got {self.stage_blocks} / {self.stage_widths}")
        if min(self.stage_blocks) < 1 or min(self.stage_widths) < self.se_reduction:
            raise ValueError("every stage needs ≥ 1 unit and a width ≥ se_reduction")
        if self.input_size < 16 or self.input_size & (self.input_size - 1):
            raise ValueError(f"input_size must be a power of two ≥ 16, got {self.input_size}")
        if self.num_ws < 2 or self.num_ws % 2:
            raise ValueError(f"num_ws must be an even number ≥ 2 (2·log2(res) − 2), got {self.num_ws}")
        if not 1 <= self.coarse_end <= self.middle_end:
            raise ValueError(f"need 1 ≤ coarse_end ≤ middle_end, got {self.coarse_end}, {self.middle_end}")

    @classmethod
    def for_resolution(cls, resolution: int, **overrides: Any) -> E4EConfig:
        """Return the config for a generator of the given output resolution (num_ws = 2·log2(res) − 2)."""
        log2 = int(math.log2(resolution))
        if 2**log2 != resolution or resolution < 4:
            raise ValueError(f"generator resolution must be a power of two ≥ 4, got {resolution}")
        return cls(num_ws=2 * log2 - 2, **overrides)

    @property
    def resolution(self) -> int:
        """Output resolution of the generator these codes drive."""
        return int(2 ** ((self.num_ws + 2) // 2))

    @property
    def feature_sizes(self) -> tuple[int, int, int]:
        """Spatial sides of the (coarse, middle, fine) feature maps for ``input_size`` inputs."""
        return self.input_size // 16, self.input_size // 8, self.input_size // 4

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (tuples become lists)."""
        fields = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> E4EConfig:
        """Build from :meth:`to_dict` output; unknown fields are an error."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown E4EConfig fields: {unknown}")
        return cls(**data)


class SqueezeExcite(nn.Module):
    """Channel attention: global average → bottleneck 1×1 convs → sigmoid gate on each channel."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale each channel of ``x`` [N, C, H, W] by its learned gate."""
        gate = F.adaptive_avg_pool2d(x, 1)  # [N, C, 1, 1]
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))  # [N, C, 1, 1]
        return x * gate


class BottleneckIRSE(nn.Module):
    """Improved residual unit with squeeze-excitation (``bottleneck_IR_SE``): BN-conv-PReLU-conv-BN-SE."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, se_reduction: int) -> None:
        super().__init__()
        # Identity shortcuts subsample with a 1×1 max pool (parameter-free); width changes use a 1×1 conv + BN.
        self.shortcut_layer: nn.Module
        if in_channels == out_channels:
            self.shortcut_layer = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            SqueezeExcite(out_channels, se_reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map [N, C_in, H, W] to [N, C_out, H / stride, W / stride]."""
        return self.res_layer(x) + self.shortcut_layer(x)


class EqualizedLinear(nn.Module):
    """Linear layer with StyleGAN's equalized learning rate: weights stored N(0, 1), scaled by 1/√fan_in at run time."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = 1.0 / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map [N, in_features] to [N, out_features]."""
        return F.linear(x, self.weight * self.scale, self.bias)


class GradualStyleBlock(nn.Module):
    """Reduce a square feature map to one w code: log2(side) strided 3×3 convs (to 1×1), then a linear layer."""

    def __init__(self, in_channels: int, channels: int, w_dim: int, spatial: int) -> None:
        super().__init__()
        num_downsamples = int(math.log2(spatial))
        assert 2**num_downsamples == spatial and num_downsamples >= 1, f"side must be a power of two ≥ 2: {spatial}"
        layers: list[nn.Module] = []
        for index in range(num_downsamples):
            conv_in = in_channels if index == 0 else channels
            layers.append(nn.Conv2d(conv_in, channels, kernel_size=3, stride=2, padding=1))
            layers.append(nn.LeakyReLU())
        self.convs = nn.Sequential(*layers)
        self.linear = EqualizedLinear(channels, w_dim)
        self.spatial = spatial

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map features [N, C, spatial, spatial] to a code [N, w_dim]."""
        side = self.spatial
        assert features.shape[-2:] == (side, side), f"expected {side}² features, got {tuple(features.shape)}"
        x = self.convs(features)  # [N, channels, 1, 1]
        return self.linear(x.flatten(1))  # [N, w_dim]


def _upsample_add(coarse: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """FPN merge: bilinearly upsample ``coarse`` to ``lateral``'s size (corners aligned) and add."""
    return F.interpolate(coarse, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


class Encoder4Editing(nn.Module):
    """e4e encoder: image [N, 3, S, S] in [-1, 1] → codes [N, num_ws, w_dim] (w0 + deltas, before latent_avg)."""

    def __init__(self, config: E4EConfig | None = None) -> None:
        super().__init__()
        config = config or E4EConfig()
        self.config = config
        widths = config.stage_widths
        stem_width = widths[0]
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.PReLU(stem_width),
        )
        units: list[nn.Module] = []
        self._stage_ends: list[int] = []  # index in ``body`` of each stage's last unit
        in_channels = stem_width
        for num_units, width in zip(config.stage_blocks, widths):
            for unit in range(num_units):
                stride = 2 if unit == 0 else 1
                units.append(BottleneckIRSE(in_channels, width, stride, config.se_reduction))
                in_channels = width
            self._stage_ends.append(len(units) - 1)
        self.body = nn.Sequential(*units)

        pyramid_channels = widths[3]
        self.styles = nn.ModuleList(
            GradualStyleBlock(pyramid_channels, config.style_channels, config.w_dim, self._feature_size_of_layer(i))
            for i in range(config.num_ws)
        )
        self.latlayer1 = nn.Conv2d(widths[2], pyramid_channels, kernel_size=1)  # middle lateral
        self.latlayer2 = nn.Conv2d(widths[1], pyramid_channels, kernel_size=1)  # fine lateral

    def _feature_size_of_layer(self, layer: int) -> int:
        """Side of the feature map that generator layer ``layer``'s style block reads."""
        coarse_size, middle_size, fine_size = self.config.feature_sizes
        if layer < self.config.coarse_end:
            return coarse_size
        if layer < self.config.middle_end:
            return middle_size
        return fine_size

    def backbone(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the (coarse, middle, fine) backbone maps: ends of stages 4, 3 and 2."""
        x = self.input_layer(images)  # [N, C0, S, S]
        taps: dict[int, torch.Tensor] = {}
        for index, unit in enumerate(self.body):
            x = unit(x)
            if index in self._stage_ends:
                taps[index] = x
        _, fine_end, middle_end, coarse_end = self._stage_ends
        # [N, C3, S/16, S/16], [N, C2, S/8, S/8], [N, C1, S/4, S/4]
        return taps[coarse_end], taps[middle_end], taps[fine_end]

    def encode_parts(self, images: torch.Tensor, num_deltas: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``w0`` [N, w_dim] and ``deltas`` [N, num_ws, w_dim] (``deltas[:, 0]`` is zero).

        ``num_deltas`` limits the deltas to layers 1..num_deltas (e4e's progressive training); None means all.
        """
        size = self.config.input_size
        expected = (3, size, size)
        assert images.ndim == 4 and images.shape[1:] == expected, f"expected [N, 3, {size}, {size}], got {images.shape}"
        num_ws = self.config.num_ws
        last_delta = num_ws - 1 if num_deltas is None else min(num_deltas, num_ws - 1)
        coarse, middle, fine = self.backbone(images)

        w0 = self.styles[0](coarse)  # [N, w_dim]
        deltas = [torch.zeros_like(w0)]
        features = coarse  # [N, C3, S/16, S/16]
        for layer in range(1, last_delta + 1):
            if layer == self.config.coarse_end:
                features = _upsample_add(features, self.latlayer1(middle))  # [N, C3, S/8, S/8]
            if layer == self.config.middle_end:
                features = _upsample_add(features, self.latlayer2(fine))  # [N, C3, S/4, S/4]
            deltas.append(self.styles[layer](features))  # [N, w_dim]
        deltas.extend(torch.zeros_like(w0) for _ in range(num_ws - len(deltas)))
        return w0, torch.stack(deltas, dim=1)  # [N, w_dim], [N, num_ws, w_dim]

    def forward(self, images: torch.Tensor, num_deltas: int | None = None) -> torch.Tensor:
        """Encode images [N, 3, S, S] in [-1, 1] to codes [N, num_ws, w_dim] = w0 + delta_i (add latent_avg after)."""
        w0, deltas = self.encode_parts(images, num_deltas)
        return w0.unsqueeze(1) + deltas  # [N, num_ws, w_dim]
