"""Lay a generator's edit over the photo: the render's change, only on the head, at the photo's own resolution.

The generator sees the inner crop at its own resolution (128² for the embedded model) and cannot reproduce a
photo's detail. An edit is therefore carried as an :class:`EditLayer` in the inner crop's frame:

* ``change`` = ``region · (edited − reconstructed)``: what the edit changed in the render (its colour cast damped,
  :func:`damp_chroma`), kept only on the
  head (the parsed face + hair of the photo, dilated and feathered) and faded out toward the inner crop's
  border, so the background, the shoulders and the border of the crop never move;
* ``replace``: where the edit moved structure (the head's outline, an opened mouth) the photo's own detail
  there belongs to the old face, so it is faded out in favour of the render: ``replace`` grows from 0 to the
  region's weight as the local change grows from :attr:`TransferConfig.structure_low` to ``structure_high``.

A target image ``x`` (the photo, or the aligned preview crop) becomes
``x · (1 − replace) + replace · reconstructed + change``: with no edit it is ``x`` byte for byte, with a small
edit ``x + change`` (the photo's detail stays), and where structure moved, the render itself. The maps are
smooth, so they are resampled to any resolution without jagged edges (:func:`apply_to_crop`,
:func:`apply_to_photo`); preview and finalize use the same layer, so the preview shows the final.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fluidsrv.geometry import CropTransform
from fluidsrv.masks import dilate
from fluidsrv.paste import warp_crop_to_photo


@dataclass(frozen=True)
class TransferConfig:
    """Margins and thresholds of the transfer, as fractions of the inner crop's side or of 255."""

    dilation: float = 0.04  # growth of the parsed head before it is feathered
    feather: float = 0.05  # width of the head region's soft edge
    border: float = 0.08  # the region fades to zero over this band along the inner crop's border
    structure_low: float = 0.16  # local change (fraction of 255) where the render starts to replace the photo
    structure_high: float = 0.40  # ... and where it has replaced it
    structure_blur: float = 0.015  # the local change is averaged over this radius
    chroma: float = 0.35  # share of the render's colour (chroma) change kept; its brightness change is kept whole


@dataclass(frozen=True)
class EditLayer:
    """An edit in the inner crop's frame, ready to be laid over a target at any resolution (all float32)."""

    change: np.ndarray  # [S, S, 3] in 0–255 units
    replace: np.ndarray  # [S, S] in [0, 1]
    replaced: np.ndarray  # [S, S, 3]: replace · reconstructed


