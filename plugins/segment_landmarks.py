"""The embedded default segmenter: face and hair masks from dlib's 68 landmarks and a GrabCut, fully offline.

It parses FFHQ-aligned crops (the generator's inner crop or the wider outer crop around it) of any size,
128² to 1536². The steps:

1. **Where is the face?** dlib's HOG detector runs on a working copy ``DETECT_SIZE`` pixels wide; the
   detection nearest the centre is used. When it finds nothing, the face box of an aligned crop is
   canonical (:data:`CANONICAL_BOX`, measured from dlib's own detections on aligned photos), so both
   the inner-crop box and the outer-crop box (the same box shrunk about the centre by
   ``DEFAULT_OUTER_FACTOR``) are tried, and the one whose predicted landmarks agree best with it wins.
2. **Landmarks**: dlib's 68-point predictor (from ``face-recognition-models``) in that box.
3. **Face** = the jaw line (points 0–16) closed over the forehead by the upper half of an ellipse through
   points 0 and 16 whose top lies ``FOREHEAD_FRACTION`` (0.4) × the brow-to-chin height above the brows'
   midpoint, united with the convex hull of all 68 points. (By the rule of thirds the hairline lies 0.5 ×
   brow-to-chin above the brows; 0.4 stops short of it, so a fringe is mostly left to the hair mask.)
   The edge is soft outward only: 1 on the polygon, falling to 0 over ``FEATHER_FRACTION`` × the jaw
   width outside it, so the landmarks' hull is always fully inside.
4. **Hair**: OpenCV GrabCut separates the head from the background on a working copy at most
   ``HAIR_SIZE`` pixels wide. Seeds: the face polygon is certain head; an ellipse around and above it
   (``HEAD_SEED``, reaching the shoulders) probable head; the crop's top edge, its side edges above the
   mouth and the neck / clothes region below the mouth are certain background (the lower edges are
   left out: long hair often reaches them); the rest probable background. The head found is limited
   to the ellipse ``HEAD_LIMIT``, opened and closed, blurred, resized back; hair = head − face.

Masks come back as float32 ``[H, W]`` in [0, 1]: ``face``, ``hair`` and ``head`` (their union).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fluidsrv_plugins._faces import check_rgb_image, import_problem
from fluidsrv_plugins.detect_dlib import predictor_path

from fluidsrv import dlib_faces, hookimpl
from fluidsrv.geometry import DEFAULT_OUTER_FACTOR, ffhq_quad
from fluidsrv.stages import PluginContext, PluginFactory, Segmenter

CANONICAL_BOX = (0.18, 0.30, 0.77, 0.89)
"""dlib's face box in an FFHQ-aligned inner crop (x0, y0, x1, y1 as fractions of the side): the median HOG
detection on aligned real photos. With it the predictor lands within ~1 px (at 256²) of the landmarks the
alignment was made from."""
BOX_WIDTH_PER_QUAD_SIDE = CANONICAL_BOX[2] - CANONICAL_BOX[0]  # box width / FFHQ quad side

DETECT_SIZE = 384  # HOG working side: an inner-crop face is ~225 px, an outer-crop face ~150 px (HOG needs 80)
HAIR_SIZE = 192  # GrabCut working side (its cost grows with the pixel count)
GRABCUT_ITERATIONS = 4
GRABCUT_SEED = 0

FOREHEAD_FRACTION = 0.4  # forehead height above the brows / brow-to-chin height
FEATHER_FRACTION = 0.04  # soft outer edge of the face mask / face width
BORDER_FRACTION = 0.02  # crop border band that is certain background / crop side

# Regions for the GrabCut, in face units: "across" in jaw half-widths from the jaw's centre line,
# "rise" in brow-to-chin heights above the jaw centre (top) or below the brows (bottom).
HEAD_SEED = (1.7, 0.6, 1.1)  # probable head: half-width, top above the forehead top, bottom below the brows
HEAD_LIMIT = (1.9, 0.8, 1.3)  # the head is never outside this ellipse
NECK_HALF_WIDTH = 0.75  # below the mouth and within this many half-widths of the centre line: neck, clothes

JAW = slice(0, 17)
BROWS = slice(17, 27)
CHIN = 8
MOUTH = 66  # centre of the lower inner lip


@dataclass(frozen=True)
class FaceFrame:
    """The face's own axes, measured from its 68 landmarks (image pixels)."""

    landmarks: np.ndarray  # [68, 2]
    jaw_centre: np.ndarray  # [2] midpoint of jaw points 0 and 16 (about eye level at the face's sides)
    across: np.ndarray  # [2] half of the vector from point 0 to point 16
    up: np.ndarray  # [2] unit vector from the chin to the brows
    height: float  # brow-to-chin distance

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray) -> FaceFrame:
        """Measure the frame of 68 iBUG landmarks [68, 2]."""
        assert landmarks.shape == (68, 2), landmarks.shape
        chin_to_brows = landmarks[BROWS].mean(axis=0) - landmarks[CHIN]
        height = float(np.hypot(*chin_to_brows))
        across = (landmarks[16] - landmarks[0]) / 2
        if not height > 0 or not np.hypot(*across) > 0:
            raise ValueError("degenerate landmarks: the face has no height or width")
        return cls(landmarks, (landmarks[0] + landmarks[16]) / 2, across, chin_to_brows / height, height)

    @property
    def half_width(self) -> float:
        """Half of the jaw's width (points 0 to 16), in pixels."""
        return float(np.hypot(*self.across))

    def rise_of(self, point: np.ndarray) -> float:
        """How far ``point`` [2] lies above the jaw centre along ``up``, in brow-to-chin heights."""
        return float(np.dot(point - self.jaw_centre, self.up)) / self.height

    @property
    def brow_rise(self) -> float:
        """The brows' midpoint above the jaw centre, in brow-to-chin heights."""
        return self.rise_of(self.landmarks[BROWS].mean(axis=0))

    @property
    def forehead_rise(self) -> float:
        """The forehead's top above the jaw centre, in brow-to-chin heights."""
        return max(self.brow_rise, 0.0) + FOREHEAD_FRACTION

    def face_polygon(self, arc_points: int = 24) -> np.ndarray:
        """The jaw line (0 → 16) closed by the forehead arc (16 → 0): [17 + arc_points, 2] pixels."""
        angles = np.linspace(0.0, math.pi, arc_points + 2)[1:-1]  # [arc_points] strictly between 16 and 0
        rise = self.forehead_rise * self.height * self.up  # [2]
        arc = self.jaw_centre + np.cos(angles)[:, None] * self.across + np.sin(angles)[:, None] * rise
        return np.concatenate([self.landmarks[JAW], arc])  # [17 + arc_points, 2]

    def coordinates(self, shape: tuple[int, int], scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Face coordinates of every pixel centre of an image ``scale`` × the landmarks' size.

        Returns (across [H, W] in jaw half-widths from the centre line, rise [H, W] in brow-to-chin
        heights above the jaw centre).
        """
        ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32) / scale  # [H, W] each
        dx, dy = xs - self.jaw_centre[0], ys - self.jaw_centre[1]
        unit_across = self.across / self.half_width
        across = (dx * unit_across[0] + dy * unit_across[1]) / self.half_width
        rise = (dx * self.up[0] + dy * self.up[1]) / self.height
        return across, rise

    def head_ellipse(
        self, coordinates: tuple[np.ndarray, np.ndarray], half_width: float, top: float, bottom: float
    ) -> np.ndarray:
        """Bool [H, W]: inside the ellipse ``half_width`` half-widths wide, from ``top`` heights above the
        forehead's top down to ``bottom`` heights below the brows."""
        across, rise = coordinates
        upper, lower = self.forehead_rise + top, self.brow_rise - bottom
        centre, half_height = (upper + lower) / 2, (upper - lower) / 2
        inside: np.ndarray = (across / half_width) ** 2 + ((rise - centre) / half_height) ** 2 <= 1.0
        return inside

    def upper_border(self, coordinates: tuple[np.ndarray, np.ndarray], width: int) -> np.ndarray:
        """Bool [H, W]: the image's top edge and its side edges above the mouth, ``width`` pixels wide.

        Long hair and shoulders often reach the lower edges, so those are left to the colour model.
        """
        _, rise = coordinates
        band = np.zeros(rise.shape, dtype=bool)
        band[:width] = True
        band[:, :width] = band[:, -width:] = True
        above_mouth: np.ndarray = band & (rise > self.rise_of(self.landmarks[MOUTH]))
        above_mouth[:width] = True
        return above_mouth

    def neck_region(self, coordinates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Bool [H, W]: below the mouth and near the centre line, where the chin, neck and clothes are."""
        across, rise = coordinates
        region: np.ndarray = (rise < self.rise_of(self.landmarks[MOUTH])) & (np.abs(across) < NECK_HALF_WIDTH)
        return region


def fill_polygon(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    """Return a bool mask [H, W] of the pixels whose centres lie inside ``polygon`` [N, 2] (sub-pixel exact)."""
    shift = 4  # cv2 draws with 4 fractional bits
    points = np.round(np.asarray(polygon, dtype=np.float64) * (1 << shift)).astype(np.int32)  # [N, 2]
    canvas = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(canvas, [points], 1, lineType=cv2.LINE_8, shift=shift)
    return canvas.astype(bool)


def soften_outward(mask: np.ndarray, width: float) -> np.ndarray:
    """Return float32 [H, W]: 1 on ``mask`` (bool), falling smoothly to 0 over ``width`` pixels outside it."""
    if width <= 0 or not mask.any():
        return mask.astype(np.float32)
    outside = (~mask).astype(np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # [H, W] px to the mask
    ramp = np.clip(1.0 - distance / width, 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)  # smoothstep


def resize_to(image: np.ndarray, side: int) -> np.ndarray:
    """Resize a square-ish image so its width is ``side`` (area when shrinking, linear when growing)."""
    height, width = image.shape[:2]
    scale = side / width
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (side, max(1, round(height * scale))), interpolation=interpolation)


class LandmarkSegmenter:
    """Face (landmark polygon) and hair (GrabCut) masks of an aligned face crop."""

    def __init__(self, predictor_file: Path, outer_factor: float = DEFAULT_OUTER_FACTOR) -> None:
        import dlib

        assert outer_factor >= 1.0, outer_factor
        self._dlib: Any = dlib
        self._detector = dlib_faces.frontal_detector()  # shared with the other dlib users of this process
        self._predictor = dlib_faces.shape_predictor(predictor_file)
        self.outer_factor = outer_factor

    def parse(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Return float32 masks [H, W] in [0, 1]: "face", "hair" and "head" (their union)."""
        check_rgb_image(image)
        height, width = image.shape[:2]
        frame = FaceFrame.from_landmarks(self.landmarks(image))
        face_shape = fill_polygon((height, width), frame.face_polygon()) | fill_polygon(
            (height, width), cv2.convexHull(frame.landmarks.astype(np.float32))[:, 0]
        )
        face = soften_outward(face_shape, FEATHER_FRACTION * 2 * frame.half_width)
        head = np.maximum(self.head(image, frame, face_shape), face)  # [H, W]
        hair = (head - face).astype(np.float32)
        return {"face": face, "hair": hair, "head": head.astype(np.float32)}

    # -- landmarks --

    def landmarks(self, image: np.ndarray) -> np.ndarray:
        """Return the 68 landmarks [68, 2] of the face of an aligned crop, in its pixels."""
        height, width = image.shape[:2]
        boxes = self._detected_boxes(image)
        if not boxes:
            boxes = [self._canonical_box(width, height, 1.0), self._canonical_box(width, height, self.outer_factor)]
        candidates = [self._predict(image, box) for box in boxes]
        scores = [self._disagreement(points, box) for points, box in zip(candidates, boxes)]
        return candidates[int(np.argmin(scores))]

    def _detected_boxes(self, image: np.ndarray) -> list[tuple[float, float, float, float]]:
        """HOG detections (x0, y0, x1, y1 in image pixels), the one nearest the centre first; at most one."""
        height, width = image.shape[:2]
        work = cv2.cvtColor(resize_to(image, DETECT_SIZE), cv2.COLOR_RGB2GRAY)  # [h, DETECT_SIZE]
        scale = width / DETECT_SIZE
        with dlib_faces.LOCK:  # dlib does not promise thread safety
            rects, _, _ = self._detector.run(work, 0, 0.0)
        boxes = [
            (rect.left() * scale, rect.top() * scale, (rect.right() + 1) * scale, (rect.bottom() + 1) * scale)
            for rect in rects
        ]
        centre = np.array([width / 2, height / 2])
        boxes.sort(key=lambda box: float(np.hypot(*(np.array([box[0] + box[2], box[1] + box[3]]) / 2 - centre))))
        return boxes[:1]

    def _canonical_box(self, width: int, height: int, factor: float) -> tuple[float, float, float, float]:
        """The face box of an aligned crop whose inner crop is 1/``factor`` of it, about the centre."""
        x0, y0, x1, y1 = (0.5 + (value - 0.5) / factor for value in CANONICAL_BOX)
        return x0 * width, y0 * height, x1 * width, y1 * height

    def _predict(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """Run the 68-point predictor in ``box``; return [68, 2] float64."""
        x0, y0, x1, y1 = (round(value) for value in box)
        rect = self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
        with dlib_faces.LOCK:
            shape = self._predictor(image, rect)
        return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)  # [68, 2]

    @staticmethod
    def _disagreement(landmarks: np.ndarray, box: tuple[float, float, float, float]) -> float:
        """How far ``box`` is from the canonical box of the landmarks' own FFHQ quad (0 = equal), scale-free."""
        quad = ffhq_quad(landmarks)  # [4, 2] TL, BL, BR, TR
        along_x, along_y = quad[3] - quad[0], quad[1] - quad[0]
        box_x = (CANONICAL_BOX[0] + CANONICAL_BOX[2]) / 2
        box_y = (CANONICAL_BOX[1] + CANONICAL_BOX[3]) / 2
        implied_centre = quad[0] + box_x * along_x + box_y * along_y
        implied_width = BOX_WIDTH_PER_QUAD_SIDE * float(np.hypot(*along_x))
        width = box[2] - box[0]
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        offset = float(np.hypot(*(implied_centre - centre)))
        return abs(math.log(max(implied_width, 1e-6) / width)) + offset / width

    # -- head and hair --

    def head(self, image: np.ndarray, frame: FaceFrame, face_shape: np.ndarray) -> np.ndarray:
        """Return the soft head (face + hair) float32 [H, W] that GrabCut separates from the background."""
        height, width = image.shape[:2]
        side = min(width, HAIR_SIZE)
        work = resize_to(image, side)  # [h, side, 3]
        work_shape = (work.shape[0], work.shape[1])
        coordinates = frame.coordinates(work_shape, scale=side / width)

        seeds = np.full(work_shape, cv2.GC_PR_BGD, dtype=np.uint8)
        seeds[frame.head_ellipse(coordinates, *HEAD_SEED)] = cv2.GC_PR_FGD
        seeds[frame.neck_region(coordinates)] = cv2.GC_BGD
        seeds[cv2.resize(face_shape.astype(np.uint8), work_shape[::-1], interpolation=cv2.INTER_AREA) > 0] = cv2.GC_FGD
        seeds[frame.upper_border(coordinates, max(1, round(BORDER_FRACTION * side)))] = cv2.GC_BGD

        background_model = np.zeros((1, 65), np.float64)
        foreground_model = np.zeros((1, 65), np.float64)
        try:
            cv2.setRNGSeed(GRABCUT_SEED)  # its k-means start draws from OpenCV's thread RNG: same image, same mask
            cv2.grabCut(
                work, seeds, (0, 0, 0, 0), background_model, foreground_model, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK
            )
        except cv2.error:  # e.g. a degenerate colour model on a tiny or flat image: no hair found
            return np.zeros((height, width), np.float32)
        head = ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)) & frame.head_ellipse(coordinates, *HEAD_LIMIT)
        head = _clean(head, radius=max(1, round(0.01 * side)))
        soft = cv2.GaussianBlur(head.astype(np.float32), (0, 0), max(0.5, 0.006 * side))
        return np.clip(cv2.resize(soft, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def _clean(mask: np.ndarray, radius: int) -> np.ndarray:
    """Open then close ``mask`` (bool) by a disc: drop specks and fill pinholes."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    return cv2.morphologyEx(opened, cv2.MORPH_CLOSE, kernel).astype(bool)


def _unavailable(context: PluginContext) -> str | None:
    return import_problem("dlib", "pip install dlib-bin") or dlib_faces.unavailable_reason(dlib_faces.PREDICTOR_68)


def _create(context: PluginContext) -> LandmarkSegmenter:
    path = predictor_path()
    assert path is not None
    return LandmarkSegmenter(path, outer_factor=float(context.options.get("outer_factor", DEFAULT_OUTER_FACTOR)))


@hookimpl
def fluidsrv_segmenters() -> list[PluginFactory[Segmenter]]:
    """Register the landmark + GrabCut segmenter (the embedded default)."""
    return [
        PluginFactory(
            "landmarks",
            "dlib 68-point face polygon with a forehead arc; hair by GrabCut around it (offline, no weights)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
