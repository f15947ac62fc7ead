"""The landmark + GrabCut segmenter on aligned crops of real photos, and how segmenters are registered."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from fluidsrv_plugins import segment_landmarks
from fluidsrv_plugins.detect_dlib import DlibDetector, predictor_path
from fluidsrv_plugins.segment_landmarks import CANONICAL_BOX, FaceFrame, LandmarkSegmenter, fill_polygon, soften_outward

from fluidsrv.geometry import Alignment, CropName, align_face
from fluidsrv.image_io import decode_image
from fluidsrv.plugins import DEFAULT_PLUGINS
from fluidsrv.stages import PluginContext

# portraits with hair that is visible around the face (long, short, dark, light)
CROPS: tuple[CropName, ...] = ("inner", "outer")
PORTRAITS = ("paul_rudd.jpg", "kate_siegel.jpg", "deepface_img5.jpg", "deepface_img8.jpg")


@pytest.fixture(scope="module")
def segmenter() -> LandmarkSegmenter:
    path = predictor_path()
    assert path is not None and path.is_file(), "face-recognition-models must ship the 68-point predictor"
    return LandmarkSegmenter(path)


@pytest.fixture(scope="module")
def aligned(shared_dir: Path) -> Callable[[str, int], tuple[Alignment, np.ndarray]]:
    """Align the largest face of a photo of ../shared/photos; return it with its 68 landmarks (photo pixels)."""
    path = predictor_path()
    assert path is not None
    detector = DlibDetector(path)
    cache: dict[tuple[str, int], tuple[Alignment, np.ndarray]] = {}

    def load(name: str, size: int) -> tuple[Alignment, np.ndarray]:
        if (name, size) not in cache:
            photo = decode_image((shared_dir / "photos" / name).read_bytes(), max_bytes=None).pixels
            face = detector.detect(photo)[0]
            assert face.landmarks68 is not None
            cache[name, size] = (align_face(photo, face.landmarks68, size=size), face.landmarks68)
        return cache[name, size]

    return load


def hull_mask(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    return fill_polygon(shape, cv2.convexHull(points.astype(np.float32))[:, 0])


def check_masks(masks: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
    assert {"face", "hair"} <= set(masks)
    for name, mask in masks.items():
        assert mask.shape == shape and mask.dtype == np.float32, name
        assert mask.min() >= 0.0 and mask.max() <= 1.0, name
    assert (masks["face"] + masks["hair"]).max() <= 1.0 + 1e-5  # hair has the face taken out


CASES = [
    *((name, 128, crop) for name in PORTRAITS for crop in CROPS),  # the embedded generator's size
    *((name, 1024, "inner") for name in PORTRAITS[:2]),  # the full-size generator's
]


@pytest.mark.parametrize(("name", "size", "crop"), CASES)
def test_face_and_hair_of_real_aligned_faces(
    segmenter: LandmarkSegmenter,
    aligned: Callable[[str, int], tuple[Alignment, np.ndarray]],
    name: str,
    size: int,
    crop: CropName,
) -> None:
    alignment, landmarks = aligned(name, size)
    image = alignment.image(crop)
    side = image.shape[0]
    masks = segmenter.parse(image)
    check_masks(masks, (side, side))
    face, hair = masks["face"], masks["hair"]

    # the face covers the hull of the landmarks the photo was aligned with
    truth = alignment.to_crop_points(landmarks, crop)  # [68, 2]
    hull = hull_mask((side, side), truth)
    assert face[hull].mean() > 0.98
    assert face[hull].min() > 0.3
    # ... and not the crop's corners
    corner = side // 8
    for corner_rows in (face[:corner], face[-corner:]):
        assert corner_rows[:, :corner].max() == 0.0 and corner_rows[:, -corner:].max() == 0.0

    # there is hair, and most of it lies above the mouth
    assert hair.sum() > 0.03 * side * side
    rows = np.arange(side, dtype=np.float64)[:, None]  # [side, 1]
    mouth_row = truth[48:68, 1].mean()
    assert hair[rows[:, 0] < mouth_row].sum() > 0.6 * hair.sum()
    hair_centre_row = (hair * rows).sum() / hair.sum()
    chin_row = truth[8, 1]
    assert hair_centre_row < chin_row


@pytest.mark.parametrize("hog_finds_nothing", [False, True], ids=["detected-box", "canonical-boxes"])
def test_predicted_landmarks_match_the_alignment_landmarks(
    segmenter: LandmarkSegmenter,
    aligned: Callable[[str, int], tuple[Alignment, np.ndarray]],
    monkeypatch: pytest.MonkeyPatch,
    hog_finds_nothing: bool,
) -> None:
    """Landmarks fit the aligned truth; with no HOG detection the inner- and outer-crop canonical boxes are tried."""
    portraits = PORTRAITS
    if hog_finds_nothing:
        monkeypatch.setattr(segmenter, "_detected_boxes", lambda image: [])
        portraits = PORTRAITS[:2]
    for name in portraits:
        alignment, landmarks = aligned(name, 128)
        for crop in CROPS:
            image = alignment.image(crop)
            truth = alignment.to_crop_points(landmarks, crop)
            error = np.abs(segmenter.landmarks(image) - truth).mean()
            assert error < 0.01 * image.shape[0], (name, crop, error)


def test_parse_is_deterministic(
    segmenter: LandmarkSegmenter, aligned: Callable[[str, int], tuple[Alignment, np.ndarray]]
) -> None:
    image = aligned(PORTRAITS[1], 128)[0].outer_image
    first, second = segmenter.parse(image), segmenter.parse(image)
    assert all(np.array_equal(first[name], second[name]) for name in first)


def test_face_polygon_rule() -> None:
    """The forehead arc rises FOREHEAD_FRACTION × brow-to-chin above the brows, between jaw points 0 and 16."""
    rng = np.random.default_rng(0)
    landmarks = rng.uniform(40, 60, size=(68, 2))
    landmarks[0], landmarks[16], landmarks[8] = (20, 50), (80, 50), (50, 100)  # jaw ends and chin
    landmarks[17:27] = np.stack([np.linspace(30, 70, 10), np.full(10, 40.0)], axis=1)  # brows 60 px above the chin
    frame = FaceFrame.from_landmarks(landmarks)
    polygon = frame.face_polygon(arc_points=99)
    top = polygon[:, 1].min()
    assert top == pytest.approx(40.0 - segment_landmarks.FOREHEAD_FRACTION * 60.0, abs=0.1)
    assert polygon[:, 0].min() == pytest.approx(20.0) and polygon[:, 0].max() == pytest.approx(80.0)


def test_soften_outward_keeps_the_shape_and_fades_outside() -> None:
    shape = np.zeros((40, 40), dtype=bool)
    shape[10:30, 10:30] = True
    soft = soften_outward(shape, 5.0)
    assert np.all(soft[shape] == 1.0)
    assert soft[20, 32] > 0 and soft[20, 36] == 0.0  # 2 px outside: partly; 6 px outside: nothing
    assert soft.dtype == np.float32


def test_canonical_box_is_a_face_sized_box() -> None:
    x0, y0, x1, y1 = CANONICAL_BOX
    assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
    assert 0.5 < x1 - x0 < 0.7  # an FFHQ face spans a little over half the crop


def test_a_faceless_image_still_gets_masks_of_the_right_shape(segmenter: LandmarkSegmenter) -> None:
    """A flat grey image has no face; the canonical box still yields (meaningless) masks, never a crash."""
    masks = segmenter.parse(np.full((128, 128, 3), 128, dtype=np.uint8))
    check_masks(masks, (128, 128))


def test_parse_refuses_images_that_are_not_uint8_rgb(segmenter: LandmarkSegmenter) -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        segmenter.parse(np.zeros((64, 64), dtype=np.uint8))


def test_segmenters_are_registered() -> None:
    assert "fluidsrv_plugins.segment_landmarks" in DEFAULT_PLUGINS
    assert "fluidsrv_plugins.segment_bisenet" in DEFAULT_PLUGINS
    (factory,) = segment_landmarks.fluidsrv_segmenters()
    context = PluginContext(torch.device("cpu"), Path("weights"), Path("/nonexistent"), {})
    assert factory.name == "landmarks" and factory.unavailable(context) is None
    assert isinstance(factory.create(context), LandmarkSegmenter)


def test_landmarks_segmenter_reports_a_missing_dlib(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "dlib", None)  # an import of dlib now fails
    (factory,) = segment_landmarks.fluidsrv_segmenters()
    context: Any = PluginContext(torch.device("cpu"), Path("weights"), Path("/nonexistent"), {})
    reason = factory.unavailable(context)
    assert reason is not None and "dlib" in reason and "pip install dlib-bin" in reason
