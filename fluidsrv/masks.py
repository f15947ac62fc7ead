"""The finalize seam mask and its morphology.

All masks live in the frame of the *outer* crop. With a/b the dilated old/new face+hair, c the new
face+hair, d the region covered by the inner crop and e a band along the outer crop's border, the
region to inpaint is ``(a ∪ b) ∩ ¬(c ∩ d) ∩ ¬e``: wherever the old or the new head was (plus a
margin), except where the new face itself is shown and except the border that must stay continuous
with the rest of the photo. When the new head is predicted over the whole outer crop (:mod:`fluidsrv.outer_seg`)
and the old head moved with it (``k``, the old head carried into the new frame), the new head outside the inner
crop is shown with those carried pixels and not inpainted either: ``(a ∪ b) ∩ ¬(c ∩ (d ∪ k)) ∩ ¬e``.
"""

from __future__ import annotations

import cv2
import numpy as np


def binarize(mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Return a bool mask from a soft float mask [H, W] (or pass a bool mask through)."""
    assert mask.ndim == 2, f"expected a [H, W] mask, got {mask.shape}"
    return mask if mask.dtype == bool else mask >= threshold


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Return ``mask`` (bool [H, W]) grown by a disc of ``radius`` pixels."""
    if radius <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Return ``mask`` (bool [H, W]) shrunk by a disc of ``radius`` pixels."""
    if radius <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def border_band(shape: tuple[int, int], width: int) -> np.ndarray:
    """Return a bool [H, W] mask that is set within ``width`` pixels of the image border."""
    band = np.zeros(shape, dtype=bool)
    if width > 0:
        band[:width, :] = band[-width:, :] = True
        band[:, :width] = band[:, -width:] = True
    return band


def seam_mask(
    old_head: np.ndarray,
    new_head: np.ndarray,
    inner_region: np.ndarray,
    *,
    dilation: int,
    border: int,
    carried: np.ndarray | None = None,
) -> np.ndarray:
    """Return the bool region to inpaint: ``(a ∪ b) ∩ ¬(c ∩ (d ∪ k)) ∩ ¬e`` in outer-crop pixels.

    ``old_head``: face+hair of the old outer crop; ``new_head``: face+hair of the new head in the outer frame
    (the new inner face's parse, or a prediction over the whole crop); ``inner_region``: where the inner crop
    covers the outer crop; ``carried`` (k): the old head moved into the new frame, shown where the new head is
    outside the inner crop (None: nothing is, ``(a ∪ b) ∩ ¬(c ∩ d) ∩ ¬e``). All [H, W].
    """
    old_head, new_head, inner_region = binarize(old_head), binarize(new_head), binarize(inner_region)
    assert old_head.shape == new_head.shape == inner_region.shape, "masks must share the outer-crop frame"
    a = dilate(old_head, dilation)
    b = dilate(new_head, dilation)
    shown_region = inner_region if carried is None else inner_region | binarize(carried)  # d ∪ k
    shown_new_face = new_head & shown_region  # c ∩ (d ∪ k)
    e = border_band(old_head.shape, border)
    return (a | b) & ~shown_new_face & ~e


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """Return a float32 [H, W] alpha in [0, 1]: ``mask`` eroded by ``radius`` then blurred over ``radius``."""
    alpha: np.ndarray = erode(binarize(mask), radius).astype(np.float32)
    if radius > 0:
        size = 2 * radius + 1
        alpha = cv2.GaussianBlur(alpha, (size, size), sigmaX=radius / 2.0, borderType=cv2.BORDER_CONSTANT)
    return np.clip(alpha, 0.0, 1.0).astype(np.float32)
