"""The embedded default detector: dlib's HOG frontal face detector + the 68-point shape predictor.

This is the canonical FFHQ recipe. Detection runs on a grey working copy of the photo, downscaled so
its longest side is at most ``max_side`` and padded so faces cut by the border are still found;
boxes are mapped back and the 68 landmarks are predicted on the original, full-resolution photo
(grey beyond its border, for faces the border cuts).
Options (``context.options``): ``max_side`` (1024), ``upsample`` (1; one more when nothing is found),
``pad_fraction`` (0.1 of the longest side).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fluidsrv_plugins._faces import check_rgb_image, five_from_68, import_problem, largest_first, make_face

from fluidsrv import dlib_faces, hookimpl
from fluidsrv.stages import Detector, Face, PluginContext, PluginFactory

PAD_GREY = 128  # constant padding: reflected borders would mirror faces into duplicates
PREDICTOR_MARGIN = 0.5  # the landmark crop extends this × the box side beyond the box


def predictor_path() -> Path | None:
    """Return the 68-point predictor shipped by ``face-recognition-models``, without importing that package."""
    return dlib_faces.model_path(dlib_faces.PREDICTOR_68)


@dataclass(frozen=True)
class WorkingImage:
    """The image the HOG detector scans and how its pixels map back to the original photo."""

    pixels: np.ndarray  # uint8 [h, w] grey, downscaled and padded
    scale: float  # working pixels per original pixel (<= 1)
    pad: int  # grey border width in working pixels

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Map a working-image pixel-edge coordinate (a box side) to the original photo's."""
        return (x - self.pad) / self.scale, (y - self.pad) / self.scale


def working_image(image: np.ndarray, max_side: int, pad_fraction: float) -> WorkingImage:
    """Return ``image`` in grey levels, downscaled to at most ``max_side`` pixels per side and padded."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # [H, W]: HOG on grey is ~1.5x faster, same faces
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        scale = size[0] / width  # the exact factor after rounding (x and y differ by < 1 px)
    pad = round(pad_fraction * max(pixels.shape[:2]))
    if pad > 0:
        pixels = cv2.copyMakeBorder(pixels, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=PAD_GREY)
    return WorkingImage(np.ascontiguousarray(pixels), scale, pad)


class DlibDetector:
    """HOG face detection with 68-point landmarks; five points are derived from the 68."""

    def __init__(self, predictor_file: Path, max_side: int = 1024, upsample: int = 1, pad_fraction: float = 0.1):
        import dlib

        assert max_side >= 64 and upsample >= 0 and 0.0 <= pad_fraction <= 1.0
        self._dlib: Any = dlib
        self._detector = dlib_faces.frontal_detector()  # shared with the other dlib users of this process
        self._predictor = dlib_faces.shape_predictor(predictor_file)
        self.max_side = max_side
        self.upsample = upsample
        self.pad_fraction = pad_fraction

    def detect(self, image: np.ndarray) -> list[Face]:
        """Return the faces in a uint8 RGB image [H, W, 3], largest first."""
        check_rgb_image(image)
        work = working_image(image, self.max_side, self.pad_fraction)
        height, width = image.shape[:2]
        faces = []
        with dlib_faces.LOCK:  # dlib does not promise thread safety
            for rect, score in self._scan(work.pixels):
                x0, y0 = work.to_original(rect.left(), rect.top())
                x1, y1 = work.to_original(rect.right() + 1, rect.bottom() + 1)
                landmarks68 = self._landmarks(image, (round(x0), round(y0), round(x1), round(y1)))
                faces.append(
                    make_face((x0, y0, x1, y1), score, five_from_68(landmarks68), (height, width), landmarks68)
                )
        return largest_first(faces)

    def _landmarks(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Return the 68 landmarks [68, 2] of the face in ``box`` (x0, y0, x1, y1; x1, y1 exclusive).

        The predictor runs on a crop around the box, padded with grey where the box leaves the photo:
        on a face cut by the border it then still places the points as on a whole face.
        """
        x0, y0, x1, y1 = box
        margin = round(PREDICTOR_MARGIN * max(x1 - x0, y1 - y0))
        left, top, right, bottom = x0 - margin, y0 - margin, x1 + margin, y1 + margin
        canvas = np.full((bottom - top, right - left, 3), PAD_GREY, np.uint8)  # [h, w, 3]
        height, width = image.shape[:2]
        src_x0, src_y0, src_x1, src_y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
        if src_x0 < src_x1 and src_y0 < src_y1:
            canvas[src_y0 - top : src_y1 - top, src_x0 - left : src_x1 - left] = image[src_y0:src_y1, src_x0:src_x1]
        rect = self._dlib.rectangle(x0 - left, y0 - top, x1 - 1 - left, y1 - 1 - top)
        shape = self._predictor(canvas, rect)
        return np.array([(point.x + left, point.y + top) for point in shape.parts()], dtype=np.float64)  # [68, 2]

    def _scan(self, pixels: np.ndarray) -> list[tuple[Any, float]]:
        """Run the HOG detector, upsampling once more when nothing is found."""
        for upsample in (self.upsample, self.upsample + 1):
            rects, scores, _ = self._detector.run(pixels, upsample, 0.0)
            if len(rects) > 0:
                return list(zip(rects, scores))
        return []


def _unavailable(context: PluginContext) -> str | None:
    return import_problem("dlib", "pip install dlib-bin") or dlib_faces.unavailable_reason(dlib_faces.PREDICTOR_68)


def _create(context: PluginContext) -> DlibDetector:
    path = predictor_path()
    assert path is not None
    options = context.options
    return DlibDetector(
        path,
        max_side=int(options.get("max_side", 1024)),
        upsample=int(options.get("upsample", 1)),
        pad_fraction=float(options.get("pad_fraction", 0.1)),
    )


@hookimpl
def fluidsrv_detectors() -> list[PluginFactory[Detector]]:
    """Register the dlib HOG + 68-point landmark detector."""
    return [
        PluginFactory(
            "dlib",
            "dlib HOG face detector + 68-point landmarks (the FFHQ alignment recipe)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
