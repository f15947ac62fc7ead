"""Face geometry of aligned faces from dlib's 68 landmarks: smile, open mouth, open eyes, head yaw and pitch.

The images are FFHQ-aligned inner crops (the generator's renders: 128² by default, any size ≥ 64). The face
of such a crop is where alignment put it, so the HOG detector is not run: the 68-point predictor of
:mod:`fluidsrv.dlib_faces` runs directly in the canonical face box
(:data:`fluidsrv_plugins.segment_landmarks.CANONICAL_BOX`) on a grey copy upscaled to ``work_size`` pixels
(option, default :data:`WORK_SIZE`; dlib returns whole-pixel landmarks, so at 128² an eye's height of ~4 px
would move in steps of 25 %). The landmarks then go through small pure functions on arrays [N, 68, 2]:

* ``smile``: mouth width (corners 48–54) / inter-ocular distance (eye centres, means of 36–41 and 42–47).
* ``mouth_open``: inner-lip gap (mean of |61–67|, |62–66|, |63–65|) / mouth width.
* ``eyes_open``: the mean eye aspect ratio of both eyes (Soukupová & Čech 2016):
  EAR = (|p2 − p6| + |p3 − p5|) / (2 |p1 − p4|) with p1…p6 the six points of one eye's contour.
* ``yaw`` and ``pitch`` in degrees: ``cv2.solvePnP`` of a generic 3-D face (:data:`TEMPLATE_MM`) in a pinhole
  camera of focal length = image width and principal point at the image centre. **Sign convention**: yaw > 0
  when the face turns toward the viewer's right (the person's left), so a mirrored image flips yaw's sign;
  pitch > 0 when the face looks up. Both are the angles of the face's forward direction (the template's +z
  axis) against the camera's optical axis: yaw about the camera's vertical axis, pitch above its horizontal
  plane; roll is not reported (aligned crops are levelled). The frontal generic template is the zero, and
  real faces are not the template: on 22 aligned photos the median pitch was about +6°.

**Degenerate landmarks**: when the predictor's output makes no sense as a face (the inter-ocular distance is
under :data:`MIN_INTEROCULAR` = 5 % of the image width, a mouth or eye has zero width, or a value is not
finite) every attribute of that image is NaN; when only the pose fit fails, ``yaw`` and ``pitch`` are NaN.
Callers averaging scores should use ``torch.nanmean``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from fluidsrv_plugins._faces import import_problem
from fluidsrv_plugins.segment_landmarks import CANONICAL_BOX

from fluidsrv import dlib_faces, hookimpl
from fluidsrv.stages import PluginContext, PluginFactory, Scorer

ATTRIBUTES = ("smile", "mouth_open", "eyes_open", "yaw", "pitch")
WORK_SIZE = 512  # side the predictor sees: its whole-pixel output is then 1/4 px at 128²
# (measured on 22 aligned photos at 128²: against 128² native, 512² cuts the change of the attributes under
# a half-pixel shift by 2-4x and under a mirror by 1.3-2x, at the same ~1 ms per face; 768² gains little)
MIN_SIDE = 64
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as OpenCV's RGB2GRAY
MIN_INTEROCULAR = 0.05  # below this fraction of the image width the landmarks are degenerate

LEFT_EYE = slice(36, 42)  # the viewer's left eye (the person's right), p1…p6 of the EAR
RIGHT_EYE = slice(42, 48)
MOUTH_LEFT, MOUTH_RIGHT = 48, 54
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))  # upper / lower inner-lip points facing each other

# The generic head: the six-point model of the usual OpenCV + dlib head-pose recipe (popularised by
# LearnOpenCV's "Head Pose Estimation using OpenCV and Dlib"): nose tip at the origin, x toward the viewer's
# right of a frontal face, y up, z out of the face toward the viewer. That model comes in arbitrary units
# with the outer eye corners 450 apart; it is scaled here by 0.2 so they are 90 mm apart, about an adult's
# outer-canthus width. Only the shape matters for the angles: the scale just sets the fitted distance.
TEMPLATE_POINTS = (30, 8, 36, 45, 48, 54)  # the dlib landmarks the rows of TEMPLATE_MM stand for
TEMPLATE_MM = np.array(
    [
        [0.0, 0.0, 0.0],  # 30 nose tip
        [0.0, -66.0, -13.0],  # 8 chin
        [-45.0, 34.0, -27.0],  # 36 outer corner of the viewer's left eye
        [45.0, 34.0, -27.0],  # 45 outer corner of the viewer's right eye
        [-30.0, -30.0, -25.0],  # 48 viewer's left mouth corner
        [30.0, -30.0, -25.0],  # 54 viewer's right mouth corner
    ]
)  # [6, 3] millimetres
FRONTAL_RVEC = np.array([math.pi, 0.0, 0.0])  # template -> camera (x right, y down, z forward) when frontal


# ---------------------------------------------------------------------------------------------------- geometry


def _distance(points: np.ndarray, first: int | np.ndarray, second: int | np.ndarray) -> np.ndarray:
    """Distances [N, ...] between landmark(s) ``first`` and ``second`` of points [N, 68, 2]."""
    return np.linalg.norm(points[:, first] - points[:, second], axis=-1)  # [N, ...]


def eye_centres(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centres [N, 2] of the viewer's left and right eyes of landmarks [N, 68, 2]."""
    return points[:, LEFT_EYE].mean(axis=1), points[:, RIGHT_EYE].mean(axis=1)  # [N, 2] each


