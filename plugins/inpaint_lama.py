"""The Big LaMa inpainter: the TorchScript ``big-lama.pt`` that IOPaint / lama-cleaner distribute.

The scripted module takes ``image`` [1, 3, H, W] RGB in [0, 1] and ``mask`` [1, 1, H, W] (1 = fill) with H
and W multiples of 8, and returns the inpainted RGB image [1, 3, H, W] in [0, 1]. As IOPaint does, the
image and mask are padded at the bottom and right (mirrored) to the next multiple of 8 and the result is
cropped back; only the masked pixels of the result are used, so every other pixel comes back
byte-identical. ``big-lama.pt`` is user-provided: put it in the weights cache (``fluidsrv weights list``
shows where) or name a file with the plugin option ``model``. Option ``max_side`` (0 = full size) fills a
shrunk copy of large images, as the OpenCV inpainters do.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from fluidsrv_plugins._faces import check_rgb_image
from fluidsrv_plugins.inpaint_opencv import check_mask, paste_fill, shrink_for_fill

from fluidsrv import hookimpl
from fluidsrv.manifest import WeightsError
from fluidsrv.stages import Inpainter, PluginContext, PluginFactory
from fluidsrv.weights_manager import WeightsManager

WEIGHTS_NAME = "big-lama"
PAD_MULTIPLE = 8


def pad_to_multiple(array: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """Pad ``array`` [H, W, ...] at the bottom and right by mirroring (edge pixel repeated) to multiples."""
    height, width = array.shape[:2]
    pad_bottom, pad_right = -height % multiple, -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return array
    padding = [(0, pad_bottom), (0, pad_right)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, padding, mode="symmetric")


class LamaInpainter:
    """Runs a LaMa TorchScript module on an image and a hole mask."""

    def __init__(self, module: Any, device: torch.device | str = "cpu", max_side: int = 0) -> None:
        assert max_side >= 0, max_side
        self.module = module
        self.device = torch.device(device)
        self.max_side = max_side
        self._lock = threading.Lock()  # one forward at a time: the module is shared

    @torch.no_grad()
    def fill(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return LaMa's whole output uint8 [H, W, 3] for ``image`` uint8 [H, W, 3] and ``mask`` uint8 [H, W]."""
        height, width = mask.shape
        padded_image = pad_to_multiple(image)  # [H', W', 3]
        padded_mask = pad_to_multiple(mask)  # [H', W']
        pixels = torch.from_numpy(np.ascontiguousarray(padded_image)).permute(2, 0, 1)[None]  # [1, 3, H', W']
        holes = torch.from_numpy(np.ascontiguousarray(padded_mask))[None, None]  # [1, 1, H', W']
        pixels = pixels.to(self.device).float() / 255.0
        holes = (holes.to(self.device) > 0).float()
        with self._lock:
            output = self.module(pixels, holes)  # [1, 3, H', W'] in [0, 1]
        if not isinstance(output, torch.Tensor) or output.shape != pixels.shape:
            shape = getattr(output, "shape", None)
            raise RuntimeError(f"the LaMa module returned {type(output).__name__} {shape}, expected {pixels.shape}")
        result = (output[0, :, :height, :width].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)  # [3, H, W]
        return result.permute(1, 2, 0).cpu().numpy()

    def inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return ``image`` (uint8 RGB [H, W, 3]) with the pixels where ``mask`` (bool [H, W]) is set filled."""
        check_rgb_image(image)
        mask = check_mask(mask, image)
        if not mask.any():
            return image.copy()
        small_image, small_mask = shrink_for_fill(image, mask, self.max_side)
        filled = self.fill(small_image, small_mask)
        if filled.shape != image.shape:
            filled = cv2.resize(filled, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)
        return paste_fill(image, filled, mask)


def model_path(context: PluginContext) -> Path:
    """Return the TorchScript file to use: the plugin option ``model``, else the weights cache's entry."""
    explicit = context.options.get("model")
    if explicit:
        return Path(explicit).expanduser()
    return WeightsManager.from_context(context).path_for(WEIGHTS_NAME)


def load_lama(path: Path, device: torch.device | str = "cpu") -> Any:
    """Load a LaMa TorchScript archive with ``torch.jit.load`` (TorchScript runs no pickled Python code)."""
    with warnings.catch_warnings():
        # torch deprecates TorchScript in favour of torch.export, but the published file is TorchScript
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        module = torch.jit.load(str(path), map_location=torch.device(device))
    return module.eval()


def _unavailable(context: PluginContext) -> str | None:
    explicit = context.options.get("model")
    if explicit:
        path = Path(explicit).expanduser()
        return None if path.is_file() else f"LaMa model {path} (plugin option 'model') does not exist"
    try:
        return WeightsManager.from_context(context).missing_reason(WEIGHTS_NAME)
    except WeightsError as error:
        return str(error)


def _create(context: PluginContext) -> LamaInpainter:
    module = load_lama(model_path(context), context.device)
    return LamaInpainter(module, context.device, max_side=int(context.options.get("max_side", 0)))


@hookimpl
def fluidsrv_inpainters() -> list[PluginFactory[Inpainter]]:
    """Register the Big LaMa inpainter (user-provided TorchScript file)."""
    return [
        PluginFactory(
            "lama",
            "Big LaMa inpainting (big-lama.pt TorchScript from IOPaint; learned texture fill)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
