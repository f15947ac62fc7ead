"""The outer head predictor: the new head outside the inner crop, moved with the landmarks, and its composition."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from fluidsrv_plugins.detect_dlib import DlibDetector, predictor_path
from fluidsrv_plugins.inpaint_opencv import OpenCVInpainter
from fluidsrv_plugins.segment_landmarks import LandmarkSegmenter

from fluidsrv import dlib_faces, outer_seg
from fluidsrv.compose import compose_outer, parse_head, place_inner
from fluidsrv.geometry import align_face
from fluidsrv.image_io import decode_image
from fluidsrv.outer_seg import LandmarkMotion, landmark_motion, predictor
from tests.server_support import SMALL_PHOTO

SIZE, OUTER, OFFSET = 128, 192, 32
WARPS = ("affine", "tps")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def similarity(angle: float, shift: tuple[float, float], centre: tuple[float, float]) -> np.ndarray:
    """[2, 3]: a rotation by ``angle`` degrees about ``centre``, then ``shift``."""
    matrix = np.asarray(cv2.getRotationMatrix2D(centre, angle, 1.0), dtype=np.float64)
    matrix[:, 2] += np.asarray(shift, dtype=np.float64)
    return matrix


def move_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return np.asarray(points @ matrix[:, :2].T + matrix[:, 2])


def move_mask(mask: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return cv2.warpAffine(mask.astype(np.uint8), matrix, mask.shape[::-1], flags=cv2.INTER_NEAREST).astype(bool)


def inner_region() -> np.ndarray:
    return place_inner(np.ones((SIZE, SIZE), dtype=bool), OUTER, OFFSET)


def synthetic_head() -> tuple[np.ndarray, np.ndarray]:
    """A head (bool [So, So]: face ellipse + a hair cap reaching past the inner crop) and its 68 'landmarks'
    (inner-crop pixels) around the face."""
    ys, xs = np.mgrid[0:OUTER, 0:OUTER]
    face = ((xs - 96) / 34.0) ** 2 + ((ys - 104) / 44.0) ** 2 <= 1
    hair = ((xs - 96) / 58.0) ** 2 + ((ys - 78) / 56.0) ** 2 <= 1
    angles = np.linspace(0.0, 2 * np.pi, 68, endpoint=False)
    landmarks = np.c_[96 + 30 * np.cos(angles), 104 + 38 * np.sin(angles)] - OFFSET
    return face | hair, landmarks


@pytest.mark.parametrize("name", WARPS)
def test_a_warp_moves_the_outer_map_with_a_rotated_and_shifted_head(name: str) -> None:
    old_head, old_points = synthetic_head()
    matrix = similarity(7.0, (6.0, -4.0), (96.0, 104.0))  # outer-crop pixels
    truth = move_mask(old_head, matrix)
    new_points = move_points(old_points + OFFSET, matrix) - OFFSET
    region = inner_region()

    predicted = predictor(name).predict(old_head, truth & region, region,
                                        LandmarkMotion(old_points, new_points).in_outer(OFFSET))
    baseline = predictor("inner").predict(old_head, truth & region, region, None)
    outside = ~region
    assert np.array_equal(predicted.head[region], truth[region])  # inside: the inner parse itself
    assert iou(predicted.head & outside, truth & outside) > iou(old_head & outside, truth & outside) + 0.1
    assert iou(predicted.head, truth) > iou(baseline.head, truth)
    assert not (baseline.head & outside).any()
    if name == "affine":  # the similarity is the model: right up to the fade at the outer border
        assert iou(predicted.head & outside, truth & outside) > 0.9


@pytest.mark.parametrize("name", WARPS)
def test_a_warp_is_the_identity_when_nothing_moved(name: str) -> None:
    old_head, points = synthetic_head()
    region = inner_region()
    predicted = predictor(name).predict(old_head, old_head & region, region, LandmarkMotion(points, points))
    ys, xs = np.mgrid[0:OUTER, 0:OUTER]
    assert predicted.source is not None and predicted.carried is not None
    assert np.abs(predicted.source - np.stack([xs, ys], axis=-1)).max() < 1e-4
    assert np.array_equal(predicted.head, old_head) and np.array_equal(predicted.carried, old_head)
    image = np.random.default_rng(0).integers(0, 256, (OUTER, OUTER, 3), dtype=np.uint8)
    assert np.array_equal(predicted.moved(image), image)
    assert np.array_equal(predicted.kept(region), old_head & ~region)


def test_without_landmarks_every_predictor_is_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    old_head, _ = synthetic_head()
    region = inner_region()
    baseline = predictor("inner").predict(old_head, old_head & region, region, None)
    for name in WARPS:
        fallback = predictor(name).predict(old_head, old_head & region, region, None)
        assert fallback.carried is None and fallback.source is None
        assert np.array_equal(fallback.head, baseline.head) and not fallback.kept(region).any()
    with pytest.raises(ValueError, match="unknown outer head predictor"):
        predictor("net")

    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    monkeypatch.setattr(dlib_faces, "unavailable_reason", lambda *names: "dlib is not installed")
    assert outer_seg.render_landmarks(image) is None and landmark_motion(image, image) is None
    monkeypatch.undo()
    far = iter([np.zeros((68, 2)), np.full((68, 2), 0.5 * SIZE)])  # a failed detection: everything jumped
    monkeypatch.setattr(outer_seg, "render_landmarks", lambda *_: next(far))
    assert landmark_motion(image, image) is None


# ---------------------------------------------------------------------------------------------- a real photo


@pytest.fixture(scope="module")
def aligned(shared_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The small test photo's outer crop at a 128² inner crop, and its 68 landmarks in inner-crop pixels."""
    path = predictor_path()
    if path is None:
        pytest.skip("dlib's 68-point predictor is not installed")
    photo = decode_image((shared_dir / "photos" / SMALL_PHOTO).read_bytes()).pixels
    face = DlibDetector(path).detect(photo)[0]
    assert face.landmarks68 is not None
    alignment = align_face(photo, face.landmarks68, size=SIZE)
    assert alignment.outer.size == OUTER and alignment.inner_offset == OFFSET
    return alignment.outer_image, alignment.inner.to_crop_points(face.landmarks68)


