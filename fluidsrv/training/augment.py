"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to every image the discriminator sees.

Real and generated images get the same random transforms (each image its own draw), and gradients flow
through them back to the generator, so the discriminator cannot memorise a small dataset while the generator
still learns the un-augmented distribution. Three policies, all batched and shape-preserving on ``[N, C, H, W]``
images in [-1, 1]:

* ``color``: random brightness (±0.5), saturation (×[0, 2]) and contrast (×[0.5, 1.5]);
* ``translation``: an integer shift of up to 1/8 of the side in each axis, zero (mid-grey) filled;
* ``cutout``: one zeroed square of half the side at a random centre.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str | Sequence[str]) -> tuple[str, ...]:
    """Return the policy names of a comma-separated string (or sequence); ``""``/``"none"`` means no augmentation."""
    names = policy.split(",") if isinstance(policy, str) else list(policy)
    parsed = tuple(name.strip() for name in names if name.strip() and name.strip() != "none")
    unknown = [name for name in parsed if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policies {unknown}; choose from {POLICIES}")
    return parsed


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniform [0, 1) draw per image, shaped to broadcast over ``[N, C, H, W]``."""
    values = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device="cpu" if generator else x.device)
    return values.to(device=x.device, dtype=x.dtype)  # [N, 1, 1, 1]


def augment_color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness, saturation and contrast per image."""
    x = x + (_uniform(x, generator) - 0.5)  # brightness
    channel_mean = x.mean(dim=1, keepdim=True)  # [N, 1, H, W]
    x = (x - channel_mean) * (_uniform(x, generator) * 2.0) + channel_mean  # saturation
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # [N, 1, 1, 1]
    return (x - image_mean) * (_uniform(x, generator) + 0.5) + image_mean  # contrast


def _random_offsets(
    count: int, low: int, high: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Integer offsets uniform in ``[low, high]`` (inclusive), one per image, on ``device``."""
    offsets = torch.randint(low, high + 1, (count,), generator=generator, device="cpu" if generator else device)
    return offsets.to(device)  # [N]


def _shift_axis(x: torch.Tensor, shifts: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift each image along one spatial axis by its own integer amount, filling with zeros."""
    size = x.shape[dim]
    positions = torch.arange(size, device=x.device)[None, :] - shifts[:, None]  # [N, size] source index
    inside = (positions >= 0) & (positions < size)  # [N, size]
    positions = positions.clamp(0, size - 1)
    view = [x.shape[0], 1, 1, 1]
    view[dim] = size
    index = positions.view(view).expand_as(x)  # [N, C, H, W]
    return torch.gather(x, dim, index) * inside.view(view).to(x.dtype)


def augment_translation(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to 1/8 of its side in x and y, filling the uncovered border with zeros."""
    n, _, height, width = x.shape
    max_dy, max_dx = int(height * TRANSLATION_RATIO + 0.5), int(width * TRANSLATION_RATIO + 0.5)
    dy = _random_offsets(n, -max_dy, max_dy, generator, x.device)  # [N]
    dx = _random_offsets(n, -max_dx, max_dx, generator, x.device)  # [N]
    return _shift_axis(_shift_axis(x, dy, dim=2), dx, dim=3)  # [N, C, H, W]


def augment_cutout(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one square of half the image side per image, centred anywhere (it may be clipped by the border)."""
    n, _, height, width = x.shape
    cut_h, cut_w = int(height * CUTOUT_RATIO + 0.5), int(width * CUTOUT_RATIO + 0.5)
    top = _random_offsets(n, 0, height - 1, generator, x.device)[:, None] - cut_h // 2  # [N, 1]
    left = _random_offsets(n, 0, width - 1, generator, x.device)[:, None] - cut_w // 2  # [N, 1]
    rows = torch.arange(height, device=x.device)[None, :]  # [1, H]
    cols = torch.arange(width, device=x.device)[None, :]  # [1, W]
    in_rows = (rows >= top) & (rows < top + cut_h)  # [N, H]
    in_cols = (cols >= left) & (cols < left + cut_w)  # [N, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # [N, H, W]
    return x * keep[:, None].to(x.dtype)  # [N, C, H, W]


AUGMENTS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "color": augment_color,
    "translation": augment_translation,
    "cutout": augment_cutout,
}


def diff_augment(
    x: torch.Tensor, policy: str | Sequence[str] = POLICIES, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the DiffAugment policies in order to a batch ``[N, C, H, W]``; differentiable w.r.t. ``x``.

    ``generator`` (a CPU ``torch.Generator``) makes the draws reproducible; without it the global RNG of
    ``x``'s device is used.
    """
    assert x.ndim == 4, x.shape
    for name in parse_policy(policy):
        x = AUGMENTS[name](x, generator)
    return x
