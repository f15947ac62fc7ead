"""Pure measurements of one finalized edit, for ``benchmarks/photo_edits.py``: numpy arrays in, floats (or masks) out.

Conventions: photos are uint8 RGB [H, W, 3]; landmarks are dlib / iBUG 68-point arrays [68, 2] (x, y) in the
photo's pixels; masks are bool [H, W]. Every region is placed from the ORIGINAL photo's landmarks, so original
and edited photo are measured over the same pixels.

The head is an ellipse around the 68 landmarks, rotated with the eye line: as wide as the jaw (points 0–16)
× ``HEAD_WIDTH_FACTOR``, from the chin (point 8) up to ``HEAD_TOP_FACTOR`` × the brow-to-chin height above
the brows (hair). Its outline, a ring and "outside" are scaled copies of that ellipse. The inner crop's quad (the
generator's aligned crop) marks where finalize's render ends: its outline across the head and the head outside it
(the original's face+hair as a segmenter parses its outer crop) are where a lost outer head shows (hair cut off at
the crop's edge, an inpainted smear beyond it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from fluidsrv_plugins.score_geometry import head_pose

HEAD_WIDTH_FACTOR = 1.15  # head width / jaw width (points 0 to 16): ears and hair at the sides
HEAD_TOP_FACTOR = 0.6  # head top above the brows, in brow-to-chin heights (forehead + hair)
SEAM_BAND_FRACTION = 0.02  # the outline band is ± this × the face (jaw) width
CHANGE_THRESHOLD = 12  # a pixel changed: > this on any channel after a 3×3 blur of both images (JPEG noise)

@dataclass(frozen=True)
class Ellipse:
    """A rotated ellipse in photo pixels: centre, semi-axes (across, along the face) and rotation in degrees."""

    cx: float
    cy: float
    half_width: float
    half_height: float
    angle: float  # degrees, the eye line's angle (cv2.ellipse convention)

    def scaled(self, factor: float) -> Ellipse:
        """The same ellipse with both axes multiplied by ``factor``."""
        return Ellipse(self.cx, self.cy, self.half_width * factor, self.half_height * factor, self.angle)


# ---------------------------------------------------------------------------------------------- regions


def _face_frame(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit vectors across (eye line) and down the face [2] each, and the roll angle in degrees."""
    points = np.asarray(landmarks, dtype=np.float64)
    across = points[42:48].mean(axis=0) - points[36:42].mean(axis=0)
    across = across / max(float(np.hypot(*across)), 1e-9)
    down = np.array([-across[1], across[0]])
    return across, down, math.degrees(math.atan2(across[1], across[0]))


def face_width(landmarks: np.ndarray) -> float:
    """Jaw width in pixels: the distance from landmark 0 to landmark 16."""
    points = np.asarray(landmarks, dtype=np.float64)
    return float(np.hypot(*(points[16] - points[0])))


def head_ellipse(landmarks: np.ndarray) -> Ellipse:
    """The head ellipse of a face's 68 landmarks: jaw-wide (× HEAD_WIDTH_FACTOR), chin to above the brows (hair)."""
    points = np.asarray(landmarks, dtype=np.float64)
    across, down, angle = _face_frame(points)
    u, v = points @ across, points @ down  # [68] each: coordinates in the face's frame
    brow = float(v[17:27].min())
    chin = float(v[8])
    top = brow - HEAD_TOP_FACTOR * (chin - brow)
    middle_u = 0.5 * (float(u[0]) + float(u[16]))
    middle_v = 0.5 * (top + chin)
    centre = middle_u * across + middle_v * down
    half_width = 0.5 * HEAD_WIDTH_FACTOR * face_width(points)
    return Ellipse(float(centre[0]), float(centre[1]), half_width, 0.5 * (chin - top), angle)


def ellipse_mask(shape: tuple[int, ...], ellipse: Ellipse) -> np.ndarray:
    """Bool mask [H, W] of the filled ``ellipse``."""
    mask = np.zeros(shape[:2], np.uint8)
    _draw(mask, ellipse, thickness=-1)
    return mask.astype(bool)


