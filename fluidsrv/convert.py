"""The one place images cross between the IO side (uint8 RGB numpy [H, W, 3]) and the model side
(float tensors [N, 3, H, W] in [-1, 1])."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def image_to_tensor(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return uint8 RGB ``image`` [H, W, 3] as a float tensor [1, 3, H, W] in [-1, 1]."""
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, f"bad image {image.shape} {image.dtype}"
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)  # [H, W, 3]
    return tensor.permute(2, 0, 1).unsqueeze(0).float().div(127.5).sub(1.0)  # [1, 3, H, W]


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """Return the first image of ``tensor`` [N, 3, H, W] in [-1, 1] as uint8 RGB [H, W, 3]."""
    assert tensor.ndim == 4 and tensor.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(tensor.shape)}"
    pixels = (tensor[0].detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5  # [3, H, W]
    return pixels.round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # [H, W, 3]


PREVIEW_FORMAT = "webp"  # how preview and progress frames travel


def encode_preview(image: np.ndarray, image_format: str = PREVIEW_FORMAT, quality: int = 82) -> bytes:
    """Encode a preview frame (uint8 RGB [H, W, 3]) as WebP or JPEG bytes."""
    buffer = io.BytesIO()
    pil_format = {"webp": "WEBP", "jpeg": "JPEG"}[image_format]
    Image.fromarray(image).save(buffer, format=pil_format, quality=quality)
    return buffer.getvalue()