def interocular(points: np.ndarray) -> np.ndarray:
    """The distance [N] between the eye centres of landmarks [N, 68, 2]."""
    left, right = eye_centres(points)
    return np.linalg.norm(right - left, axis=-1)  # [N]


def mouth_width(points: np.ndarray) -> np.ndarray:
    """The distance [N] between the mouth corners (48, 54) of landmarks [N, 68, 2]."""
    return _distance(points, MOUTH_LEFT, MOUTH_RIGHT)  # [N]


def smile(points: np.ndarray) -> np.ndarray:
    """Mouth width / inter-ocular distance [N] of landmarks [N, 68, 2]."""
    return mouth_width(points) / interocular(points)  # [N]


def mouth_open(points: np.ndarray) -> np.ndarray:
    """Mean inner-lip gap / mouth width [N] of landmarks [N, 68, 2]."""
    upper, lower = (np.array(side) for side in zip(*INNER_LIP_PAIRS))  # [3] each
    gap = _distance(points, upper, lower).mean(axis=1)  # [N]
    return gap / mouth_width(points)  # [N]


def eye_aspect_ratio(eye: np.ndarray) -> np.ndarray:
    """Soukupová & Čech's EAR [N] of one eye's six contour points [N, 6, 2] (p1…p6)."""
    p1, p2, p3, p4, p5, p6 = (eye[:, index] for index in range(6))  # [N, 2] each
    height = np.linalg.norm(p2 - p6, axis=-1) + np.linalg.norm(p3 - p5, axis=-1)  # [N]
    return height / (2.0 * np.linalg.norm(p1 - p4, axis=-1))  # [N]


def eyes_open(points: np.ndarray) -> np.ndarray:
    """The mean EAR [N] of both eyes of landmarks [N, 68, 2]."""
    return (eye_aspect_ratio(points[:, LEFT_EYE]) + eye_aspect_ratio(points[:, RIGHT_EYE])) / 2  # [N]


def degenerate(points: np.ndarray, width: float) -> np.ndarray:
    """Which faces [N] (bool) of landmarks [N, 68, 2] make no sense in an image ``width`` pixels wide."""
    with np.errstate(invalid="ignore"):
        eye_widths = _distance(points, np.array([36, 42]), np.array([39, 45])).min(axis=1)  # [N]
        finite = np.isfinite(points).all(axis=(1, 2))  # [N]
        return (
            ~finite | ~(interocular(points) >= MIN_INTEROCULAR * width) | ~(mouth_width(points) > 0) | ~(eye_widths > 0)
        )


