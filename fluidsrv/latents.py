"""w / w+ algebra on latents: ``w`` is [N, w_dim], ``ws`` (w+) is [N, num_ws, w_dim]."""

from __future__ import annotations

import torch


def mix_styles(ws_a: torch.Tensor, ws_b: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """Style mixing: ``ws_a`` [N, num_ws, w_dim] with its layers in [start, stop) taken from ``ws_b``.

    ``ws_b`` may have batch 1 (broadcast to every sample of ``ws_a``); ``stop`` defaults to num_ws.
    Differentiable with respect to both inputs; neither is modified.
    """
    assert ws_a.ndim == 3 and ws_b.ndim == 3, f"ws must be [N, num_ws, w_dim], got {ws_a.shape} and {ws_b.shape}"
    assert ws_a.shape[1:] == ws_b.shape[1:], f"ws shapes differ: {tuple(ws_a.shape)} vs {tuple(ws_b.shape)}"
    assert ws_b.shape[0] in (1, ws_a.shape[0]), f"cannot broadcast batch {ws_b.shape[0]} to {ws_a.shape[0]}"
    num_ws = ws_a.shape[1]
    stop = num_ws if stop is None else stop
    assert 0 <= start <= stop <= num_ws, f"layer range [{start}, {stop}) is outside [0, {num_ws})"
    layers = torch.arange(num_ws, device=ws_a.device)  # [num_ws]
    from_b = ((layers >= start) & (layers < stop)).reshape(1, num_ws, 1)  # [1, num_ws, 1]
    return torch.where(from_b, ws_b, ws_a)  # [N, num_ws, w_dim]