def smoothstep(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """0 below ``low``, 1 above ``high``, a smooth cubic in between (float32)."""
    t = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def border_fade(size: int, width: float) -> np.ndarray:
    """Float32 [size, size]: 0 on the crop's outermost pixels, rising smoothly to 1 ``width`` pixels in."""
    from_rim = np.minimum(np.arange(size), size - 1 - np.arange(size)).astype(np.float32)  # [size]
    ramp = smoothstep(from_rim, 0.0, max(width, 1.0))
    return np.minimum.outer(ramp, ramp).astype(np.float32)


def blur(values: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a float32 map with sigma ``radius / 2`` (a no-op below half a pixel)."""
    if radius < 1.0:
        return values
    return cv2.GaussianBlur(values, (0, 0), radius / 2.0, borderType=cv2.BORDER_REPLICATE)


def head_region(head: np.ndarray, size: int, config: TransferConfig | None = None) -> np.ndarray:
    """Float32 [size, size] weight of the edit: the soft head mask [M, M] dilated, feathered, border-faded.

    ``head`` is the segmenter's face + hair of the photo's inner crop at any resolution M (float in [0, 1]
    or bool); the weight is built at M and resized once, so its edge is as smooth as M allows.
    """
    config = config or TransferConfig()
    side = head.shape[0]
    assert head.shape == (side, side), f"expected a square [M, M] mask, got {head.shape}"
    grown = dilate(np.asarray(head, dtype=np.float32) >= 0.5, max(1, round(config.dilation * side)))
    soft = blur(grown.astype(np.float32), 2.0 * config.feather * side)  # [M, M]
    weight = soft * border_fade(side, config.border * side)
    if side != size:
        weight = cv2.resize(weight, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
    return np.clip(weight, 0.0, 1.0).astype(np.float32)


def damp_chroma(difference: np.ndarray, keep: float) -> np.ndarray:
    """Scale the colour part of a change [S, S, 3] by ``keep``; its luminance part (Rec. 601) stays whole.

    The embedded generator's edits shift skin hue (a greyish or purple cast) along with what the slider names;
    the shape, the shading and the brightness of the edit are in the luminance.
    """
    luminance = difference @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # [S, S]
    return (luminance[..., None] + keep * (difference - luminance[..., None])).astype(np.float32)


def edit_layer(
    edited: np.ndarray, reconstructed: np.ndarray, region: np.ndarray, config: TransferConfig | None = None
) -> EditLayer:
    """The layer of an edit from two renders (uint8 [S, S, 3]) of the same face and its region [S, S]."""
    config = config or TransferConfig()
    size = edited.shape[0]
    if edited.shape != reconstructed.shape or edited.shape != (size, size, 3):
        raise ValueError(f"renders differ in shape: {edited.shape} vs {reconstructed.shape}")
    if region.shape != (size, size):
        region = cv2.resize(region, (size, size), interpolation=cv2.INTER_LINEAR)
    base = reconstructed.astype(np.float32)
    difference = damp_chroma(edited.astype(np.float32) - base, config.chroma)  # [S, S, 3]
    local = blur(np.abs(difference).mean(axis=2), config.structure_blur * size * 2.0)  # [S, S]
    replace = region * smoothstep(local / 255.0, config.structure_low, config.structure_high)
    return EditLayer(
        change=difference * region[..., None],
        replace=replace.astype(np.float32),
        replaced=base * replace[..., None],
    )


def is_empty(layer: EditLayer) -> bool:
    """Whether the layer changes nothing (all sliders at zero)."""
    return not np.any(layer.change) and not np.any(layer.replace)


def combine(target: np.ndarray, change: np.ndarray, replace: np.ndarray, replaced: np.ndarray) -> np.ndarray:
    """``target · (1 − replace) + replaced + change`` rounded to uint8 (maps already at the target's size)."""
    values = target.astype(np.float32) * (1.0 - replace[..., None]) + replaced + change
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def apply_to_crop(crop: np.ndarray, layer: EditLayer) -> np.ndarray:
    """Lay the edit over an aligned crop of the inner quad at any resolution (uint8 [N, N, 3])."""
    if is_empty(layer):
        return crop.copy()
    size = crop.shape[0]
    if layer.change.shape[0] == size:
        return combine(crop, layer.change, layer.replace, layer.replaced)
    shape = (size, size)
    return combine(
        crop,
        cv2.resize(layer.change, shape, interpolation=cv2.INTER_CUBIC),
        np.clip(cv2.resize(layer.replace, shape, interpolation=cv2.INTER_LINEAR), 0.0, 1.0),
        cv2.resize(layer.replaced, shape, interpolation=cv2.INTER_CUBIC),
    )


def apply_to_photo(photo: np.ndarray, layer: EditLayer, inner: CropTransform) -> np.ndarray:
    """Lay the edit over the whole photo through the inner crop's transform; pixels it does not reach stay."""
    if is_empty(layer):
        return photo.copy()
    maps = np.concatenate([layer.change, layer.replaced, layer.replace[..., None]], axis=2)  # [S, S, 7]
    warped = warp_crop_to_photo(maps, inner, photo.shape[:2])
    result = photo.copy()
    if warped is None:
        return result
    (x0, y0, x1, y1), values = warped  # values [h, w, 7]
    result[y0:y1, x0:x1] = combine(
        photo[y0:y1, x0:x1], values[..., 0:3], np.clip(values[..., 6], 0.0, 1.0), values[..., 3:6]
    )
    return result
