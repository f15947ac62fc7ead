"""StyleGAN2 generator (mapping + synthesis) and discriminator, parameter-compatible with rosinality.

Parameter and buffer names equal those of rosinality/stylegan2-pytorch, so its ``g_ema`` / ``d`` state
dicts (and the ``decoder.*`` half of an e4e checkpoint) load with ``strict=True``. The API follows the
NVlabs split: ``G.mapping(z) -> ws`` [N, num_ws, w_dim] and ``G.synthesis(ws) -> img`` [N, 3, H, W] in
[-1, 1]. Style mixing is not a generator flag: build ``ws`` from two sources with
:func:`fluidsrv.latents.mix_styles`.

The modulated convolution never needs a grouped convolution: at batch 1 it modulates the weights (one
plain conv), for a batch it scales the activations instead and demodulates the output with coefficients
from ``s² @ Σ_k w²`` (one ordinary batched conv with shared weights); 1×1 ToRGB convs are one batched
matmul. All are mathematically equal to the per-sample weight formulation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from fluidsrv.models.ops import fused_bias_leaky_relu, make_fir_kernel, upfirdn2d

NoiseMode = Literal["const", "random", "none"]
DEMODULATION_EPS = 1e-8
PIXEL_NORM_EPS = 1e-8
STDDEV_EPS = 1e-8


def _log2_resolution(resolution: int) -> int:
    log2 = int(math.log2(resolution)) if resolution > 0 else 0
    assert resolution >= 4 and 2**log2 == resolution, f"resolution must be a power of two >= 4, got {resolution}"
    return log2


def config_f_channels(resolution: int, channel_multiplier: int = 2) -> dict[int, int]:
    """Return the StyleGAN2 config-f feature widths {4: 512, ..., resolution: ...} for a channel multiplier."""
    widths = {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * channel_multiplier,
        128: 128 * channel_multiplier,
        256: 64 * channel_multiplier,
        512: 32 * channel_multiplier,
        1024: 16 * channel_multiplier,
    }
    log2 = _log2_resolution(resolution)
    assert resolution <= 1024, f"config-f widths are defined up to 1024, got {resolution}; pass channels"
    return {2**i: widths[2**i] for i in range(2, log2 + 1)}


def _normalised_channels(
    channels: Mapping[int, int] | Mapping[str, int], resolution: int, channel_multiplier: int
) -> MappingProxyType[int, int]:
    """Widths for exactly 4, 8, ..., resolution (keys may be JSON strings); config-f widths when empty."""
    if not channels:
        return MappingProxyType(config_f_channels(resolution, channel_multiplier))
    as_ints = {int(res): int(width) for res, width in channels.items()}
    needed = [2**i for i in range(2, _log2_resolution(resolution) + 1)]
    missing = [res for res in needed if res not in as_ints]
    assert not missing, f"channels lacks widths for resolutions {missing}"
    assert all(as_ints[res] > 0 for res in needed), f"channel widths must be positive: {as_ints}"
    return MappingProxyType({res: as_ints[res] for res in needed})


def _channels_to_json(channels: Mapping[int, int]) -> dict[str, int]:
    return {str(res): width for res, width in channels.items()}


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a StyleGAN2 generator; JSON round-trip via :meth:`to_dict` / :meth:`from_dict`."""

    resolution: int = 1024  # output image side, a power of two >= 4
    w_dim: int = 512  # width of z, w and every style vector (rosinality's style_dim)
    n_mapping: int = 8  # fully connected layers in the mapping network (rosinality's n_mlp)
    channel_multiplier: int = 2  # scales the config-f widths from 64² up; used only when channels is empty
    # feature width per resolution {4: ..., resolution: ...}; empty -> config-f widths. Normalised to a
    # read-only mapping of exactly the resolutions used, int keys (JSON string keys are accepted)
    channels: Mapping[int, int] = field(default_factory=dict)
    lr_mlp: float = 0.01  # learning-rate multiplier of the mapping network (equalised learning rate)
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)  # FIR taps used by every up/down-sampling

    def __post_init__(self) -> None:
        _log2_resolution(self.resolution)
        assert self.w_dim > 0 and self.n_mapping >= 1, f"bad w_dim/n_mapping: {self.w_dim}/{self.n_mapping}"
        channels = _normalised_channels(self.channels, self.resolution, self.channel_multiplier)
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "blur_kernel", tuple(int(t) for t in self.blur_kernel))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def num_ws(self) -> int:
        """Number of style vectors the synthesis network takes (2·log2(resolution) − 2; 18 at 1024)."""
        return 2 * _log2_resolution(self.resolution) - 2

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (channel keys become strings) that :meth:`from_dict` turns back into this."""
        return {
            "resolution": self.resolution,
            "w_dim": self.w_dim,
            "n_mapping": self.n_mapping,
            "channel_multiplier": self.channel_multiplier,
            "channels": _channels_to_json(self.channels),
            "lr_mlp": self.lr_mlp,
            "blur_kernel": list(self.blur_kernel),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GeneratorConfig:
        """Build a config from :meth:`to_dict` output (or parsed JSON of it); unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        assert not unknown, f"unknown GeneratorConfig keys: {sorted(unknown)}"
        return cls(**data)


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Architecture of a StyleGAN2 residual discriminator; JSON round-trip via to_dict / from_dict."""

    resolution: int = 1024  # input image side, a power of two >= 8
    channel_multiplier: int = 2  # scales the config-f widths from 64² up; used only when channels is empty
    # feature width per resolution {4: ..., resolution: ...}; empty -> config-f widths
    channels: Mapping[int, int] = field(default_factory=dict)
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)  # FIR taps of the downsampling blurs
    stddev_group: int = 4  # minibatch-stddev group size (capped at the batch size)
    stddev_features: int = 1  # channel groups the minibatch stddev is computed over (features appended)

    def __post_init__(self) -> None:
        assert _log2_resolution(self.resolution) >= 3, f"the discriminator needs resolution >= 8, got {self.resolution}"
        assert self.stddev_group >= 1 and self.stddev_features >= 1, "stddev group/features must be >= 1"
        channels = _normalised_channels(self.channels, self.resolution, self.channel_multiplier)
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "blur_kernel", tuple(int(t) for t in self.blur_kernel))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that :meth:`from_dict` turns back into this config."""
        return {
            "resolution": self.resolution,
            "channel_multiplier": self.channel_multiplier,
            "channels": _channels_to_json(self.channels),
            "blur_kernel": list(self.blur_kernel),
            "stddev_group": self.stddev_group,
            "stddev_features": self.stddev_features,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiscriminatorConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        assert not unknown, f"unknown DiscriminatorConfig keys: {sorted(unknown)}"
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# Layers (attribute names are the checkpoint format: do not rename)
# ---------------------------------------------------------------------------------------------------------------


class PixelNorm(nn.Module):
    """Normalise each vector to unit root-mean-square over dim 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` [N, C] divided by its RMS."""
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + PIXEL_NORM_EPS)  # [N, C]