def outline_band(shape: tuple[int, ...], ellipse: Ellipse, half_width: float) -> np.ndarray:
    """Bool mask [H, W] of the pixels within ``half_width`` pixels of the ellipse's outline."""
    mask = np.zeros(shape[:2], np.uint8)
    _draw(mask, ellipse, thickness=max(3, 2 * round(half_width) + 1))
    return mask.astype(bool)


def _draw(mask: np.ndarray, ellipse: Ellipse, thickness: int) -> None:
    shift = 4  # sub-pixel precision of cv2.ellipse
    centre = (round(ellipse.cx * 2**shift), round(ellipse.cy * 2**shift))
    axes = (round(ellipse.half_width * 2**shift), round(ellipse.half_height * 2**shift))
    cv2.ellipse(mask, centre, axes, ellipse.angle, 0, 360, 1, thickness, cv2.LINE_8, shift)


def seam_band_mask(shape: tuple[int, ...], landmarks: np.ndarray) -> np.ndarray:
    """Bool mask [H, W]: the head outline ± SEAM_BAND_FRACTION × the face width."""
    return outline_band(shape, head_ellipse(landmarks), SEAM_BAND_FRACTION * face_width(landmarks))


def ring_mask(shape: tuple[int, ...], landmarks: np.ndarray, inner: float = 1.15, outer: float = 1.6) -> np.ndarray:
    """Bool mask [H, W]: between the head ellipse scaled by ``inner`` and by ``outer``."""
    head = head_ellipse(landmarks)
    return ellipse_mask(shape, head.scaled(outer)) & ~ellipse_mask(shape, head.scaled(inner))


def outside_mask(shape: tuple[int, ...], landmarks: np.ndarray, scale: float = 1.6) -> np.ndarray:
    """Bool mask [H, W]: everything outside the head ellipse scaled by ``scale``."""
    return ~ellipse_mask(shape, head_ellipse(landmarks).scaled(scale))


def quad_mask(shape: tuple[int, ...], quad: np.ndarray) -> np.ndarray:
    """Bool mask [H, W] of the filled quadrilateral ``quad`` [4, 2] (a crop's corners in photo pixels)."""
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(quad) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def quad_edge_band(shape: tuple[int, ...], quad: np.ndarray, half_width: float) -> np.ndarray:
    """Bool mask [H, W] of the pixels within ``half_width`` pixels of the quadrilateral's outline."""
    mask = np.zeros(shape[:2], np.uint8)
    points = np.round(np.asarray(quad) * 16).astype(np.int32)
    cv2.polylines(mask, [points], True, 1, max(3, 2 * round(half_width) + 1), cv2.LINE_8, 4)
    return mask.astype(bool)


def crop_edge_mask(shape: tuple[int, ...], landmarks: np.ndarray, inner_quad: np.ndarray,
                   head: np.ndarray) -> np.ndarray:
    """Bool mask [H, W]: the inner crop's outline (± SEAM_BAND_FRACTION × the face width) where the parsed ``head``
    (bool [H, W], grown by that width) crosses it: where hair is cut off when the head outside the crop is lost."""
    half_width = SEAM_BAND_FRACTION * face_width(landmarks)
    grown = cv2.dilate(head.astype(np.uint8), _disc(half_width)).astype(bool)
    return quad_edge_band(shape, inner_quad, half_width) & grown


def outer_head_mask(shape: tuple[int, ...], landmarks: np.ndarray, inner_quad: np.ndarray,
                    head: np.ndarray) -> np.ndarray:
    """Bool mask [H, W]: the parsed ``head`` (bool [H, W]) outside the inner crop, beyond its outline band."""
    band = quad_edge_band(shape, inner_quad, SEAM_BAND_FRACTION * face_width(landmarks))
    outside: np.ndarray = head & ~quad_mask(shape, inner_quad) & ~band
    return outside