@pytest.fixture(scope="module")
def segmenter() -> LandmarkSegmenter:
    path = predictor_path()
    if path is None:
        pytest.skip("dlib's 68-point predictor is not installed")
    return LandmarkSegmenter(path)


def test_on_a_photo_the_detected_motion_moves_the_parsed_head_the_right_way(
    aligned: tuple[np.ndarray, np.ndarray], segmenter: LandmarkSegmenter
) -> None:
    old_outer, _ = aligned
    matrix = similarity(6.0, (5.0, -3.0), (96.0, 100.0))
    new_outer = cv2.warpAffine(old_outer, matrix, (OUTER, OUTER), borderMode=cv2.BORDER_REPLICATE)
    inner = slice(OFFSET, OFFSET + SIZE)
    motion = landmark_motion(old_outer[inner, inner], new_outer[inner, inner])  # dlib on the crops themselves
    assert motion is not None
    expected = move_points(motion.old + OFFSET, matrix) - OFFSET
    assert np.median(np.hypot(*(motion.new - expected).T)) < 2.0  # the landmarks follow the head

    old_head = parse_head(old_outer, segmenter)
    truth = move_mask(old_head, matrix)
    region, outside = inner_region(), ~inner_region()
    assert (old_head & outside).sum() > 300  # the hair reaches past the inner crop
    for name in WARPS:
        predicted = predictor(name).predict(old_head, truth & region, region, motion.in_outer(OFFSET))
        assert iou(predicted.head & outside, truth & outside) > iou(old_head & outside, truth & outside), name


def test_compose_keeps_the_moved_hair_outside_the_inner_crop_instead_of_inpainting_it(
    aligned: tuple[np.ndarray, np.ndarray], segmenter: LandmarkSegmenter
) -> None:
    old_outer, points = aligned
    inner = slice(OFFSET, OFFSET + SIZE)
    new_inner = old_outer[inner, inner].copy()
    old_head = parse_head(old_outer, segmenter)
    inpainter = OpenCVInpainter("telea")
    region = inner_region()

    baseline = compose_outer(old_outer, new_inner, OFFSET, segmenter, inpainter, old_head=old_head)
    same = compose_outer(old_outer, new_inner, OFFSET, segmenter, inpainter, old_head=old_head,
                         predictor=predictor("affine"), motion=LandmarkMotion(points, points))
    lost = old_head & ~region & ~dilate_border()
    assert baseline.seam[lost].mean() > 0.9  # the baseline inpaints the old hair outside the inner crop
    assert same.predicted is not None
    kept = same.predicted.kept(region)
    assert kept.sum() > 0.8 * lost.sum() and not (same.seam & kept).any()
    solid = cv2.erode(kept.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)  # beyond the feathered rim
    assert np.array_equal(same.image[solid], old_outer[solid])  # nothing moved: the photo's own hair
    assert same.seam.sum() < baseline.seam.sum()

    # a missing motion falls back to the baseline, byte for byte
    fallback = compose_outer(old_outer, new_inner, OFFSET, segmenter, inpainter, old_head=old_head,
                             predictor=predictor("tps"), motion=None)
    assert np.array_equal(fallback.image, baseline.image) and np.array_equal(fallback.seam, baseline.seam)
    assert np.array_equal(fallback.changed, baseline.changed)


def dilate_border() -> np.ndarray:
    """The outer crop's border band that is never inpainted (ComposeConfig's default 0.04 × 128 px)."""
    from fluidsrv.masks import border_band

    return border_band((OUTER, OUTER), round(0.04 * SIZE))
