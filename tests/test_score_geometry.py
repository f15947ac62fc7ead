"""The landmark geometry scorer: registration, real aligned faces, mirroring, and its pure geometry and pose."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fluidsrv_plugins import score_geometry
from fluidsrv_plugins.detect_dlib import DlibDetector, predictor_path
from fluidsrv_plugins.score_geometry import ATTRIBUTES, TEMPLATE_MM, TEMPLATE_POINTS, GeometryScorer

from fluidsrv.geometry import align_face
from fluidsrv.image_io import decode_image
from fluidsrv.plugins import DEFAULT_PLUGINS, StageCatalog, build_plugin_manager
from fluidsrv.stages import PluginContext

PHOTOS = ("paul_rudd.jpg", "kate_siegel.jpg", "angelina_jolie.jpg", "deepface_img5.jpg")
TURNED = PHOTOS.index("angelina_jolie.jpg")  # faces the viewer's right by about 20°
SIZE = 128
RATIOS = ("smile", "mouth_open", "eyes_open")
PLAUSIBLE = {
    "smile": (0.6, 1.4),
    "mouth_open": (0.0, 0.5),
    "eyes_open": (0.15, 0.6),
    "yaw": (-35.0, 35.0),
    "pitch": (-25.0, 25.0),
}
RATIO_TOLERANCE = 0.05
ANGLE_TOLERANCE = 6.0  # degrees


@pytest.fixture(scope="module")
def scorer() -> GeometryScorer:
    return GeometryScorer()


@pytest.fixture(scope="module")
def faces(shared_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Aligned SIZE² crops [N, S, S, 3] of PHOTOS and their full-photo landmarks mapped into the crops [N, 68, 2]."""
    path = predictor_path()
    assert path is not None
    detector = DlibDetector(path)
    crops, landmarks = [], []
    for name in PHOTOS:
        photo = decode_image((shared_dir / "photos" / name).read_bytes(), max_bytes=None).pixels
        face = detector.detect(photo)[0]
        assert face.landmarks68 is not None
        alignment = align_face(photo, face.landmarks68, size=SIZE)
        crops.append(alignment.inner_image)
        landmarks.append(alignment.to_crop_points(face.landmarks68))
    return np.stack(crops), np.stack(landmarks)


def to_model_range(crops: np.ndarray) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ the plugin


def test_the_plugin_is_registered_and_available(tmp_path: Path) -> None:
    assert "fluidsrv_plugins.score_geometry" in DEFAULT_PLUGINS
    context = PluginContext(device=torch.device("cpu"), weights_dir=tmp_path, cache_dir=tmp_path)
    catalog = StageCatalog(build_plugin_manager(load_entry_points=False), context)
    assert "geometry" in catalog.names("scorer")
    assert catalog.unavailable_reason("scorer", "geometry") is None
    scorer = catalog.create("scorer", "geometry", {"work_size": 256})
    assert isinstance(scorer, GeometryScorer) and scorer.work_size == 256
    assert scorer.attributes == ATTRIBUTES


def test_real_aligned_faces_get_plausible_values(scorer: GeometryScorer, faces: tuple[np.ndarray, np.ndarray]) -> None:
    crops, photo_landmarks = faces
    scores = scorer.score(to_model_range(crops))
    assert set(scores) == set(ATTRIBUTES)
    from_photo = score_geometry.measure(photo_landmarks, SIZE, SIZE)  # the landmarks the alignment was made from
    for name, values in scores.items():
        low, high = PLAUSIBLE[name]
        assert values.shape == (len(PHOTOS),) and values.dtype == torch.float32, name
        assert bool(torch.isfinite(values).all()), name
        assert low <= float(values.min()) and float(values.max()) <= high, (name, values)
        tolerance = RATIO_TOLERANCE if name in RATIOS else ANGLE_TOLERANCE
        assert np.abs(values.numpy() - from_photo[name]).max() < tolerance, (name, values, from_photo[name])
    assert float(scores["yaw"][TURNED]) > 10.0  # she turns toward the viewer's right


