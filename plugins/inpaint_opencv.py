"""The embedded default inpainters: OpenCV's Telea (fast marching) and Navier-Stokes methods.

Both fill a hole by propagating the colours around it inward, so they suit the thin-to-medium seams of
the finalize step (a smooth fill, no invented texture). The cost grows with the hole's pixels times the
square of the neighbourhood radius, so large images are filled on a copy at most ``max_side`` pixels
wide (512 by default; 0 fills at full size) whose hole covers every pixel the full-size hole touches;
the fill is resized back and only the masked pixels are replaced: every unmasked pixel comes back
byte-identical. The neighbourhood radius is ``radius_fraction`` (0.006) × the working side, at least 2 px.
Options (``context.options``): ``max_side``, ``radius_fraction``.
"""

from __future__ import annotations

import cv2
import numpy as np
from fluidsrv_plugins._faces import check_rgb_image

from fluidsrv import hookimpl
from fluidsrv.stages import Inpainter, PluginContext, PluginFactory

DEFAULT_MAX_SIDE = 512
DEFAULT_RADIUS_FRACTION = 0.006
MIN_RADIUS = 2

METHODS = {"telea": cv2.INPAINT_TELEA, "navier-stokes": cv2.INPAINT_NS}


def check_mask(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Return ``mask`` as bool [H, W] after checking it matches ``image``; uint8 masks count nonzero."""
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image {image.shape[:2]}")
    if mask.dtype != np.bool_ and mask.dtype != np.uint8:
        raise ValueError(f"mask must be bool (or uint8, nonzero = fill), got {mask.dtype}")
    return mask if mask.dtype == np.bool_ else mask > 0


def paste_fill(image: np.ndarray, filled: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Return a copy of ``image`` with the ``mask``ed pixels taken from ``filled`` (all uint8 [H, W, 3])."""
    result = image.copy()
    result[mask] = filled[mask]
    return result


def shrink_for_fill(image: np.ndarray, mask: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (image, uint8 mask) at most ``max_side`` wide; a shrunk pixel is masked if any pixel under it is."""
    height, width = mask.shape
    scale = max_side / max(height, width) if max_side > 0 else 1.0
    if scale >= 1.0:
        return image, mask.astype(np.uint8)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small_image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    coverage = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)  # [h, w] masked fraction
    # INTER_AREA with a fractional scale spreads a pixel over its neighbours; grow by one to keep every touch.
    small_mask = cv2.dilate((coverage > 0).astype(np.uint8), np.ones((3, 3), np.uint8))
    return small_image, small_mask


class OpenCVInpainter:
    """cv2.inpaint (Telea or Navier-Stokes) with a size-relative radius, on a shrunk copy for large images."""

    def __init__(
        self, method: str = "telea", max_side: int = DEFAULT_MAX_SIDE, radius_fraction: float = DEFAULT_RADIUS_FRACTION
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        assert max_side >= 0 and radius_fraction > 0
        self.method = method
        self.max_side = max_side
        self.radius_fraction = radius_fraction

    def radius(self, side: int) -> int:
        """Return the neighbourhood radius in pixels for an image ``side`` pixels wide."""
        return max(MIN_RADIUS, round(self.radius_fraction * side))

    def inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return ``image`` (uint8 RGB [H, W, 3]) with the pixels where ``mask`` (bool [H, W]) is set filled."""
        check_rgb_image(image)
        mask = check_mask(mask, image)
        if not mask.any():
            return image.copy()
        if mask.all():
            raise ValueError("the mask covers the whole image: there is nothing to fill it from")
        small_image, small_mask = shrink_for_fill(image, mask, self.max_side)
        radius = self.radius(max(small_mask.shape))
        filled = cv2.inpaint(small_image, small_mask, radius, METHODS[self.method])  # [h, w, 3]
        if filled.shape != image.shape:
            filled = cv2.resize(filled, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)
        return paste_fill(image, filled, mask)


def _factory(method: str, description: str) -> PluginFactory[Inpainter]:
    def create(context: PluginContext) -> OpenCVInpainter:
        options = context.options
        return OpenCVInpainter(
            method,
            max_side=int(options.get("max_side", DEFAULT_MAX_SIDE)),
            radius_fraction=float(options.get("radius_fraction", DEFAULT_RADIUS_FRACTION)),
        )

    return PluginFactory(method, description, create=create)


@hookimpl
def fluidsrv_inpainters() -> list[PluginFactory[Inpainter]]:
    """Register the Telea and Navier-Stokes inpainters (built in, no weights)."""
    return [
        _factory("telea", "OpenCV Telea fast-marching inpainting (built in, smooth fill)"),
        _factory("navier-stokes", "OpenCV Navier-Stokes inpainting (built in, smooth fill)"),
    ]