# -------------------------------------------------------------------------------------------------------- pose


def camera_matrix(width: int, height: int) -> np.ndarray:
    """The pinhole intrinsics [3, 3]: focal length = ``width`` px, principal point at the image centre."""
    return np.array([[width, 0.0, (width - 1) / 2], [0.0, width, (height - 1) / 2], [0.0, 0.0, 1.0]])


def yaw_pitch(rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Yaw and pitch [N] in degrees of template-to-camera rotations [N, 3, 3] (signs: see the module doc)."""
    forward = rotations[:, :, 2]  # [N, 3] the template's +z (out of the face) in camera axes (y down)
    yaw = np.degrees(np.arctan2(forward[:, 0], -forward[:, 2]))  # [N]
    pitch = np.degrees(np.arctan2(-forward[:, 1], np.hypot(forward[:, 0], forward[:, 2])))  # [N]
    return yaw, pitch


def solve_rotation(image_points: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """The template-to-camera rotation [3, 3] fitting the template's points [6, 2] (pixels), or None."""
    intrinsics = camera_matrix(width, height)
    eye_span = float(np.linalg.norm(image_points[3] - image_points[2]))
    if not eye_span > 0:
        return None
    depth = width * float(TEMPLATE_MM[3, 0] - TEMPLATE_MM[2, 0]) / eye_span  # frontal guess: the eyes' scale
    nose = image_points[0]  # [2] the template's origin
    translation = np.array(
        [(nose[0] - intrinsics[0, 2]) * depth / width, (nose[1] - intrinsics[1, 2]) * depth / width, depth]
    )
    rvec, tvec = FRONTAL_RVEC.copy().reshape(3, 1), translation.reshape(3, 1)
    found, rvec, tvec = cv2.solvePnP(
        TEMPLATE_MM, image_points.astype(np.float64), intrinsics, None, rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE
    )
    if not found or not np.all(np.isfinite(rvec)) or not float(tvec[2, 0]) > 0:
        return None
    rotation, _ = cv2.Rodrigues(rvec)  # [3, 3]
    return np.asarray(rotation, dtype=np.float64)


def head_pose(points: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Yaw and pitch [N] in degrees of landmarks [N, 68, 2] in a ``width`` × ``height`` image (NaN: no fit)."""
    rotations = np.full((points.shape[0], 3, 3), np.nan)  # [N, 3, 3]
    for index, face in enumerate(points[:, TEMPLATE_POINTS]):  # face [6, 2]
        if np.all(np.isfinite(face)):
            rotation = solve_rotation(face, width, height)
            if rotation is not None:
                rotations[index] = rotation
    return yaw_pitch(rotations)


def measure(points: np.ndarray, width: int, height: int) -> dict[str, np.ndarray]:
    """Every attribute [N] (float64) of landmarks [N, 68, 2] in a ``width`` × ``height`` image; NaN: degenerate."""
    points = np.asarray(points, dtype=np.float64)
    assert points.ndim == 3 and points.shape[1:] == (68, 2), f"expected [N, 68, 2], got {points.shape}"
    usable = np.where(degenerate(points, width)[:, None, None], np.nan, points)  # [N, 68, 2] NaN where degenerate
    yaw, pitch = head_pose(usable, width, height)  # skips the NaN faces
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = {"smile": smile(usable), "mouth_open": mouth_open(usable), "eyes_open": eyes_open(usable)}
    return ratios | {"yaw": yaw, "pitch": pitch}  # [N] each


# --------------------------------------------------------------------------------------------------- landmarks


def canonical_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The predictor's box (left, top, right, bottom; inclusive pixels) in an aligned crop ``width`` × ``height``."""
    x0, y0, x1, y1 = CANONICAL_BOX
    return round(x0 * width), round(y0 * height), round(x1 * width) - 1, round(y1 * height) - 1


def to_grey_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [N, 3, H, W] in [-1, 1] -> uint8 grey levels [N, H, W]."""
    # numpy rather than torch: element-wise and single-threaded, it is several times faster than torch's
    # thread pool on a busy CPU, and the float copy off an accelerator is small at render sizes
    rgb = images.detach().to("cpu", torch.float32).numpy()  # [N, 3, H, W]
    grey = GREY_WEIGHTS[0] * rgb[:, 0] + GREY_WEIGHTS[1] * rgb[:, 1] + GREY_WEIGHTS[2] * rgb[:, 2]  # [N, H, W]
    return np.clip(np.rint((grey + 1.0) * 127.5), 0, 255).astype(np.uint8)  # [N, H, W]


def predict_landmarks(grey: np.ndarray, work_size: int = WORK_SIZE) -> np.ndarray:
    """The 68 landmarks [N, 68, 2] (float64, image pixel centres) of aligned faces, uint8 grey [N, H, W]."""
    import dlib

    count, height, width = grey.shape
    upscale = max(1.0, work_size / width)
    work_w, work_h = round(width * upscale), round(height * upscale)
    rect = dlib.rectangle(*canonical_box(work_w, work_h))
    predictor = dlib_faces.shape_predictor()
    points = np.empty((count, 68, 2))  # [N, 68, 2] working pixels
    for index, image in enumerate(grey):  # image [H, W]
        if (work_w, work_h) != (width, height):
            image = cv2.resize(image, (work_w, work_h), interpolation=cv2.INTER_CUBIC)  # [h, w]
        with dlib_faces.LOCK:
            shape = predictor(np.ascontiguousarray(image), rect)
        points[index] = [(point.x, point.y) for point in shape.parts()]
    scale = np.array([width / work_w, height / work_h])  # [2] image px per working px
    return (points + 0.5) * scale - 0.5  # [N, 68, 2] pixel centres map onto pixel centres


# ------------------------------------------------------------------------------------------------------ scorer


class GeometryScorer:
    """Smile, open mouth, open eyes, yaw and pitch of aligned faces from dlib's 68 landmarks."""

    attributes: tuple[str, ...] = ATTRIBUTES

    def __init__(self, work_size: int = WORK_SIZE) -> None:
        assert work_size >= MIN_SIDE, f"work_size must be at least {MIN_SIDE}, got {work_size}"
        self.work_size = work_size
        dlib_faces.shape_predictor()  # load (once per process) now rather than on the first score

    def landmarks(self, images: torch.Tensor) -> np.ndarray:
        """The 68 landmarks [N, 68, 2] (image pixels) of aligned faces [N, 3, H, W] in [-1, 1]."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(images.shape)}"
        assert min(images.shape[2:]) >= MIN_SIDE, f"faces must be at least {MIN_SIDE} px, got {tuple(images.shape)}"
        return predict_landmarks(to_grey_uint8(images), self.work_size)

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return each attribute [N] (float32; NaN where the landmarks are degenerate) for images [N, 3, H, W]."""
        height, width = images.shape[2:]
        values = measure(self.landmarks(images), width, height)
        return {name: torch.from_numpy(value).float() for name, value in values.items()}


def _unavailable(context: PluginContext) -> str | None:
    return import_problem("dlib", "pip install dlib-bin") or dlib_faces.unavailable_reason(dlib_faces.PREDICTOR_68)


def _create(context: PluginContext) -> GeometryScorer:
    return GeometryScorer(int(context.options.get("work_size", WORK_SIZE)))


@hookimpl
def fluidsrv_scorers() -> list[PluginFactory[Scorer]]:
    """Register the landmark geometry scorer."""
    return [
        PluginFactory(
            "geometry",
            "Face geometry from dlib's 68 landmarks: smile, mouth_open, eyes_open (ratios), yaw and pitch (degrees)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