def test_mirroring_flips_the_yaw_and_keeps_the_rest(
    scorer: GeometryScorer, faces: tuple[np.ndarray, np.ndarray]
) -> None:
    images = to_model_range(faces[0])
    scores, mirrored = scorer.score(images), scorer.score(images.flip(3))
    assert float(mirrored["yaw"][TURNED]) < -10.0
    assert float((scores["yaw"] + mirrored["yaw"]).abs().max()) < 4.0
    assert float((scores["pitch"] - mirrored["pitch"]).abs().max()) < 3.0
    for name in RATIOS:
        assert float((scores[name] - mirrored[name]).abs().max()) < RATIO_TOLERANCE, name


def test_small_renders_are_scored_alike(scorer: GeometryScorer, faces: tuple[np.ndarray, np.ndarray]) -> None:
    crops = faces[0]
    small = np.stack([cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA) for crop in crops])  # [N, 64, 64, 3]
    scores, small_scores = scorer.score(to_model_range(crops)), scorer.score(to_model_range(small))
    for name in ATTRIBUTES:
        tolerance = 2 * RATIO_TOLERANCE if name in RATIOS else 2 * ANGLE_TOLERANCE
        assert float((scores[name] - small_scores[name]).abs().max()) < tolerance, name


# --------------------------------------------------------------------------------------- pure geometry


def synthetic_face() -> np.ndarray:
    """Hand-placed landmarks [1, 68, 2] of a frontal face in a 128² image (only the measured points matter)."""
    points = np.stack([np.linspace(20.0, 108.0, 68), np.linspace(30.0, 110.0, 68)], axis=1)  # [68, 2] filler
    eye = np.array([[-6.0, 0.0], [-2.0, -2.0], [2.0, -2.0], [6.0, 0.0], [2.0, 2.0], [-2.0, 2.0]])  # [6, 2] p1…p6
    points[36:42] = eye + np.array([44.0, 52.0])
    points[42:48] = eye + np.array([84.0, 52.0])
    points[30], points[8] = [64.0, 72.0], [64.0, 112.0]
    points[48], points[54] = [50.0, 90.0], [78.0, 90.0]
    points[60:68] = [[52, 90], [57, 89], [64, 89], [71, 89], [76, 90], [71, 91], [64, 91], [57, 91]]
    return points[None]  # [1, 68, 2]


def test_a_wider_mouth_smiles_more() -> None:
    face = synthetic_face()
    wider = face.copy()
    wider[0, 48, 0] -= 4.0
    wider[0, 54, 0] += 4.0
    assert score_geometry.smile(face)[0] == pytest.approx(28.0 / 40.0)
    assert score_geometry.smile(wider)[0] > score_geometry.smile(face)[0]
    assert score_geometry.measure(wider, SIZE, SIZE)["smile"][0] > score_geometry.measure(face, SIZE, SIZE)["smile"][0]


def test_parted_lips_and_closing_eyes() -> None:
    face = synthetic_face()
    assert score_geometry.mouth_open(face)[0] == pytest.approx(2.0 / 28.0)
    assert score_geometry.eyes_open(face)[0] == pytest.approx((4.0 + 4.0) / (2 * 12.0))
    parted, sleepy = face.copy(), face.copy()
    parted[0, 65:68, 1] += 6.0  # the lower inner lip drops
    sleepy[0, [37, 38, 43, 44], 1] += 1.5  # the upper lids come down
    assert score_geometry.mouth_open(parted)[0] > score_geometry.mouth_open(face)[0]
    assert score_geometry.eyes_open(sleepy)[0] < score_geometry.eyes_open(face)[0]


