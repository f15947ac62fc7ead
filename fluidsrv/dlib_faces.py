"""dlib's offline face models (HOG detector, 68-point predictor, 128-d identity embedding), loaded once per process.

The model files ship with the ``face-recognition-models`` package; they are found with
``importlib.util.find_spec`` because importing that package needs ``pkg_resources``. dlib does not promise
thread safety, so every call into a shared model holds :data:`LOCK`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
IDENTITY_RESNET = "dlib_face_recognition_resnet_model_v1.dat"
SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold for its 128-d embedding
ALIGNED_FACE_BOX = (0.22, 0.28, 0.78, 0.86)  # where the face sits in an FFHQ-aligned crop (fractions of its side)
MIN_DETECT_SIDE = 256  # aligned crops are upscaled to at least this before HOG looks at them

LOCK = threading.RLock()
"""Held around every call into the shared dlib models."""


def models_dir() -> Path | None:
    """Return the folder of face-recognition-models' ``.dat`` files, or None when the package is absent."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_path(name: str) -> Path | None:
    """Return the path of one model file (``PREDICTOR_68`` or ``IDENTITY_RESNET``), or None."""
    folder = models_dir()
    return None if folder is None else folder / name


def unavailable_reason(*names: str) -> str | None:
    """Return why dlib or one of the model files ``names`` cannot be used, or None when all can."""
    if importlib.util.find_spec("dlib") is None:
        return "dlib is not installed (pip install dlib-bin)"
    for name in names:
        path = model_path(name)
        if path is None:
            return "face-recognition-models is not installed (pip install face-recognition-models)"
        if not path.is_file():
            return f"the dlib model {path} is missing"
    return None


def _required(name: str) -> str:
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(reason)
    path = model_path(name)
    assert path is not None
    return str(path)


@functools.cache
def frontal_detector() -> Any:
    """The HOG frontal face detector (shared)."""
    import dlib

    return dlib.get_frontal_face_detector()


def shape_predictor(path: Path | str | None = None) -> Any:
    """The 68-point landmark predictor of ``path`` (default: face-recognition-models'), loaded once per file."""
    return _load_predictor(str(path) if path is not None else _required(PREDICTOR_68))


@functools.cache
def _load_predictor(path: str) -> Any:
    import dlib

    return dlib.shape_predictor(path)


@functools.cache
def identity_model() -> Any:
    """The ResNet face-recognition model giving 128-d embeddings (shared)."""
    import dlib

    return dlib.face_recognition_model_v1(_required(IDENTITY_RESNET))


def rectangle(left: float, top: float, right: float, bottom: float) -> Any:
    """Return a dlib rectangle with integer pixel corners."""
    import dlib

    return dlib.rectangle(round(left), round(top), round(right), round(bottom))


def detect(image: np.ndarray, upsample: int = 1) -> list[Any]:
    """HOG detections (dlib rectangles) in a uint8 RGB image [H, W, 3], largest first."""
    with LOCK:
        found = list(frontal_detector()(np.ascontiguousarray(image), upsample))
    return sorted(found, key=lambda box: box.width() * box.height(), reverse=True)


def landmarks(image: np.ndarray, box: Any) -> np.ndarray:
    """The 68 landmarks [68, 2] (float64, pixel centres) of the face in ``box``."""
    with LOCK:
        shape = shape_predictor()(np.ascontiguousarray(image), box)
    return np.array([[point.x, point.y] for point in shape.parts()], dtype=np.float64)


def embedding(image: np.ndarray, box: Any) -> np.ndarray:
    """The 128-d identity embedding [128] of the face in ``box`` (landmarks predicted on these pixels)."""
    pixels = np.ascontiguousarray(image)
    with LOCK:
        shape = shape_predictor()(pixels, box)
        return np.asarray(identity_model().compute_face_descriptor(pixels, shape), dtype=np.float64)


def aligned_face_box(image: np.ndarray) -> Any:
    """The face rectangle of an FFHQ-aligned crop: HOG on an upscaled copy, else the crop's usual face area."""
    side = image.shape[0]
    scale = max(1, math.ceil(MIN_DETECT_SIDE / side))
    found = detect(image.repeat(scale, axis=0).repeat(scale, axis=1), upsample=1)
    if found:
        box = found[0]
        return rectangle(box.left() / scale, box.top() / scale, box.right() / scale, box.bottom() / scale)
    left, top, right, bottom = (fraction * side for fraction in ALIGNED_FACE_BOX)
    return rectangle(left, top, right, bottom)


def identity_distance(original: np.ndarray, other: np.ndarray) -> float:
    """Embedding distance of ``other`` to ``original`` (two aligned crops of one size; < 0.6: the same person)."""
    box = aligned_face_box(original)
    return float(np.linalg.norm(embedding(original, box) - embedding(other, box)))
