"""The shared dlib models: loaded once, detection, landmarks and the identity embedding on real faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fluidsrv import dlib_faces
from fluidsrv.geometry import align_face
from fluidsrv.image_io import decode_image


def aligned(shared_dir: Path, name: str, size: int = 128) -> np.ndarray:
    photo = decode_image((shared_dir / "photos" / name).read_bytes()).pixels
    box = dlib_faces.detect(photo)[0]
    return align_face(photo, dlib_faces.landmarks(photo, box), size=size).inner_image


def test_models_are_loaded_once_and_available() -> None:
    assert dlib_faces.unavailable_reason(dlib_faces.PREDICTOR_68, dlib_faces.IDENTITY_RESNET) is None
    assert dlib_faces.shape_predictor() is dlib_faces.shape_predictor(dlib_faces.model_path(dlib_faces.PREDICTOR_68))
    assert dlib_faces.frontal_detector() is dlib_faces.frontal_detector()
    assert "missing" in str(dlib_faces.unavailable_reason("no_such_model.dat"))


def test_identity_distance_separates_people(shared_dir: Path) -> None:
    paul, kate = aligned(shared_dir, "paul_rudd.jpg"), aligned(shared_dir, "kate_siegel.jpg")
    assert dlib_faces.identity_distance(paul, paul) < 1e-6
    blurred = np.asarray(paul, dtype=np.float32)
    blurred[1:-1, 1:-1] = (blurred[:-2, 1:-1] + blurred[2:, 1:-1] + blurred[1:-1, :-2] + blurred[1:-1, 2:]) / 4
    assert dlib_faces.identity_distance(paul, blurred.astype(np.uint8)) < dlib_faces.SAME_PERSON_DISTANCE
    assert dlib_faces.identity_distance(paul, kate) > dlib_faces.SAME_PERSON_DISTANCE


def test_an_aligned_face_box_falls_back_to_the_canonical_area() -> None:
    box = dlib_faces.aligned_face_box(np.full((100, 100, 3), 128, np.uint8))
    assert (box.left(), box.top(), box.right(), box.bottom()) == (22, 28, 78, 86)
