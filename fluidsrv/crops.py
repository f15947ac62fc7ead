"""The square crop of a photo as a transform: the quad it covers and the exact maps between photo and crop.

Coordinates and conventions are those of :mod:`fluidsrv.geometry` (OpenCV pixel centres; quads TL, BL, BR, TR;
3×3 matrices on homogeneous column vectors). Kept apart from the alignment so that :mod:`fluidsrv.paste` can
use it without importing the alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fluidsrv.resample import box_corners, is_affine, map_points


def crop_corners(size: int) -> np.ndarray:
    """Return the outer corners [4, 2] of a ``size``-pixel crop, in quad order (TL, BL, BR, TR)."""
    return box_corners(size, size)


@dataclass(frozen=True, eq=False)
class CropTransform:
    """A square crop of the original photo: the quad it covers and the exact maps between the two."""

    quad: np.ndarray  # [4, 2] float64 photo coordinates of the crop's corners: TL, BL, BR, TR
    size: int  # the crop's side in pixels

    def __post_init__(self) -> None:
        quad = np.array(self.quad, dtype=np.float64)  # a private copy
        if quad.shape != (4, 2) or not np.all(np.isfinite(quad)):
            raise ValueError(f"quad must be a finite [4, 2] array, got shape {quad.shape}")
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"crop size must be a positive integer, got {self.size}")
        quad.setflags(write=False)
        object.__setattr__(self, "quad", quad)
        object.__setattr__(self, "size", int(self.size))
        if abs(np.linalg.det(self.from_crop)) < 1e-12:
            raise ValueError("degenerate quad (zero area)")

    @cached_property
    def from_crop(self) -> np.ndarray:
        """The 3×3 map from crop pixel coordinates to photo pixel coordinates."""
        matrix = _quad_map(crop_corners(self.size), self.quad)
        matrix.setflags(write=False)
        return matrix

    @cached_property
    def to_crop(self) -> np.ndarray:
        """The 3×3 map from photo pixel coordinates to crop pixel coordinates (inverse of ``from_crop``)."""
        matrix = np.linalg.inv(self.from_crop)
        matrix = matrix / matrix[2, 2]
        matrix.setflags(write=False)
        return matrix

    @property
    def is_affine(self) -> bool:
        """Whether the quad is a parallelogram (the FFHQ quad is always a square)."""
        return is_affine(self.from_crop)

    @property
    def side(self) -> float:
        """The mean length of the quad's edges, in photo pixels (FFHQ's "qsize" for the inner quad)."""
        edges = self.quad - np.roll(self.quad, 1, axis=0)  # [4, 2]
        return float(np.hypot(edges[:, 0], edges[:, 1]).mean())

    @property
    def scale(self) -> float:
        """Crop pixels per photo pixel (> 1 when the crop enlarges the face)."""
        return self.size / self.side

    @property
    def centre(self) -> np.ndarray:
        """The photo coordinates [2] of the crop's centre."""
        return map_points(self.from_crop, np.full(2, (self.size - 1) / 2.0))

    def to_crop_points(self, points: np.ndarray) -> np.ndarray:
        """Map photo coordinates [..., 2] into this crop."""
        return map_points(self.to_crop, points)

    def to_photo_points(self, points: np.ndarray) -> np.ndarray:
        """Map crop coordinates [..., 2] back into the photo."""
        return map_points(self.from_crop, points)

    def expanded_to(self, size: int) -> CropTransform:
        """The crop with the same centre and pixel scale, ``size`` pixels wide (``size - self.size`` even)."""
        if (size - self.size) % 2:
            raise ValueError("the size difference must be even so the pixel grids coincide")
        margin = (size - self.size) / 2.0
        corners = crop_corners(self.size) + np.array(
            [[-margin, -margin], [-margin, margin], [margin, margin], [margin, -margin]]
        )
        return CropTransform(map_points(self.from_crop, corners), size)

    def resized(self, size: int) -> CropTransform:
        """The same quad sampled with ``size`` pixels (e.g. a generator output at another resolution)."""
        return CropTransform(self.quad, size)


def _quad_map(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Return the 3×3 matrix mapping the 4 ``source`` points onto the 4 ``target`` points.

    Parallelograms give an exact affine matrix; other quads a projective one (normalised DLT).
    """
    if np.allclose(target[0] + target[2], target[1] + target[3], rtol=0.0, atol=1e-9 * (1.0 + np.abs(target).max())):
        # Source corners are axis-aligned: (TL, BL, BR, TR). One crop pixel steps along the edges.
        width = source[3, 0] - source[0, 0]
        height = source[1, 1] - source[0, 1]
        step_x = (target[3] - target[0]) / width
        step_y = (target[1] - target[0]) / height
        origin = target[0] - source[0, 0] * step_x - source[0, 1] * step_y
        return np.array([[step_x[0], step_y[0], origin[0]], [step_x[1], step_y[1], origin[1]], [0.0, 0.0, 1.0]])
    source_norm, source_matrix = _normalising_similarity(source)
    target_norm, target_matrix = _normalising_similarity(target)
    rows = []
    rhs = []
    for (u, v), (x, y) in zip(source_norm, target_norm):
        rows.append([u, v, 1.0, 0.0, 0.0, 0.0, -u * x, -v * x])
        rows.append([0.0, 0.0, 0.0, u, v, 1.0, -u * y, -v * y])
        rhs.extend([x, y])
    solution = np.linalg.solve(np.array(rows), np.array(rhs))
    normalised = np.append(solution, 1.0).reshape(3, 3)
    matrix = np.linalg.inv(target_matrix) @ normalised @ source_matrix
    return matrix / matrix[2, 2]


def _normalising_similarity(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre ``points`` [N, 2] and scale them to unit mean radius; return them and the 3×3 matrix used."""
    centre = points.mean(axis=0)
    radius = np.hypot(*(points - centre).T).mean()
    scale = 1.0 / radius if radius > 0 else 1.0
    matrix = np.array([[scale, 0.0, -scale * centre[0]], [0.0, scale, -scale * centre[1]], [0.0, 0.0, 1.0]])
    return map_points(matrix, points), matrix


# ---------------------------------------------------------------------------------------------
# Aligned crops
