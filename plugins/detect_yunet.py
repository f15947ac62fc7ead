"""YuNet (OpenCV ``cv2.FaceDetectorYN``): a small CNN face detector with five landmarks.

The ONNX model is user-provided: ``yunet*.onnx`` in the weights cache (e.g. ``yunet_s_640_640.onnx``
or ``face_detection_yunet_2023mar.onnx``), or an explicit path in the plugin option ``model``.
Other options: ``score_threshold`` (0.6), ``nms_threshold`` (0.3), ``max_side`` (1280: larger photos
are downscaled for detection and the results mapped back).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fluidsrv_plugins._faces import (
    check_rgb_image,
    find_model_file,
    largest_first,
    make_face,
    missing_model_reason,
)

from fluidsrv import hookimpl
from fluidsrv.stages import Detector, Face, PluginContext, PluginFactory

MODEL_PATTERNS = ("yunet*.onnx", "face_detection_yunet*.onnx")


class YuNetDetector:
    """Face boxes and five landmarks from OpenCV's YuNet."""

    def __init__(
        self, model_file: Path, score_threshold: float = 0.6, nms_threshold: float = 0.3, max_side: int = 1280
    ):
        assert 0.0 < score_threshold < 1.0 and 0.0 < nms_threshold < 1.0 and max_side >= 64
        self._net: Any = cv2.FaceDetectorYN.create(str(model_file), "", (320, 320), score_threshold, nms_threshold)
        self.max_side = max_side
        self._lock = threading.Lock()  # the detector keeps its input size as state

    def detect(self, image: np.ndarray) -> list[Face]:
        """Return the faces in a uint8 RGB image [H, W, 3], largest first."""
        check_rgb_image(image)
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # [H, W, 3]
        if scale < 1.0:
            bgr = cv2.resize(bgr, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        with self._lock:
            self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._net.detect(bgr)  # [N, 15]: x, y, w, h, 5 × (x, y), score
        if rows is None:
            return []
        sx, sy = width / bgr.shape[1], height / bgr.shape[0]
        faces = []
        for row in np.asarray(rows, dtype=np.float64):
            x, y, w, h = row[0] * sx, row[1] * sy, row[2] * sx, row[3] * sy
            landmarks5 = (row[4:14].reshape(5, 2) + 0.5) * (sx, sy) - 0.5  # [5, 2], pixel centres, viewer's left first
            faces.append(make_face((x, y, x + w, y + h), row[14], landmarks5, (height, width)))
        return largest_first(faces)


def _model_file(context: PluginContext) -> Path | None:
    return find_model_file(context, MODEL_PATTERNS)


def _unavailable(context: PluginContext) -> str | None:
    if not hasattr(cv2, "FaceDetectorYN"):
        return f"this OpenCV ({cv2.__version__}) has no FaceDetectorYN; OpenCV >= 4.5.4 is needed"
    return missing_model_reason(_model_file(context), "YuNet", context, MODEL_PATTERNS, "yunet")


def _create(context: PluginContext) -> YuNetDetector:
    path = _model_file(context)
    assert path is not None
    options = context.options
    return YuNetDetector(
        path,
        score_threshold=float(options.get("score_threshold", 0.6)),
        nms_threshold=float(options.get("nms_threshold", 0.3)),
        max_side=int(options.get("max_side", 1280)),
    )


@hookimpl
def fluidsrv_detectors() -> list[PluginFactory[Detector]]:
    """Register the YuNet detector (user-provided ONNX model)."""
    return [
        PluginFactory(
            "yunet",
            "OpenCV YuNet CNN face detector with five landmarks (user-provided yunet*.onnx)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
