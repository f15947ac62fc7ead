"""Predict the new head's face+hair map over the whole outer crop, not only inside the inner crop.

Finalize parses the new inner face (the render) and the old outer crop (the photo). Inside the inner crop the
new head is known; outside it (the hair above and beside the inner crop) it is not. A predictor fills that in
from the old outer map and, when they were found, the landmarks' motion between the unedited and the edited
render of the same generator (:class:`LandmarkMotion`):

* ``inner`` (the baseline): the new head is the inner parse alone; outside the inner crop nothing of the old
  head is kept, so the seam there is inpainted;
* ``affine``: a similarity transform fitted to the rigid landmarks (jaw, brows, nose, eyes), fading to no motion
  at the outer crop's border, moves the old outer map (and the old pixels that carry it);
* ``tps``: a thin-plate spline through the same landmarks, pinned at the outer crop's border.

A prediction (:class:`OuterHead`) is the new head map and, for the warps, where each pixel's content comes from
in the old crop (``source``, a ``cv2.remap`` map) and the old head moved with it (``carried``). With no motion
(no landmarks, or a predictor that needs none) every predictor gives the baseline.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from fluidsrv import dlib_faces

log = logging.getLogger(__name__)

RIGID_POINTS = np.r_[0:17, 17:27, 27:36, 36:48]
"""The 68-point indices whose motion is the head's: jaw, brows, nose and eyes (the mouth moves on its own)."""
BORDER_ANCHORS = 8  # pinned points per side of the outer crop (the thin-plate spline)
TPS_SMOOTHING = 1e-3  # the spline's regularisation, in units of the outer side squared
FLOW_STRIDE = 4  # the warp is evaluated every this many pixels and interpolated (it is smooth)
MAX_MOTION = 0.25  # landmarks moved by more than this × the inner side (median): a failed detection


@dataclass(frozen=True)
class LandmarkMotion:
    """The 68 landmarks [68, 2] of the unedited (``old``) and the edited (``new``) render, in inner-crop pixels."""

    old: np.ndarray
    new: np.ndarray

    def __post_init__(self) -> None:
        if self.old.shape != (68, 2) or self.new.shape != (68, 2):
            raise ValueError(f"expected two [68, 2] landmark arrays, got {self.old.shape} and {self.new.shape}")

    def in_outer(self, offset: int) -> LandmarkMotion:
        """The same motion in outer-crop pixels (the inner crop sits ``offset`` pixels in)."""
        return LandmarkMotion(self.old + offset, self.new + offset)