def test_degenerate_landmarks_give_nan() -> None:
    face = synthetic_face()
    collapsed = np.full_like(face, 64.0)  # every point in one place
    tiny = (face - 64.0) * 0.1 + 64.0  # eyes 4 px apart: under 5 % of 128
    broken = face.copy()
    broken[0, 40] = np.nan
    values = score_geometry.measure(np.concatenate([face, collapsed, tiny, broken]), SIZE, SIZE)
    for name in ATTRIBUTES:
        assert np.isfinite(values[name][0]), name
        assert np.isnan(values[name][1:]).all(), name


# ------------------------------------------------------------------------------------------------- pose


def template_rotation(yaw: float, pitch: float) -> np.ndarray:
    """The template-to-camera rotation [3, 3] that turns the frontal face by ``yaw`` and ``pitch`` degrees."""
    frontal = np.diag([1.0, -1.0, -1.0])  # template x right, y up, z toward the camera -> camera x right, y down
    a, b = math.radians(-yaw), math.radians(-pitch)
    about_vertical = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    about_horizontal = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return about_vertical @ about_horizontal @ frontal


def projected_template(yaw: float, pitch: float, distance: float = 600.0) -> np.ndarray:
    """Landmarks [1, 68, 2] (NaN but for TEMPLATE_POINTS) of the template turned and projected into a 128² image."""
    rvec, _ = cv2.Rodrigues(template_rotation(yaw, pitch))
    camera = score_geometry.camera_matrix(SIZE, SIZE)
    image_points, _ = cv2.projectPoints(TEMPLATE_MM, rvec, np.array([0.0, 0.0, distance]), camera, None)  # [6, 1, 2]
    points = np.full((1, 68, 2), np.nan)
    points[0, list(TEMPLATE_POINTS)] = image_points[:, 0]
    return points


def test_the_frontal_template_has_no_yaw_or_pitch() -> None:
    yaw, pitch = score_geometry.head_pose(projected_template(0.0, 0.0), SIZE, SIZE)
    assert abs(yaw[0]) < 1e-3 and abs(pitch[0]) < 1e-3


@pytest.mark.parametrize(("yaw", "pitch"), [(20.0, 0.0), (-15.0, 0.0), (0.0, 12.0), (0.0, -12.0), (25.0, -10.0)])
def test_a_turned_template_gives_the_documented_signs(yaw: float, pitch: float) -> None:
    points = projected_template(yaw, pitch)
    frontal = projected_template(0.0, 0.0)
    nose, corners = points[0, 30], points[0, [36, 45, 48, 54]].mean(axis=0)  # [2] each
    frontal_rise = frontal[0, [36, 45, 48, 54], 1].mean() - frontal[0, 30, 1]
    if yaw:  # a face turned toward the viewer's right has its nose tip right of the corners' middle
        assert np.sign(nose[0] - corners[0]) == np.sign(yaw)
    if pitch:  # a face looking up has its nose tip higher above the corners than a frontal one
        assert np.sign((corners[1] - nose[1]) - frontal_rise) == np.sign(pitch)
    found_yaw, found_pitch = score_geometry.head_pose(points, SIZE, SIZE)
    assert found_yaw[0] == pytest.approx(yaw, abs=1e-3) and found_pitch[0] == pytest.approx(pitch, abs=1e-3)


def test_a_mirrored_projection_flips_the_yaw() -> None:
    points = projected_template(18.0, 7.0)
    mirrored = points.copy()
    mirrored[..., 0] = SIZE - 1 - points[..., 0]
    for left, right in ((36, 45), (48, 54)):  # mirroring swaps which corner is the viewer's left
        mirrored[0, [left, right]] = mirrored[0, [right, left]]
    yaw, pitch = score_geometry.head_pose(np.concatenate([points, mirrored]), SIZE, SIZE)
    assert yaw[0] == pytest.approx(18.0, abs=1e-3) and yaw[1] == pytest.approx(-18.0, abs=1e-3)
    assert pitch[1] == pytest.approx(pitch[0], abs=1e-3)
