"""Paste-back: blending an edited crop into the photo through the exact inverse of its crop transform.

Only the pasted region's bounding box is resampled; every photo pixel outside it is returned byte-identical.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np

from fluidsrv.resample import MIN_BLUR_SIGMA, check_rgb_image, resample, translation

if TYPE_CHECKING:
    from fluidsrv.crops import CropTransform

DEFAULT_FEATHER = 0.05  # paste-back feather width as a fraction of the crop side


def blend_mask(size: int, *, feather: float = DEFAULT_FEATHER, mask: np.ndarray | None = None) -> np.ndarray:
    """Return the paste-back weight [size, size] float32 in [0, 1], in crop coordinates.

    It ramps smoothly from 0 on the crop's outermost pixels to 1 over ``feather * size`` pixels. A caller
    ``mask`` (bool, uint8 0-255 or float 0-1, any square size: it is resized to ``size``) is softened
    by a Gaussian of sigma ``feather * size / 4`` and multiplied in.
    """
    feather_px = feather * size
    indices = np.arange(size, dtype=np.float64)
    from_rim = np.minimum(indices, size - 1 - indices)  # [size] pixels from the outermost row / column
    if feather_px > 0:
        ramp = np.clip(from_rim / feather_px, 0.0, 1.0)  # 0 on the rim, so nothing reaches past the quad
        ramp = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep
    else:
        ramp = np.ones(size)
    weight = np.minimum.outer(ramp, ramp).astype(np.float32)  # [size, size]
    if mask is not None:
        weight *= _soft_mask(mask, size, sigma=feather_px / 4.0)
    return weight


def _soft_mask(mask: np.ndarray, size: int, sigma: float) -> np.ndarray:
    values = np.asarray(mask)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"mask must be square [N, N], got {values.shape}")
    soft: np.ndarray
    if values.dtype == np.bool_:
        soft = values.astype(np.float32)
    elif values.dtype == np.uint8:
        soft = values.astype(np.float32) / 255.0
    else:
        soft = np.clip(values.astype(np.float32), 0.0, 1.0)
    if soft.shape[0] != size:
        soft = cv2.resize(soft, (size, size), interpolation=cv2.INTER_LINEAR)
    if sigma >= MIN_BLUR_SIGMA:
        soft = cv2.GaussianBlur(soft, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    return np.clip(soft, 0.0, 1.0)


def paste_back(
    photo: np.ndarray,
    crop: np.ndarray,
    transform: CropTransform,
    *,
    mask: np.ndarray | None = None,
    feather: float = DEFAULT_FEATHER,
) -> np.ndarray:
    """Return a copy of ``photo`` with ``crop`` warped back through ``transform`` and blended in.

    ``crop`` is uint8 RGB [N, N, 3]; N may differ from ``transform.size`` (the same quad is then
    sampled at N pixels). The weight is :func:`blend_mask` mapped with the exact inverse transform;
    every photo pixel where it is zero (all of the photo outside the pasted region) is returned
    byte-identical, and only the region's bounding box is ever resampled.
    """
    check_rgb_image(photo, "photo")
    check_rgb_image(crop, "crop")
    size = crop.shape[0]
    if crop.shape[1] != size:
        raise ValueError(f"crop must be square, got {crop.shape}")
    if size != transform.size:
        transform = transform.resized(size)
    weight = blend_mask(size, feather=feather, mask=mask)  # [N, N]
    box = _photo_box_of_support(weight, transform, photo.shape[:2])
    result = photo.copy()
    if box is None:
        return result
    x0, y0, x1, y1 = box
    box_to_crop = transform.to_crop @ translation(x0, y0)
    width, height = x1 - x0, y1 - y0
    crop_per_photo = transform.scale
    warped = resample(
        crop, box_to_crop, width, height, source_per_target=crop_per_photo, border_mode=cv2.BORDER_REPLICATE
    )
    alpha = resample(
        weight,
        box_to_crop,
        width,
        height,
        source_per_target=crop_per_photo,
        border_mode=cv2.BORDER_CONSTANT,
        smooth=False,
    )
    # alpha [h, w] is a convex combination of weights in [0, 1] (bilinear, Gaussian, zero border).
    # Where it is 0, blendLinear returns photo / (1 + 1e-5), which rounds back to the same byte.
    region = photo[y0:y1, x0:x1]  # [h, w, 3]
    result[y0:y1, x0:x1] = cv2.blendLinear(region, warped, 1.0 - alpha, alpha)
    return result


def warp_crop_to_photo(
    values: np.ndarray, transform: CropTransform, photo_shape: tuple[int, ...]
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Warp a float32 crop map [N, N, C] (zero where it has nothing) into the photo, bicubic, zero outside.

    Returns the photo box (x0, y0, x1, y1) the map reaches and the warped values [h, w, C] there, or None
    when it reaches no photo pixel. ``N`` may differ from ``transform.size`` (the same quad is sampled).
    """
    size = values.shape[0]
    if values.ndim != 3 or values.shape[1] != size:
        raise ValueError(f"expected a square [N, N, C] map, got {values.shape}")
    if size != transform.size:
        transform = transform.resized(size)
    support = np.abs(values).max(axis=2)  # [N, N]
    box = _photo_box_of_support(support, transform, photo_shape)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    box_to_crop = transform.to_crop @ translation(x0, y0)
    chunks = [  # OpenCV warps bicubically at most four channels at a time
        resample(
            np.ascontiguousarray(values[..., start : start + 4], dtype=np.float32),
            box_to_crop,
            x1 - x0,
            y1 - y0,
            source_per_target=transform.scale,
            border_mode=cv2.BORDER_CONSTANT,
        ).reshape(y1 - y0, x1 - x0, -1)
        for start in range(0, values.shape[2], 4)
    ]
    return box, np.concatenate(chunks, axis=2)


def _photo_box_of_support(
    weight: np.ndarray, transform: CropTransform, photo_shape: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """Return the photo box (x0, y0, x1, y1), end-exclusive, that holds every pixel ``weight`` reaches."""
    rows = np.flatnonzero(weight.max(axis=1) > 0)
    cols = np.flatnonzero(weight.max(axis=0) > 0)
    if rows.size == 0:
        return None
    reach = 1.0  # bilinear footprint of a crop pixel, in crop pixels
    corners = np.array(
        [
            [cols[0] - 0.5 - reach, rows[0] - 0.5 - reach],
            [cols[0] - 0.5 - reach, rows[-1] + 0.5 + reach],
            [cols[-1] + 0.5 + reach, rows[-1] + 0.5 + reach],
            [cols[-1] + 0.5 + reach, rows[0] - 0.5 - reach],
        ]
    )
    photo_corners = transform.to_photo_points(corners)  # [4, 2]
    height, width = photo_shape[0], photo_shape[1]
    x0 = max(0, math.floor(photo_corners[:, 0].min()) - 1)
    y0 = max(0, math.floor(photo_corners[:, 1].min()) - 1)
    x1 = min(width, math.ceil(photo_corners[:, 0].max()) + 2)
    y1 = min(height, math.ceil(photo_corners[:, 1].max()) + 2)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1