def _disc(radius: float) -> np.ndarray:
    size = 2 * max(1, round(radius)) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def skin_patch_polygons(landmarks: np.ndarray) -> list[np.ndarray]:
    """Three skin polygons [K, 2]: both cheeks (below the eye, beside the nose) and a forehead band above the brows."""
    points = np.asarray(landmarks, dtype=np.float64)
    _, down, _ = _face_frame(points)
    polygons = []
    for indices in ((1, 2, 3, 48, 31, 39, 40, 41), (15, 14, 13, 54, 35, 42, 47, 46)):  # jaw, mouth, nose, lower lid
        hull = cv2.convexHull(points[list(indices)].astype(np.float32)).reshape(-1, 2).astype(np.float64)
        centre = hull.mean(axis=0)
        polygons.append(centre + 0.55 * (hull - centre))  # shrunk toward its centre: well inside the cheek
    height = float((points[8] - points[17:27].mean(axis=0)) @ down)  # brow-to-chin
    brows = points[18:26]  # brow points without the outer tips (temples)
    lower, upper = brows - 0.06 * height * down, brows[::-1] - 0.2 * height * down
    polygons.append(np.concatenate([lower, upper]))
    return polygons


def skin_mask(shape: tuple[int, ...], landmarks: np.ndarray) -> np.ndarray:
    """Bool mask [H, W] of the cheek and forehead skin patches."""
    mask = np.zeros(shape[:2], np.uint8)
    for polygon in skin_patch_polygons(landmarks):
        cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    return mask.astype(bool)


# ---------------------------------------------------------------------------------------------- metrics


def descriptor_distance(original: np.ndarray, edited: np.ndarray) -> float:
    """Euclidean distance of two 128-d dlib face descriptors (< 0.6: the same person)."""
    return float(np.linalg.norm(np.asarray(original, np.float64) - np.asarray(edited, np.float64)))


def mouth_width(landmarks: np.ndarray) -> float:
    """Mouth width in pixels: the distance between the mouth corners, landmarks 48 and 54."""
    points = np.asarray(landmarks, dtype=np.float64)
    return float(np.hypot(*(points[54] - points[48])))


def mouth_ratio(original: np.ndarray, edited: np.ndarray) -> float:
    """Mouth width of the edited face's landmarks / the original's − 1."""
    return mouth_width(edited) / max(mouth_width(original), 1e-9) - 1.0


def yaw_degrees(crop_landmarks: np.ndarray, side: int) -> float:
    """Yaw in degrees of 68 landmarks in an aligned ``side``² crop (score_geometry.head_pose; > 0: to the right)."""
    yaw, _ = head_pose(np.asarray(crop_landmarks, dtype=np.float64)[None], side, side)
    return float(yaw[0])


def mean_lab(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean CIELAB [3] of ``image``'s pixels in ``mask`` (per pixel: OpenCV's float Lab is coarse, the mean is not)."""
    pixels = image[mask].reshape(-1, 1, 3).astype(np.float32) / 255.0  # [N, 1, 3] RGB in [0, 1]
    return cv2.cvtColor(pixels, cv2.COLOR_RGB2Lab).reshape(-1, 3).astype(np.float64).mean(axis=0)


def skin_delta_e(original: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    """CIE76 ΔE between the mean skin colours of ``original`` and ``edited`` in ``mask``."""
    if not mask.any():
        return float("nan")
    return float(np.linalg.norm(mean_lab(original, mask) - mean_lab(edited, mask)))


def gradient_energy(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude of the grey image (0–255 levels) over ``mask``."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return float((gx * gx + gy * gy)[mask].mean()) if mask.any() else float("nan")


def gradient_ratio(original: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    """Gradient energy of ``edited`` / that of ``original`` over ``mask`` (> 1: a new edge or seam)."""
    return gradient_energy(edited, mask) / max(gradient_energy(original, mask), 1e-9)


def changed_fraction(
    original: np.ndarray, edited: np.ndarray, mask: np.ndarray, threshold: float = CHANGE_THRESHOLD
) -> float:
    """Fraction of ``mask``'s pixels differing by more than ``threshold`` on any channel after a 3×3 box blur."""
    if not mask.any():
        return float("nan")
    difference = np.abs(cv2.blur(original, (3, 3)).astype(np.int16) - cv2.blur(edited, (3, 3)).astype(np.int16))
    return float((difference.max(axis=2) > threshold)[mask].mean())


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of one shape (inf when identical)."""
    error = float(np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2))
    return float("inf") if error == 0 else 10.0 * math.log10(255.0**2 / error)
