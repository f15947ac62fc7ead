"""The preview student's modulator: ResNet blocks with adaptive layer-instance normalisation (AdaLIN) on the code.

It moves an autoencoder code [N, C, 4, 4] the way a latent edit Δw moves the generator's image: the condition
is Δw (every layer, flattened) and the pivot's mean w, mapped by an MLP to each block's AdaLIN scales and shifts.
AdaLIN (Kim et al., U-GAT-IT, 2020) mixes instance and layer normalisation with a learned per-channel ratio ρ:
``γ · (ρ · IN(x) + (1 − ρ) · LN(x)) + β``. Each block is ``x + conv(relu(AdaLIN(conv(x))))`` followed by a
second AdaLIN, and the last convolution of every block starts at zero, so an untrained modulator is the
identity. The condition head can carry a per-session low-rank adapter (``head_down`` / ``head_up``, zero-started)
that the distill step tunes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModulatorConfig:
    """Shape of a :class:`Modulator`: code width, the generator's ws shape and the blocks."""

    code_channels: int = 512
    num_ws: int = 12
    w_dim: int = 256
    hidden: int = 128  # width inside each block
    blocks: int = 3
    condition: int = 256  # width of the condition MLP
    adapter_rank: int = 8  # rank of the per-session adapter on the condition head (0: none)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModulatorConfig:
        """Build from :meth:`to_dict` output; unknown fields are an error."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModulatorConfig fields: {unknown}")
        return cls(**{key: int(value) for key, value in data.items()})


class AdaLIN(nn.Module):
    """Adaptive layer-instance normalisation: ``γ · (ρ · IN(x) + (1 − ρ) · LN(x)) + β`` with a learned ρ ∈ [0, 1]."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), 0.9))

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [N, C, H, W] and apply the per-image ``gamma``, ``beta`` [N, C]."""
        instance = (x - x.mean(dim=(2, 3), keepdim=True)) * torch.rsqrt(x.var(dim=(2, 3), keepdim=True) + self.eps)
        layer = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * torch.rsqrt(
            x.var(dim=(1, 2, 3), keepdim=True) + self.eps)
        rho = self.rho.clamp(0.0, 1.0)
        mixed = rho * instance + (1.0 - rho) * layer
        return mixed * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]


class AdaLINBlock(nn.Module):
    """A residual block on the code: conv → AdaLIN → ReLU → conv (zero-started) → AdaLIN, plus the input."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm1 = AdaLIN(hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.norm2 = AdaLIN(channels)
        nn.init.zeros_(self.conv2.weight)
        assert self.conv2.bias is not None
        nn.init.zeros_(self.conv2.bias)
        self.hidden = hidden
        self.channels = channels

    @property
    def condition_size(self) -> int:
        """How many condition numbers the block reads: γ and β of both norms."""
        return 2 * (self.hidden + self.channels)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x [N, C, 4, 4] and this block's condition [N, condition_size] -> [N, C, 4, 4]."""
        g1, b1, g2, b2 = torch.split(condition, [self.hidden, self.hidden, self.channels, self.channels], dim=1)
        y = F.relu(self.norm1(self.conv1(x), g1, b1))
        return x + self.norm2(self.conv2(y), g2, b2)  # zero conv2 and zero condition: exactly x


class Modulator(nn.Module):
    """Moves codes [N, C, 4, 4] by an edit: ``forward(code, delta, w) -> code'`` (delta [N, num_ws, w_dim])."""

    delta_scale: torch.Tensor

    def __init__(self, config: ModulatorConfig) -> None:
        super().__init__()
        self.config = config
        inputs = config.num_ws * config.w_dim + config.w_dim
        self.blocks = nn.ModuleList(AdaLINBlock(config.code_channels, config.hidden) for _ in range(config.blocks))
        self.splits: list[int] = [2 * (config.hidden + config.code_channels)] * config.blocks  # each block's γ, β
        self.mlp = nn.Sequential(
            nn.Linear(inputs, config.condition), nn.LeakyReLU(0.2),
            nn.Linear(config.condition, config.condition), nn.LeakyReLU(0.2))
        self.head = nn.Linear(config.condition, sum(self.splits))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        rank = config.adapter_rank
        self.head_down = nn.Parameter(torch.zeros(rank, config.condition))  # per-session adapter (distill)
        self.head_up = nn.Parameter(torch.zeros(sum(self.splits), rank))
        self.register_buffer("delta_scale", torch.ones(()))  # set by training: Δw · scale has inputs of order 1

    def conditions(self, delta: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        """The per-block condition vectors [N, condition_size] of an edit."""
        batch = delta.shape[0]
        scale = self.delta_scale
        features = self.mlp(torch.cat([delta.reshape(batch, -1) * scale, w * scale], dim=1))
        head = self.head(features)
        if self.config.adapter_rank > 0:
            head = head + features @ self.head_down.t() @ self.head_up.t()
        return list(torch.split(head, self.splits, dim=1))

    def forward(self, code: torch.Tensor, delta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Return the code moved by ``delta`` [N, num_ws, w_dim] from a face whose mean w is ``w`` [N, w_dim]."""
        assert delta.shape[1:] == (self.config.num_ws, self.config.w_dim), f"delta shape {tuple(delta.shape)}"
        x = code
        for block, condition in zip(self.blocks, self.conditions(delta, w)):
            x = block(x, condition)
        return x
