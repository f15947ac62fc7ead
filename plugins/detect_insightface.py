"""InsightFace SCRFD: face boxes with five landmarks from a user-provided ONNX detection model.

The model is found in the weights cache as ``det_10g.onnx`` (the buffalo_l pack), ``det_500m.onnx``
(buffalo_s/sc) or ``scrfd*.onnx``, at its top level or one folder down (``buffalo_l/det_10g.onnx``),
or given as a path in the plugin option ``model``. Other options: ``input_size`` (640),
``score_threshold`` (0.5). SCRFD's five points (eyes, nose tip, mouth corners, viewer's left first)
are the landmarks; there are no 68-point landmarks.

Install without the package's ``opencv-python`` dependency (it would shadow opencv-python-headless):
``pip install ".[insightface]"`` then ``pip install --no-deps insightface``.
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
    import_problem,
    largest_first,
    make_face,
    missing_model_reason,
)

from fluidsrv import hookimpl
from fluidsrv.stages import Detector, Face, PluginContext, PluginFactory

INSTALL_HINT = 'pip install ".[insightface]" && pip install --no-deps insightface'
MODEL_PATTERNS = ("det_10g.onnx", "det_2.5g.onnx", "det_500m.onnx", "scrfd*.onnx")


class InsightFaceDetector:
    """SCRFD detection (boxes, scores, five landmarks) through ``insightface.model_zoo``."""

    def __init__(self, model_file: Path, use_cuda: bool = False, input_size: int = 640, score_threshold: float = 0.5):
        from insightface.model_zoo import get_model

        assert input_size % 32 == 0 and 0.0 < score_threshold < 1.0
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        self._model: Any = get_model(str(model_file), providers=providers)
        if self._model is None or getattr(self._model, "taskname", None) != "detection":
            raise ValueError(f"{model_file} is not an InsightFace detection model")
        if not getattr(self._model, "use_kps", False):
            raise ValueError(f"{model_file} has no landmark output; use an SCRFD model with keypoints (det_10g.onnx)")
        self.input_size = (input_size, input_size)
        self._model.prepare(0 if use_cuda else -1, input_size=self.input_size, det_thresh=score_threshold)
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[Face]:
        """Return the faces in a uint8 RGB image [H, W, 3], largest first."""
        check_rgb_image(image)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # [H, W, 3]
        with self._lock:
            boxes, keypoints = self._model.detect(bgr, input_size=self.input_size)  # [N, 5], [N, 5, 2]
        assert keypoints is not None  # checked in __init__ (use_kps)
        faces = [
            make_face(row[:4], row[4], points, image.shape)
            for row, points in zip(np.asarray(boxes, np.float64), np.asarray(keypoints, np.float64))
        ]
        return largest_first(faces)


def _model_file(context: PluginContext) -> Path | None:
    return find_model_file(context, MODEL_PATTERNS)


def _unavailable(context: PluginContext) -> str | None:
    problem = import_problem("insightface.model_zoo", INSTALL_HINT)
    if problem:
        return problem
    return missing_model_reason(
        _model_file(context), "InsightFace SCRFD detection", context, MODEL_PATTERNS, "insightface-buffalo-l"
    )


def _create(context: PluginContext) -> InsightFaceDetector:
    path = _model_file(context)
    assert path is not None
    return InsightFaceDetector(
        path,
        use_cuda=context.device.type == "cuda",
        input_size=int(context.options.get("input_size", 640)),
        score_threshold=float(context.options.get("score_threshold", 0.5)),
    )


@hookimpl
def fluidsrv_detectors() -> list[PluginFactory[Detector]]:
    """Register the InsightFace SCRFD detector (user-provided ONNX model)."""
    return [
        PluginFactory(
            "insightface",
            "InsightFace SCRFD face detector with five landmarks (user-provided det_10g.onnx)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
