"""Resampling an image through a 3×3 pixel-centre transform, in one warp, and the matrix helpers it needs.

Coordinates follow OpenCV's pixel-centre convention (see :mod:`fluidsrv.geometry`); transforms are 3×3 matrices
acting on homogeneous column vectors ``(x, y, 1)``. A shrinking warp is low-passed first (a filter, not a second
resampling), and only the window of the source that the samples reach is ever read.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_BLUR_SIGMA = 0.3  # below this a Gaussian blur is a no-op at 8-bit precision


def map_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3×3 projective ``matrix`` to ``points`` [..., 2] and return [..., 2] float64."""
    matrix = np.asarray(matrix, dtype=np.float64)
    assert matrix.shape == (3, 3), matrix.shape
    xy = np.asarray(points, dtype=np.float64)
    assert xy.shape[-1] == 2, xy.shape
    mapped = xy @ matrix[:2, :2].T + matrix[:2, 2]  # [..., 2]
    denominator = xy @ matrix[2, :2] + matrix[2, 2]  # [...]
    return mapped / denominator[..., None]


def box_corners(width: int, height: int) -> np.ndarray:
    """The outer corners [4, 2] (TL, BL, BR, TR) of an image ``width`` × ``height`` pixels."""
    right, bottom = width - 0.5, height - 0.5
    return np.array([[-0.5, -0.5], [-0.5, bottom], [right, bottom], [right, -0.5]], dtype=np.float64)


def is_affine(matrix: np.ndarray) -> bool:
    """Whether the 3×3 ``matrix`` is affine (its last row is 0, 0, 1): OpenCV can then warp it as 2×3."""
    return bool(abs(matrix[2, 0]) < 1e-12 and abs(matrix[2, 1]) < 1e-12 and matrix[2, 2] == 1.0)


def translation(dx: float, dy: float) -> np.ndarray:
    """The 3×3 matrix that moves points by ``(dx, dy)``."""
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def resample(
    source: np.ndarray,
    target_to_source: np.ndarray,
    width: int,
    height: int,
    *,
    source_per_target: float,
    border_mode: int,
    smooth: bool = True,
) -> np.ndarray:
    """Sample ``source`` at ``target_to_source`` of each target pixel centre, in one resampling.

    A bicubic sample (``smooth``) or a bilinear one; when the warp shrinks (a target pixel covers
    ``source_per_target`` > 1 source pixels) the source is first low-passed with a Gaussian of sigma
    ``(source_per_target - 1) / 2`` (scikit-image's anti-aliasing rule), which is a filter, not a
    second resampling. Only the window of ``source`` the samples (and their reflections) reach is used.
    """
    sigma = max(0.0, (source_per_target - 1.0) / 2.0)
    support = 4.0 + 3.0 * sigma  # interpolation taps and the low-pass kernel beyond a sample position
    (x0, y0), window = _source_window(source, target_to_source, width, height, border_mode, support)
    if sigma >= MIN_BLUR_SIGMA:
        window = cv2.GaussianBlur(window, (0, 0), sigma, borderType=border_mode)
    matrix = translation(-x0, -y0) @ target_to_source  # target -> window
    return _warp(window, matrix, width, height, cv2.INTER_CUBIC if smooth else cv2.INTER_LINEAR, border_mode)


def _warp(
    source: np.ndarray, target_to_source: np.ndarray, width: int, height: int, interpolation: int, border: int
) -> np.ndarray:
    flags = interpolation | cv2.WARP_INVERSE_MAP
    if is_affine(target_to_source):
        return cv2.warpAffine(source, target_to_source[:2], (width, height), flags=flags, borderMode=border)
    return cv2.warpPerspective(source, target_to_source, (width, height), flags=flags, borderMode=border)


def _source_window(
    source: np.ndarray, target_to_source: np.ndarray, width: int, height: int, border_mode: int, support: float
) -> tuple[tuple[int, int], np.ndarray]:
    """Return the (x, y) origin in ``source`` and the view of the window every sample of the warp reads.

    With reflect borders the window also covers the mirrored positions, and it always ends on the
    source's own edge on a side the samples leave, so OpenCV reflects about the photo's true edge.
    """
    source_height, source_width = source.shape[:2]
    corners = map_points(target_to_source, box_corners(width, height))  # [4, 2]
    low = corners.min(axis=0) - support  # [2] (x, y)
    high = corners.max(axis=0) + support  # [2]
    limits = np.array([source_width - 1, source_height - 1], dtype=np.float64)
    if border_mode in (cv2.BORDER_REFLECT_101, cv2.BORDER_REFLECT):
        low, high = np.minimum(low, 2.0 * limits - high), np.maximum(high, -low)
    start = np.clip(np.floor(low), 0, limits).astype(int)
    stop = np.clip(np.ceil(high), 0, limits).astype(int) + 1
    stop = np.maximum(stop, start + 1)
    window = source[start[1] : stop[1], start[0] : stop[0]]
    return (int(start[0]), int(start[1])), window


def check_rgb_image(image: np.ndarray, name: str) -> None:
    """Raise ValueError, naming the argument ``name``, unless ``image`` is a uint8 RGB array [H, W, 3]."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"{name} must be a uint8 RGB array [H, W, 3], got {type(image).__name__} {shape}")
