"""Small helpers shared by the face detector plugins: availability checks, landmark and box utilities."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fluidsrv.stages import Face, PluginContext

LEFT_EYE_68 = slice(36, 42)  # viewer's left eye contour in the iBUG 300-W order
RIGHT_EYE_68 = slice(42, 48)
NOSE_TIP_68 = 30
LEFT_MOUTH_68 = 48
RIGHT_MOUTH_68 = 54


def import_problem(module: str, install_hint: str) -> str | None:
    """Return why ``module`` cannot be imported (with how to install it), or None when it imports."""
    try:
        importlib.import_module(module)
    except Exception as error:  # a missing or broken optional package only makes the plugin unavailable
        return f"cannot import {module} ({type(error).__name__}: {error}); install with: {install_hint}"
    return None


def five_from_68(landmarks68: np.ndarray) -> np.ndarray:
    """Return the five points (eye centres, nose tip, mouth corners) [5, 2] from 68 iBUG points [68, 2]."""
    assert landmarks68.shape == (68, 2), landmarks68.shape
    return np.stack(
        [
            landmarks68[LEFT_EYE_68].mean(axis=0),
            landmarks68[RIGHT_EYE_68].mean(axis=0),
            landmarks68[NOSE_TIP_68],
            landmarks68[LEFT_MOUTH_68],
            landmarks68[RIGHT_MOUTH_68],
        ]
    ).astype(np.float64)  # [5, 2]


def make_face(
    box: Sequence[float],
    score: float,
    landmarks5: np.ndarray,
    image_shape: tuple[int, ...],
    landmarks68: np.ndarray | None = None,
) -> Face:
    """Return a Face with its box clipped to the image and landmarks as float64 arrays."""
    height, width = image_shape[:2]
    x0, y0, x1, y1 = (float(value) for value in box)
    clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    points5 = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)  # [5, 2]
    points68 = None if landmarks68 is None else np.asarray(landmarks68, dtype=np.float64).reshape(68, 2)  # [68, 2]
    return Face(box=clipped, score=float(score), landmarks5=points5, landmarks68=points68)


def largest_first(faces: Iterable[Face]) -> list[Face]:
    """Return ``faces`` sorted by box area, largest first (ties: higher score first)."""
    return sorted(faces, key=lambda face: (-face.area, -face.score))


def check_rgb_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is a uint8 RGB array [H, W, 3]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")


def find_model_file(context: PluginContext, patterns: Sequence[str], option: str = "model") -> Path | None:
    """Return the file named by ``context.options[option]``, else the last match of ``patterns`` in the cache.

    Patterns are tried in order, each at the top of the cache and one folder down (``buffalo_l/det_10g.onnx``).
    """
    explicit = context.options.get(option)
    if explicit:
        return Path(explicit).expanduser()
    cache = context.cache_dir
    if not cache.is_dir():
        return None
    for pattern in patterns:
        matches = sorted(path for path in [*cache.glob(pattern), *cache.glob(f"*/{pattern}")] if path.is_file())
        if matches:
            return matches[-1]
    return None


def missing_model_reason(
    path: Path | None, what: str, context: PluginContext, patterns: Sequence[str], weights_name: str
) -> str | None:
    """Return why the model file ``path`` is unusable, or None when it is a file."""
    if path is None:
        wanted = " or ".join(patterns)
        return (
            f"no {what} model file: put {wanted} in {context.cache_dir} (see `fluidsrv weights list`, "
            f"entry {weights_name!r}) or set the plugin option 'model'"
        )
    if not path.is_file():
        return f"{what} model file {path} does not exist"
    return None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Return the intersection over union of two (x0, y0, x1, y1) boxes."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def suppress_overlaps(
    boxes: Sequence[Sequence[float]], scores: Sequence[float], iou_threshold: float = 0.4
) -> list[int]:
    """Return the indices of the boxes kept by greedy non-maximum suppression, best score first."""
    kept: list[int] = []
    for index in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(box_iou(boxes[index], boxes[other]) <= iou_threshold for other in kept):
            kept.append(index)
    return kept
