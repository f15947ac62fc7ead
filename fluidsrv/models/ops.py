"""Pure-PyTorch StyleGAN2 ops: FIR resampling (upfirdn2d) and fused bias + leaky ReLU.

Both run on any device and dtype PyTorch supports, are differentiable to any order (R1 and path-length
regularisation need double backward), and compile nothing: no CUDA extension is built at import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

LEAKY_RELU_SLOPE = 0.2
LEAKY_RELU_GAIN = math.sqrt(2.0)  # keeps the activation variance of a leaky ReLU near 1


def make_fir_kernel(taps: Sequence[float], gain: float = 1.0) -> torch.Tensor:
    """Return the separable 2-D FIR kernel ``outer(taps, taps)``, normalised to sum to ``gain``.

    The tensor is created on the current default device (so building a network under
    ``torch.device("meta")`` stays cheap).
    """
    assert len(taps) > 0, "a FIR kernel needs at least one tap"
    taps_1d = torch.tensor([float(t) for t in taps], dtype=torch.float32)  # [K]
    kernel = taps_1d[:, None] * taps_1d[None, :]  # [K, K]
    return kernel * (gain / kernel.sum())  # [K, K]


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int = 1,
    down: int = 1,
    pad: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with a 2-D FIR ``kernel``, then keep every ``down``-th pixel.

    ``x`` is [N, C, H, W]; ``kernel`` [kh, kw] is applied to every channel (a true convolution, so the
    kernel is flipped as in the reference implementation). ``pad`` = (before, after) is used on both
    spatial axes; negative values crop. The output is
    ``[N, C, (H*up + before + after - kh) // down + 1, (W*up + before + after - kw) // down + 1]``.
    """
    assert x.ndim == 4, f"upfirdn2d expects [N, C, H, W], got {tuple(x.shape)}"
    assert kernel.ndim == 2, f"upfirdn2d expects a 2-D kernel, got {tuple(kernel.shape)}"
    assert up >= 1 and down >= 1, f"up and down must be >= 1, got up={up}, down={down}"
    batch, channels, height, width = x.shape
    kernel_h, kernel_w = kernel.shape

    if up > 1:  # zero insertion: every input pixel followed by (up - 1) zeros on each axis
        x = x.reshape(batch, channels, height, 1, width, 1)  # [N, C, H, 1, W, 1]
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])  # [N, C, H, up, W, up]
        x = x.reshape(batch, channels, height * up, width * up)  # [N, C, H*up, W*up]

    before, after = pad
    conv_padding = 0
    if before == after > 0:  # symmetric: let the convolution pad, saving a padded copy
        conv_padding = before
    elif before > 0 or after > 0:
        grow = [max(before, 0), max(after, 0)]
        x = F.pad(x, grow + grow)  # [N, C, H', W']
    if before < 0 or after < 0:
        x = x[:, :, max(-before, 0) : x.shape[2] - max(-after, 0), max(-before, 0) : x.shape[3] - max(-after, 0)]

    weight = kernel.flip([0, 1]).to(dtype=x.dtype)[None, None]  # [1, 1, kh, kw]
    weight = weight.expand(channels, 1, kernel_h, kernel_w)  # [C, 1, kh, kw] depthwise
    return F.conv2d(x, weight, stride=down, padding=conv_padding, groups=channels)  # [N, C, H_out, W_out]


def fused_bias_leaky_relu(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    negative_slope: float = LEAKY_RELU_SLOPE,
    gain: float = LEAKY_RELU_GAIN,
    inplace: bool = False,
) -> torch.Tensor:
    """Return ``leaky_relu(x + bias) * gain`` with ``bias`` [C] added along dim 1 of ``x`` [N, C, ...].

    At most one temporary: the gain is applied before the activation (valid since gain > 0) and the steps
    after the first run in place, which autograd allows. ``inplace=True`` also reuses ``x`` (for callers
    that own it, e.g. a fresh convolution output that no backward pass needs).
    """
    assert gain > 0, "the gain must be positive to commute with the leaky ReLU"
    out = x if inplace else None
    if bias is not None:
        assert bias.ndim == 1 and bias.shape[0] == x.shape[1], (
            f"bias {tuple(bias.shape)} does not match the channels of {tuple(x.shape)}"
        )
        bias_view = bias.reshape((1, bias.shape[0]) + (1,) * (x.ndim - 2))  # [1, C, 1, ...]
        out = x.add_(bias_view) if inplace else x + bias_view  # [N, C, ...]
    out = x.mul(gain) if out is None else out.mul_(gain)  # [N, C, ...]
    return F.leaky_relu_(out, negative_slope)  # [N, C, ...]