class FusedLeakyReLU(nn.Module):
    """Learned per-channel bias followed by a leaky ReLU with gain √2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))  # [C]

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Return ``leaky_relu(x + bias) * √2`` for ``x`` [N, C, ...] (computed in ``x`` when ``inplace``)."""
        return fused_bias_leaky_relu(x, self.bias, inplace=inplace)


class Blur(nn.Module):
    """FIR low-pass filter (optionally followed by decimation) applied to every channel."""

    kernel: torch.Tensor

    def __init__(self, taps: tuple[int, ...], pad: tuple[int, int], gain: float = 1.0, down: int = 1) -> None:
        super().__init__()
        self.register_buffer("kernel", make_fir_kernel(taps, gain))  # [K, K]
        self.pad = pad  # (before, after) padding on both spatial axes
        self.down = down  # keep every down-th output pixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Filter ``x`` [N, C, H, W]."""
        return upfirdn2d(x, self.kernel, down=self.down, pad=self.pad)


class Upsample(nn.Module):
    """2× upsampling by zero insertion and FIR filtering (used on the RGB skip path)."""

    kernel: torch.Tensor

    def __init__(self, taps: tuple[int, ...], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor  # upsampling factor on each axis
        self.register_buffer("kernel", make_fir_kernel(taps, gain=float(factor**2)))  # [K, K]
        excess = len(taps) - factor
        self.pad = ((excess + 1) // 2 + factor - 1, excess // 2)  # output is exactly factor × input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` [N, C, H, W] to [N, C, factor·H, factor·W]."""
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualLinear(nn.Module):
    """Fully connected layer with equalised learning rate (weights scaled at run time)."""

    def __init__(
        self,
        in_features: int,  # input width
        out_features: int,  # output width
        bias_init: float = 0.0,  # initial value of every bias entry
        lr_mul: float = 1.0,  # learning-rate multiplier (weights stored divided by it)
        activate: bool = False,  # apply the fused bias + leaky ReLU instead of a plain bias
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features).div_(lr_mul))  # [out, in]
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))  # [out]
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` [N, in] to [N, out]."""
        bias = self.bias * self.lr_mul  # [out]
        if self.activate:
            return fused_bias_leaky_relu(F.linear(x, self.weight * self.weight_gain), bias)  # [N, out]
        return F.linear(x, self.weight * self.weight_gain, bias)  # [N, out]


class EqualConv2d(nn.Module):
    """2-D convolution with equalised learning rate."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        kernel_size: int,  # square kernel side
        stride: int = 1,  # convolution stride
        padding: int = 0,  # zero padding on every side
        bias: bool = True,  # learn an additive per-channel bias
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))  # [O, I, k, k]
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None  # [O]
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` [N, I, H, W]."""
        weight = self.weight * self.weight_gain  # [O, I, k, k]
        return F.conv2d(x, weight, self.bias, stride=self.stride, padding=self.padding)  # [N, O, H', W']


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution (optionally demodulated, optionally a 2× transposed upsampling conv)."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        kernel_size: int,  # square kernel side
        w_dim: int,  # width of the style vector w that drives the modulation
        demodulate: bool = True,  # normalise each output channel to unit expected variance
        upsample: bool = False,  # 2× upsampling: transposed stride-2 conv followed by a FIR blur
        blur_kernel: tuple[int, ...] = (1, 3, 3, 1),  # FIR taps of the upsampling blur
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))  # [1,O,I,k,k]
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        # submodules in rosinality's order (blur, modulation) so state-dict key order matches too
        self.blur: Blur | None = None  # the FIR filter after the transposed conv (upsampling only)
        if upsample:
            excess = (len(blur_kernel) - 2) - (kernel_size - 1)
            pad = ((excess + 1) // 2 + 1, excess // 2 + 1)  # the blurred output is exactly 2× the input
            self.blur = Blur(blur_kernel, pad=pad, gain=4.0)  # gain = factor² keeps the mean after upsampling
        self.modulation = EqualLinear(w_dim, in_channels, bias_init=1.0)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` [N, I, H, W] modulated by ``w`` [N, w_dim]; returns [N, O, H, W] (2H, 2W if upsample).

        Two exact formulations, picked by cost: per-sample modulated weights when they are cheap (batch 1,
        or a 1×1 kernel, done as one batched matmul), otherwise shared weights with the styles applied to
        the activations and the demodulation to the output, so a batch is one ordinary convolution.
        """
        batch = x.shape[0]
        assert x.ndim == 4 and x.shape[1] == self.in_channels, f"expected [N, {self.in_channels}, H, W], got {x.shape}"
        assert w.shape[0] == batch, f"{w.shape[0]} styles for a batch of {batch}"
        styles = self.modulation(w).to(x.dtype)  # [N, I]
        weight = self.weight[0] * self.weight_gain  # [O, I, k, k]

        if batch == 1 or (self.kernel_size == 1 and not self.upsample):
            weights = weight * styles[:, None, :, None, None]  # [N, O, I, k, k]
            if self.demodulate:
                weights = weights * torch.rsqrt(weights.square().sum(dim=(2, 3, 4), keepdim=True) + DEMODULATION_EPS)
            if batch == 1:
                return self._convolve(x, weights[0])  # [1, O, H', W']
            return _batched_pointwise_conv(x, weights.flatten(2))  # [N, O, H, W]

        x = self._convolve(x * styles[:, :, None, None], weight)  # [N, O, H', W']
        if self.demodulate:
            # ||w_o ⊙ s||² = Σ_i s_i² Σ_k w_oik²: one [N, I] @ [I, O] product instead of per-sample weights
            weight_energy = weight.square().sum(dim=(2, 3))  # [O, I]
            demod = torch.rsqrt(styles.square() @ weight_energy.t() + DEMODULATION_EPS)  # [N, O]
            x = x.mul_(demod[:, :, None, None])  # [N, O, H', W'] (the conv output is fresh: scale it in place)
        return x

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Plain convolution of ``x`` [N, I, H, W] with ``weight`` [O, I, k, k] (transposed + blur when upsampling)."""
        if self.blur is None:
            return F.conv2d(x, weight, padding=self.padding)  # [N, O, H, W]
        x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)  # [N, O, 2H+1, 2W+1]
        return self.blur(x)  # [N, O, 2H, 2W]


def _batched_pointwise_conv(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """1×1 convolution of each sample of ``x`` [N, I, H, W] with its own ``weights`` [N, O, I], as one matmul.

    Works in whichever memory layout ``x`` has, so channels-last input gives channels-last output.
    """
    batch, in_channels, height, width = x.shape
    out_channels = weights.shape[1]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, in_channels)  # [N, H*W, I] (a view)
        out = torch.matmul(pixels, weights.transpose(1, 2))  # [N, H*W, O]
        return out.reshape(batch, height, width, out_channels).permute(0, 3, 1, 2)  # [N, O, H, W] channels-last
    out = torch.matmul(weights, x.reshape(batch, in_channels, height * width))  # [N, O, H*W]
    return out.reshape(batch, out_channels, height, width)  # [N, O, H, W]


class NoiseInjection(nn.Module):
    """Adds per-pixel noise scaled by a learned scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # [1]

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
        """Return ``x`` [N, C, H, W] + weight · ``noise`` [N or 1, 1, H, W] (added into ``x`` when ``inplace``)."""
        if noise is None:
            return x
        scaled = self.weight.to(x.dtype) * noise.to(x.dtype)  # [N or 1, 1, H, W]
        return x.add_(scaled) if inplace else x + scaled  # [N, C, H, W]


