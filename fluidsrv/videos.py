"""Render latent paths to frames and write them as MP4 (H.264 through imageio-ffmpeg) or looping GIF (Pillow)."""

from __future__ import annotations

import tempfile
from collections.abc import Generator as StepGenerator
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fluidsrv.stages import Progress

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

VIDEO_SUFFIXES = (".mp4", ".gif")


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """Model images [N, 3, H, W] in [-1, 1] -> uint8 RGB frames [N, H, W, 3]."""
    assert images.ndim == 4 and images.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(images.shape)}"
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, 3, H, W]
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]


@torch.no_grad()
def render_frames(generator: Generator, ws: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Render latents ``ws`` [F, num_ws, w_dim] (constant noise) to uint8 RGB frames [F, H, W, 3]."""
    assert ws.ndim == 3 and ws.shape[1:] == (generator.num_ws, generator.w_dim), f"bad ws {tuple(ws.shape)}"
    device = next(generator.parameters()).device
    frames = [
        to_uint8_frames(generator.synthesis(ws[start : start + batch_size].to(device), noise_mode="const"))
        for start in range(0, ws.shape[0], batch_size)
    ]
    return np.concatenate(frames)  # [F, H, W, 3]


def _checked(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    stacked = np.asarray(frames)
    assert stacked.ndim == 4 and stacked.shape[-1] == 3 and stacked.dtype == np.uint8, (
        f"frames must be uint8 [F, H, W, 3], got {stacked.dtype} {stacked.shape}"
    )
    assert stacked.shape[0] >= 1, "no frames to write"
    return stacked


def write_mp4(path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: float = 24.0, quality: int = 8) -> Path:
    """Write frames [F, H, W, 3] as H.264 MP4 (yuv420p, playable everywhere); odd sizes are padded by one pixel."""
    import imageio.v2 as imageio

    stacked = _checked(frames)
    pad_h, pad_w = stacked.shape[1] % 2, stacked.shape[2] % 2
    if pad_h or pad_w:  # yuv420p needs even sides
        stacked = np.pad(stacked, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    writer: Any = imageio.get_writer(
        path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
        pixelformat="yuv420p", macro_block_size=1,
    )  # fmt: skip
    with writer:
        for frame in stacked:
            writer.append_data(frame)
    return path


def write_gif(
    path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: float = 24.0, loop: bool = True
) -> Path:
    """Write frames [F, H, W, 3] as an animated GIF (adaptive palette per frame; loops forever if ``loop``)."""
    from PIL import Image

    stacked = _checked(frames)
    images = [Image.fromarray(frame) for frame in stacked]
    duration = max(20, round(1000 / fps))  # ms per frame; browsers treat < 20 ms as slow
    path = Path(path)
    extra = {"loop": 0} if loop else {}
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration, disposal=2, **extra)
    return path


def write_video(path: str | Path, frames: np.ndarray | Sequence[np.ndarray], fps: float = 24.0) -> Path:
    """Write ``frames`` as MP4 or GIF, chosen by the file suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        return write_mp4(path, frames, fps)
    if suffix == ".gif":
        return write_gif(path, frames, fps)
    raise ValueError(f"unsupported video type {suffix!r}; use one of {', '.join(VIDEO_SUFFIXES)}")


VIDEO_BATCH = 8
"""Frames rendered per executor step of :func:`render_job`, so previews interleave with a video."""


def render_job(
    generator: Generator, path: torch.Tensor, device: torch.device
) -> StepGenerator[Progress, None, np.ndarray]:
    """Step job: render latents ``path`` [F, num_ws, w_dim] one batch per step; returns frames [F, H, W, 3]."""
    batches = []
    for start in range(0, path.shape[0], VIDEO_BATCH):
        batch = path[start : start + VIDEO_BATCH].to(device)  # [B, num_ws, w_dim]
        batches.append(render_frames(generator, batch))  # [B, H, W, 3]
        yield Progress("render", min(start + VIDEO_BATCH, path.shape[0]), path.shape[0], "rendering frames")
    return np.concatenate(batches)  # [F, H, W, 3]


def encode_video(frames: np.ndarray, kind: str, fps: float = 24.0) -> bytes:
    """Encode frames [F, H, W, 3] as an MP4 or GIF file (``kind`` "mp4" or "gif") and return its bytes."""
    with tempfile.TemporaryDirectory(prefix="fluidsrv-video-") as folder:
        target = Path(folder) / f"video.{kind}"
        write_video(target, frames, fps=fps)
        return target.read_bytes()