@dataclass(frozen=True)
class OuterHead:
    """A predicted new head over the outer crop (all [So, So])."""

    head: np.ndarray  # bool: the new face+hair (the inner parse inside the inner crop)
    carried: np.ndarray | None = None  # bool: the old head moved into the new frame (None: nothing is carried)
    source: np.ndarray | None = None  # float32 [So, So, 2]: (x, y) in the old crop of each pixel (None: in place)

    def kept(self, inner_region: np.ndarray) -> np.ndarray:
        """Bool: outside the inner crop, where the new head is shown with the old crop's (moved) pixels."""
        if self.carried is None:
            return np.zeros_like(self.head)
        kept: np.ndarray = self.head & self.carried & ~inner_region
        return kept

    def moved(self, image: np.ndarray) -> np.ndarray:
        """``image`` (the old outer crop, any dtype [So, So, ...]) moved into the new frame."""
        if self.source is None:
            return image
        return cv2.remap(image, self.source[..., 0], self.source[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)


class OuterHeadPredictor(Protocol):
    """Predicts the new outer face+hair map from the old one, the new inner parse and the landmarks' motion."""

    name: str
    uses_motion: bool  # whether it needs the landmarks' motion (a caller may skip finding them otherwise)

    def predict(self, old_head: np.ndarray, inner_head: np.ndarray, inner_region: np.ndarray,
                motion: LandmarkMotion | None) -> OuterHead:
        """``old_head``: bool [So, So] of the old outer crop; ``inner_head``: the new inner parse placed in the
        outer frame; ``inner_region``: where the inner crop is; ``motion``: in outer-crop pixels, or None."""
        ...


class InnerOnly:
    """The baseline: the new head is the inner parse alone."""

    name = "inner"
    uses_motion = False

    def predict(self, old_head: np.ndarray, inner_head: np.ndarray, inner_region: np.ndarray,
                motion: LandmarkMotion | None) -> OuterHead:
        """The inner parse, inside the inner crop."""
        return OuterHead(head=inner_head & inner_region)


class LandmarkWarp:
    """The old outer map moved by the landmarks' motion outside the inner crop, the inner parse inside it."""

    uses_motion = True

    def __init__(self, method: str) -> None:
        if method not in ("affine", "tps"):
            raise ValueError(f"unknown warp {method!r}: affine or tps")
        self.name = method

    def predict(self, old_head: np.ndarray, inner_head: np.ndarray, inner_region: np.ndarray,
                motion: LandmarkMotion | None) -> OuterHead:
        """The warped old head outside the inner crop; the baseline when there is no motion."""
        if motion is None:
            return InnerOnly().predict(old_head, inner_head, inner_region, None)
        side = old_head.shape[0]
        displacement = affine_displacement if self.name == "affine" else spline_displacement
        source = source_map(side, displacement(motion, side, inner_margin(inner_region)))
        carried = cv2.remap(old_head.astype(np.float32), source[..., 0], source[..., 1], cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE) >= 0.5
        head = np.where(inner_region, inner_head, carried)
        return OuterHead(head=head, carried=carried, source=source)


PREDICTORS = ("inner", "affine", "tps")
DEFAULT_PREDICTOR = "affine"


def predictor(name: str) -> OuterHeadPredictor:
    """The predictor called ``name`` (one of :data:`PREDICTORS`)."""
    if name == "inner":
        return InnerOnly()
    if name in ("affine", "tps"):
        return LandmarkWarp(name)
    raise ValueError(f"unknown outer head predictor {name!r}: one of {', '.join(PREDICTORS)}")


# ---------------------------------------------------------------------------------------------- warps


def inner_margin(inner_region: np.ndarray) -> int:
    """Pixels between the outer crop's edge and the inner region (its first row that is set)."""
    rows = np.flatnonzero(inner_region.any(axis=1))
    return int(rows[0]) if rows.size else 0


def grid_points(side: int) -> np.ndarray:
    """Pixel centres [n, n, 2] (x, y) of the coarse grid the warp is evaluated on (every FLOW_STRIDE pixels)."""
    coarse = np.arange(0, side + FLOW_STRIDE - 1, FLOW_STRIDE, dtype=np.float64)  # reaches the last pixel
    xs, ys = np.meshgrid(coarse, coarse)
    return np.stack([xs, ys], axis=-1)


def source_map(side: int, coarse_displacement: np.ndarray) -> np.ndarray:
    """The remap source [side, side, 2] float32: each pixel plus the displacement, interpolated from the grid."""
    n = coarse_displacement.shape[0]
    span = (n - 1) * FLOW_STRIDE  # the grid's last point, in pixels
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    fine = cv2.remap(coarse_displacement.astype(np.float32), xs / FLOW_STRIDE, ys / FLOW_STRIDE, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)  # [side, side, 2]
    assert span >= side - 1
    return np.stack([xs + fine[..., 0], ys + fine[..., 1]], axis=-1).astype(np.float32)


def border_weight(points: np.ndarray, side: int, margin: int) -> np.ndarray:
    """[...]: 1 from ``margin`` pixels inside the outer crop's edge inward, smoothly down to 0 at the edge."""
    from_edge = np.minimum(points, side - 1 - points).min(axis=-1)  # [...]
    t = np.clip(from_edge / max(margin, 1), 0.0, 1.0)
    weight: np.ndarray = t * t * (3.0 - 2.0 * t)
    return weight


def fit_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares similarity [2, 3] taking ``source`` points [N, 2] onto ``target`` [N, 2] (Umeyama)."""
    mean_s, mean_t = source.mean(axis=0), target.mean(axis=0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    variance = float((centred_s**2).sum() / len(source))
    scale = float(np.trace(np.diag(singular) @ sign)) / max(variance, 1e-12)
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_t - scale * rotation @ mean_s
    return matrix


def affine_displacement(motion: LandmarkMotion, side: int, margin: int) -> np.ndarray:
    """Coarse [n, n, 2]: the similarity from new to old rigid landmarks minus identity, faded at the border."""
    matrix = fit_similarity(motion.new[RIGID_POINTS], motion.old[RIGID_POINTS])
    grid = grid_points(side)  # [n, n, 2]
    moved = grid @ matrix[:, :2].T + matrix[:, 2]
    displacement: np.ndarray = (moved - grid) * border_weight(grid, side, margin)[..., None]
    return displacement


def spline_displacement(motion: LandmarkMotion, side: int, margin: int) -> np.ndarray:
    """Coarse [n, n, 2]: a thin-plate spline from new to old rigid landmarks, pinned along the outer border."""
    edge = np.linspace(0.0, side - 1.0, BORDER_ANCHORS + 1)[:-1]
    last = np.full_like(edge, side - 1.0)
    anchors = np.concatenate([  # [4 · BORDER_ANCHORS, 2] around the border, each corner once
        np.stack([edge, np.zeros_like(edge)], 1), np.stack([last, edge], 1),
        np.stack([side - 1.0 - edge, last], 1), np.stack([np.zeros_like(edge), side - 1.0 - edge], 1)])
    controls = np.concatenate([motion.new[RIGID_POINTS], anchors]) / side  # unit-scaled, [N, 2]
    values = np.concatenate([motion.old[RIGID_POINTS] - motion.new[RIGID_POINTS], np.zeros_like(anchors)])
    grid = grid_points(side)
    weights, affine = fit_spline(controls, values, TPS_SMOOTHING)
    query = grid.reshape(-1, 2) / side
    field = spline_kernel(query, controls) @ weights + np.c_[np.ones(len(query)), query] @ affine
    return field.reshape(grid.shape)


def spline_kernel(points: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """The thin-plate kernel U(r) = r² log r² [M, N] between ``points`` [M, 2] and ``controls`` [N, 2]."""
    squared = ((points[:, None, :] - controls[None, :, :]) ** 2).sum(axis=-1)
    kernel: np.ndarray = np.where(squared > 0, squared * np.log(np.maximum(squared, 1e-300)), 0.0)
    return kernel


def fit_spline(controls: np.ndarray, values: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """The thin-plate spline through ``values`` [N, C] at ``controls`` [N, 2]: kernel weights [N, C], affine [3, C]."""
    n = len(controls)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = spline_kernel(controls, controls) + smoothing * np.eye(n)
    system[:n, n:] = np.c_[np.ones(n), controls]
    system[n:, :n] = system[:n, n:].T
    solution = np.linalg.lstsq(system, np.r_[values, np.zeros((3, values.shape[1]))], rcond=None)[0]
    return solution[:n], solution[n:]


# ---------------------------------------------------------------------------------------------- landmarks


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in a render's pixels


def upscaled(image: np.ndarray) -> tuple[np.ndarray, int]:
    """A render enlarged by an integer factor to at least ``MIN_DETECT_SIDE`` (dlib's HOG needs ~80 px faces)."""
    side = image.shape[0]
    scale = max(1, math.ceil(dlib_faces.MIN_DETECT_SIDE / side))
    if scale == 1:
        return image, 1
    return cv2.resize(image, (side * scale, side * scale), interpolation=cv2.INTER_CUBIC), scale


def detected_box(image: np.ndarray) -> Box | None:
    """The largest face HOG finds in a render, or None."""
    large, scale = upscaled(image)
    found = dlib_faces.detect(large, upsample=1)
    if not found:
        return None
    rect = found[0]
    return rect.left() / scale, rect.top() / scale, (rect.right() + 1) / scale, (rect.bottom() + 1) / scale


def usual_box(side: int) -> Box:
    """Where the face sits in an aligned ``side``² crop (dlib_faces.ALIGNED_FACE_BOX)."""
    x0, y0, x1, y1 = (fraction * side for fraction in dlib_faces.ALIGNED_FACE_BOX)
    return x0, y0, x1, y1


def render_landmarks(image: np.ndarray, box: Box | None = None) -> np.ndarray | None:
    """dlib's 68 landmarks [68, 2] of an aligned render (uint8 [R, R, 3]) in ``box`` (None: the face HOG finds,
    else the aligned crop's usual face box), or None when dlib cannot give them."""
    if dlib_faces.unavailable_reason(dlib_faces.PREDICTOR_68) is not None:
        return None
    if box is None:
        box = detected_box(image) or usual_box(image.shape[0])
    large, scale = upscaled(image)
    try:
        x0, y0, x1, y1 = (value * scale for value in box)
        points = dlib_faces.landmarks(large, dlib_faces.rectangle(x0, y0, x1 - 1, y1 - 1))
    except RuntimeError:  # dlib refused the image or its model
        return None
    return (points + 0.5) / scale - 0.5  # back to the render's pixel centres


def landmark_motion(unedited: np.ndarray, edited: np.ndarray) -> LandmarkMotion | None:
    """The landmarks' motion from the unedited to the edited render (inner-crop pixels), or None when either
    has no landmarks or they moved implausibly far (a failed detection).

    Each render's landmarks are predicted in the face box HOG finds in it; when it finds none in the edited
    render (a turned face), in the unedited render's box, else in the aligned crop's usual face box.
    """
    if dlib_faces.unavailable_reason(dlib_faces.PREDICTOR_68) is not None:
        return None
    old_box = detected_box(unedited)
    old = render_landmarks(unedited, old_box)
    new = render_landmarks(edited, detected_box(edited) or old_box)
    if old is None or new is None:
        log.info("outer head: no landmarks on the %s render; the inner parse alone", "unedited" if old is None
                 else "edited")
        return None
    moved = float(np.median(np.hypot(*(new - old).T)))
    if not math.isfinite(moved) or moved > MAX_MOTION * unedited.shape[0]:
        log.info("outer head: the landmarks moved %.1f px (a failed detection); the inner parse alone", moved)
        return None
    log.debug("outer head: the landmarks moved %.2f px (median)", moved)
    return LandmarkMotion(old, new)