class ConstantInput(nn.Module):
    """The learned constant the synthesis network starts from."""

    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))  # [1, C, 4, 4]

    def forward(self, batch: int, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """Return the constant repeated ``batch`` times: [batch, C, 4, 4], in ``memory_format``."""
        return self.input.expand(batch, -1, -1, -1).contiguous(memory_format=memory_format)  # [N, C, 4, 4]


class StyledConv(nn.Module):
    """Modulated conv → noise → bias + leaky ReLU: one synthesis layer."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        kernel_size: int,  # square kernel side
        w_dim: int,  # style vector width
        upsample: bool = False,  # double the resolution
        blur_kernel: tuple[int, ...] = (1, 3, 3, 1),  # FIR taps of the upsampling blur
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channels, out_channels, kernel_size, w_dim, upsample=upsample, blur_kernel=blur_kernel
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Map ``x`` [N, I, H, W] with style ``w`` [N, w_dim] to [N, O, H', W']."""
        out = self.conv(x, w)  # [N, O, H', W'], a fresh tensor no backward needs: finish it in place
        return self.activate(self.noise(out, noise, inplace=True), inplace=True)  # [N, O, H', W']


class ToRGB(nn.Module):
    """1×1 modulated conv to RGB, added to the upsampled RGB of the previous resolution."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        w_dim: int,  # style vector width
        upsample: bool = True,  # upsample and add the previous resolution's RGB (False for the first ToRGB)
        blur_kernel: tuple[int, ...] = (1, 3, 3, 1),  # FIR taps of the skip upsampling
    ) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))  # [1, 3, 1, 1]
        self.upsample = Upsample(blur_kernel) if upsample else None
        self.conv = ModulatedConv2d(in_channels, 3, 1, w_dim, demodulate=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Return RGB [N, 3, H, W] of ``x`` [N, C, H, W] plus the upsampled ``skip`` [N, 3, H/2, W/2]."""
        rgb = self.conv(x, w).add_(self.bias)  # [N, 3, H, W] (the conv output is fresh: add in place)
        if skip is not None:
            assert self.upsample is not None, "the first ToRGB takes no skip input"
            rgb = rgb.add_(self.upsample(skip))  # [N, 3, H, W]
        return rgb


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """StyleGAN2 generator: ``mapping(z) -> ws`` and ``synthesis(ws) -> img``, with rosinality's names.

    ``w_avg`` (the truncation centre) is a non-persistent buffer of zeros until a loader fills it from a
    checkpoint's ``latent_avg`` or :meth:`estimate_w_avg` computes it.
    """

    w_avg: torch.Tensor

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config  # the architecture; stored with exported weights
        w_dim, channels, blur = config.w_dim, config.channels, config.blur_kernel
        log2 = _log2_resolution(config.resolution)

        # mapping network: style.0 is the (parameter-free) PixelNorm, style.1..n the FC layers
        self.style = nn.Sequential(
            PixelNorm(),
            *(EqualLinear(w_dim, w_dim, lr_mul=config.lr_mlp, activate=True) for _ in range(config.n_mapping)),
        )
        # running mean of w, used for truncation; not in rosinality checkpoints, so not persistent
        self.register_buffer("w_avg", torch.zeros(w_dim), persistent=False)  # [w_dim]

        # synthesis network: 4×4 constant → conv1 → to_rgb1, then two convs + one ToRGB per resolution
        self.input = ConstantInput(channels[4])
        self.conv1 = StyledConv(channels[4], channels[4], 3, w_dim, blur_kernel=blur)
        self.to_rgb1 = ToRGB(channels[4], w_dim, upsample=False, blur_kernel=blur)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channels = channels[4]
        for res_log2 in range(3, log2 + 1):
            out_channels = channels[2**res_log2]
            self.convs.append(StyledConv(in_channels, out_channels, 3, w_dim, upsample=True, blur_kernel=blur))
            self.convs.append(StyledConv(out_channels, out_channels, 3, w_dim, blur_kernel=blur))
            self.to_rgbs.append(ToRGB(out_channels, w_dim, blur_kernel=blur))
            in_channels = out_channels

        # run synthesis channels-last on CPU: oneDNN's depthwise blurs get ~3× and the whole net 10-20% faster
        # (the layout propagates through every conv); CUDA keeps the default layout unless inference asks for
        # channels-last (fluidsrv.precision.prepare_for_inference, with bf16/fp16 autocast)
        self.channels_last_on_cpu = True
        self.channels_last_on_cuda = False

        # fixed per-layer noise images for noise_mode="const" (layer 0 at 4², then two per resolution)
        self.num_noise_layers = 2 * (log2 - 2) + 1
        self.noises = nn.Module()
        for layer in range(self.num_noise_layers):
            side = 2 ** ((layer + 5) // 2)
            self.noises.register_buffer(f"noise_{layer}", torch.randn(1, 1, side, side))  # [1, 1, side, side]

    @property
    def resolution(self) -> int:
        """Output image side in pixels."""
        return self.config.resolution

    @property
    def w_dim(self) -> int:
        """Width of z, w and each style vector."""
        return self.config.w_dim

    @property
    def num_ws(self) -> int:
        """Number of style vectors in ``ws`` (18 at 1024)."""
        return self.config.num_ws

    def mapping(
        self, z: torch.Tensor, truncation_psi: float = 1.0, w_avg: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Map ``z`` [N, w_dim] to ``ws`` [N, num_ws, w_dim], truncated toward ``w_avg`` (default ``self.w_avg``).

        ``w_avg`` may be [w_dim], [1, w_dim] or per layer [num_ws, w_dim]; ``truncation_psi`` = 1 is no
        truncation, 0 returns ``w_avg`` itself.
        """
        assert z.ndim == 2 and z.shape[1] == self.w_dim, f"z must be [N, {self.w_dim}], got {tuple(z.shape)}"
        w = self.style(z)  # [N, w_dim]
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)  # [N, num_ws, w_dim]
        if truncation_psi != 1.0:
            center = self.w_avg if w_avg is None else w_avg.to(ws)
            assert center.shape[-1] == self.w_dim, f"w_avg must end in w_dim={self.w_dim}, got {tuple(center.shape)}"
            ws = center + truncation_psi * (ws - center)  # [N, num_ws, w_dim]
        return ws

    def synthesis(self, ws: torch.Tensor, noise_mode: NoiseMode = "const") -> torch.Tensor:
        """Render ``ws`` [N, num_ws, w_dim] to images [N, 3, resolution, resolution] in about [-1, 1].

        ``noise_mode``: "const" uses the stored noise buffers (deterministic), "random" draws fresh noise
        per sample, "none" adds no noise.
        """
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), (
            f"ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}"
        )
        noises = self._noise_images(ws.shape[0], noise_mode, ws.device)

        use_channels_last = (self.channels_last_on_cpu and ws.device.type == "cpu") or (
            self.channels_last_on_cuda and ws.device.type == "cuda"
        )
        layout = torch.channels_last if use_channels_last else torch.contiguous_format
        x = self.input(ws.shape[0], layout)  # [N, C4, 4, 4]
        x = self.conv1(x, ws[:, 0], next(noises))  # [N, C4, 4, 4]
        rgb = self.to_rgb1(x, ws[:, 1])  # [N, 3, 4, 4]
        for block, to_rgb in enumerate(self.to_rgbs):
            layer = 1 + 2 * block  # style index of this resolution's first conv
            x = self.convs[2 * block](x, ws[:, layer], next(noises))  # [N, C, 2H, 2W]
            x = self.convs[2 * block + 1](x, ws[:, layer + 1], next(noises))  # [N, C, 2H, 2W]
            rgb = to_rgb(x, ws[:, layer + 2], rgb)  # [N, 3, 2H, 2W]
        return rgb.contiguous()  # [N, 3, H, W]

    def _noise_images(self, batch: int, noise_mode: NoiseMode, device: torch.device) -> Iterator[torch.Tensor | None]:
        """Yield the noise image of each synthesis layer for ``noise_mode``."""
        assert noise_mode in ("const", "random", "none"), f"unknown noise_mode {noise_mode!r}"
        for layer in range(self.num_noise_layers):
            if noise_mode == "none":
                yield None
                continue
            stored = self.noises.get_buffer(f"noise_{layer}")  # [1, 1, side, side]
            if noise_mode == "const":
                yield stored
            else:
                yield torch.randn((batch, *stored.shape[1:]), device=device, dtype=stored.dtype)  # [N, 1, side, side]

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: NoiseMode = "const"
    ) -> torch.Tensor:
        """Convenience: ``synthesis(mapping(z, truncation_psi), noise_mode)`` -> [N, 3, H, W]."""
        return self.synthesis(self.mapping(z, truncation_psi), noise_mode)

    @torch.no_grad()
    def estimate_w_avg(
        self, num_samples: int = 10_000, batch_size: int = 1_000, seed: int | None = 0
    ) -> torch.Tensor:
        """Set ``self.w_avg`` to the mean of ``num_samples`` mapped random z's and return it [w_dim]."""
        assert num_samples > 0 and batch_size > 0, "num_samples and batch_size must be positive"
        device = self.w_avg.device
        rng = torch.Generator(device=device)
        if seed is None:
            rng.seed()
        else:
            rng.manual_seed(seed)
        total = torch.zeros(self.w_dim, dtype=torch.float64, device=device)  # [w_dim]
        for start in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - start)
            z = torch.randn(count, self.w_dim, generator=rng, device=device, dtype=self.w_avg.dtype)  # [B, w_dim]
            total += self.style(z).sum(dim=0, dtype=torch.float64)  # [w_dim]
        self.w_avg.copy_(total / num_samples)
        return self.w_avg.clone()


# ---------------------------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------------------------


class ConvLayer(nn.Sequential):
    """[blur →] equalised conv [→ bias + leaky ReLU]; a Sequential because its indices are checkpoint keys."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        kernel_size: int,  # square kernel side
        downsample: bool = False,  # halve the resolution (FIR blur, then stride 2)
        blur_kernel: tuple[int, ...] = (1, 3, 3, 1),  # FIR taps of the downsampling blur
        bias: bool = True,  # learn a per-channel bias
        activate: bool = True,  # end with the fused bias + leaky ReLU (which then holds the bias)
    ) -> None:
        assert bias or not activate, "an activated ConvLayer always has a bias (held by the activation)"
        layers: list[nn.Module] = []
        stride, padding = 1, kernel_size // 2
        if downsample:
            excess = (len(blur_kernel) - 2) + (kernel_size - 1)
            pad = ((excess + 1) // 2, excess // 2)
            if kernel_size == 1:  # a 1×1 stride-2 conv only reads every other pixel: decimate in the blur
                layers.append(Blur(blur_kernel, pad=pad, down=2))
            else:
                layers.append(Blur(blur_kernel, pad=pad))
                stride = 2
            padding = 0
        layers.append(
            EqualConv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias and not activate
            )
        )
        if activate:
            layers.append(FusedLeakyReLU(out_channels))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers to ``x`` [N, I, H, W]; the activation works in place on the fresh conv output."""
        for layer in self:
            x = layer(x, inplace=True) if isinstance(layer, FusedLeakyReLU) else layer(x)
        return x  # [N, O, H', W']


class ResBlock(nn.Module):
    """Residual discriminator block: two 3×3 convs (the second downsampling) plus a 1×1 downsampled skip."""

    def __init__(self, in_channels: int, out_channels: int, blur_kernel: tuple[int, ...] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(
            in_channels, out_channels, 1, downsample=True, blur_kernel=blur_kernel, bias=False, activate=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` [N, I, H, W] to [N, O, H/2, W/2]."""
        return (self.conv2(self.conv1(x)) + self.skip(x)).mul_(1.0 / math.sqrt(2.0))  # [N, O, H/2, W/2]


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator with minibatch stddev, rosinality's names (``d`` of its checkpoints)."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config  # the architecture
        channels, blur = config.channels, config.blur_kernel
        log2 = _log2_resolution(config.resolution)
        blocks: list[nn.Module] = [ConvLayer(3, channels[config.resolution], 1)]  # fromRGB
        for res_log2 in range(log2, 2, -1):
            blocks.append(ResBlock(channels[2**res_log2], channels[2 ** (res_log2 - 1)], blur))
        self.convs = nn.Sequential(*blocks)
        self.final_conv = ConvLayer(channels[4] + config.stddev_features, channels[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(channels[4] * 4 * 4, channels[4], activate=True),
            EqualLinear(channels[4], 1),
        )

    def minibatch_stddev(self, x: torch.Tensor) -> torch.Tensor:
        """Append the per-group feature stddev as extra channels: [N, C, H, W] -> [N, C + features, H, W].

        Sample n belongs to group n mod (N / group), as in rosinality and NVlabs.
        """
        batch, channels, height, width = x.shape
        group = min(batch, self.config.stddev_group)
        features = self.config.stddev_features
        assert batch % group == 0, f"batch {batch} must be a multiple of the stddev group {group}"
        assert channels % features == 0, f"{channels} channels do not split into {features} stddev features"
        y = x.reshape(group, batch // group, features, channels // features, height, width)  # [G, M, F, C/F, H, W]
        y = torch.sqrt(y.var(dim=0, unbiased=False) + STDDEV_EPS)  # [M, F, C/F, H, W]
        y = y.mean(dim=(2, 3, 4))  # [M, F]
        y = y.reshape(batch // group, features, 1, 1).repeat(group, 1, height, width)  # [N, F, H, W]
        return torch.cat([x, y.to(x.dtype)], dim=1)  # [N, C + F, H, W]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Score images [N, 3, R, R] in [-1, 1]; returns logits [N, 1] (real > fake)."""
        resolution = self.config.resolution
        assert img.ndim == 4 and img.shape[1:] == (3, resolution, resolution), (
            f"expected [N, 3, {resolution}, {resolution}], got {tuple(img.shape)}"
        )
        x = self.convs(img)  # [N, C4, 4, 4]
        x = self.minibatch_stddev(x)  # [N, C4 + F, 4, 4]
        x = self.final_conv(x)  # [N, C4, 4, 4]
        return self.final_linear(x.flatten(1))  # [N, 1]
