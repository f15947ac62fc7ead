"""Face detector plugins on the real photos of ../shared/photos, and their availability reporting."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from fluidsrv_plugins._faces import find_model_file, five_from_68, largest_first, suppress_overlaps

from fluidsrv.image_io import decode_image
from fluidsrv.plugins import StageCatalog, build_plugin_manager
from fluidsrv.settings import default_cache_dir
from fluidsrv.stages import Face, PluginContext

PLUGINS_DIR = Path(__file__).resolve().parent.parent / "plugins"
DETECTORS = ("dlib", "mediapipe", "yunet", "insightface")
SINGLE_PORTRAITS = (
    "angelina_jolie.jpg",
    "kate_siegel.jpg",
    "paul_rudd.jpg",
    *(f"deepface_img{number}.jpg" for number in range(2, 21)),
    "ffhq_aligned_15.png",
    "ffhq_aligned_16.png",
    "ffhq_aligned_117.png",
)
GROUPS = {"couple.jpg": 2, "multiface.jpg": 5, "selfie-many-people.jpg": 5}


def make_context(cache_dir: Path, **options: Any) -> PluginContext:
    return PluginContext(torch.device("cpu"), Path("weights"), cache_dir, options)


def make_catalog(context: PluginContext) -> StageCatalog:
    return StageCatalog(build_plugin_manager(load_entry_points=False), context)


@pytest.fixture(scope="module")
def photos(shared_dir: Path) -> Callable[[str], np.ndarray]:
    """Decode a photo of ../shared/photos once per module."""
    cache: dict[str, np.ndarray] = {}

    def load(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = decode_image((shared_dir / "photos" / name).read_bytes(), max_bytes=None).pixels
        return cache[name]

    return load


@pytest.fixture(scope="module")
def yunet_context(shared_dir: Path) -> PluginContext:
    return make_context(Path("/nonexistent"), model=str(shared_dir / "weights" / "yunet_s_640_640.onnx"))


@pytest.fixture(scope="module")
def dlib_detector(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_catalog(make_context(tmp_path_factory.mktemp("cache"))).create("detector", "dlib")


def check_faces(faces: list[Face], image: np.ndarray) -> None:
    """Faces are largest first, with finite landmarks in image order (viewer's left eye left of the right)."""
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)
    height, width = image.shape[:2]
    for face in faces:
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert face.landmarks5.shape == (5, 2) and face.landmarks5.dtype == np.float64
        assert np.all(np.isfinite(face.landmarks5))
        left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks5
        assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
        eye_level = (left_eye[1] + right_eye[1]) / 2
        assert eye_level < nose[1] < (left_mouth[1] + right_mouth[1]) / 2
        # The eyes lie inside the box, widened by half its side (boxes of partial faces are clipped).
        side = max(x1 - x0, y1 - y0)
        assert x0 - side / 2 < left_eye[0] and right_eye[0] < x1 + side / 2
        assert y0 - side / 2 < eye_level < y1


def check_finds_faces(detector: Any, photos: Callable[[str], np.ndarray], at_least: dict[str, int]) -> list[Face]:
    """The detector finds at least ``at_least[name]`` well-formed faces in each photo; returns all it found."""
    found: list[Face] = []
    for name, count in at_least.items():
        image = photos(name)
        faces = detector.detect(image)
        assert len(faces) >= count, name
        check_faces(faces, image)
        found.extend(faces)
    return found


# ----------------------------------------------------------------------------------------------- dlib


@pytest.mark.parametrize("name", SINGLE_PORTRAITS)
def test_dlib_finds_the_face_of_every_portrait(dlib_detector: Any, photos: Callable[[str], np.ndarray], name: str):
    image = photos(name)
    faces = dlib_detector.detect(image)
    assert len(faces) >= 1
    check_faces(faces, image)
    face = faces[0]
    assert face.landmarks68 is not None and face.landmarks68.shape == (68, 2)
    np.testing.assert_allclose(face.landmarks5, five_from_68(face.landmarks68))
    # The main face of a portrait is big: at least 2 % of the photo's area.
    assert face.area > 0.02 * image.shape[0] * image.shape[1]


@pytest.mark.parametrize(("name", "at_least"), GROUPS.items())
def test_dlib_finds_the_people_of_group_photos(
    dlib_detector: Any, photos: Callable[[str], np.ndarray], name: str, at_least: int
):
    image = photos(name)
    faces = dlib_detector.detect(image)
    assert len(faces) >= at_least
    check_faces(faces, image)


def test_dlib_landmarks_match_the_ffhq_alignment(dlib_detector: Any, photos: Callable[[str], np.ndarray]):
    """An FFHQ-aligned photo re-detected gives (nearly) the identity quad: its own outer corners."""
    from fluidsrv.crops import crop_corners
    from fluidsrv.geometry import ffhq_quad

    for name in ("ffhq_aligned_15.png", "ffhq_aligned_16.png", "ffhq_aligned_117.png"):
        face = dlib_detector.detect(photos(name))[0]
        assert face.landmarks68 is not None
        error = np.abs(ffhq_quad(face.landmarks68) - crop_corners(1024)).max()
        assert error < 0.015 * 1024, (name, error)  # measured 6-9 px


def test_dlib_maps_boxes_of_downscaled_photos_back(dlib_detector: Any, photos: Callable[[str], np.ndarray]):
    """Detection on a large photo (downscaled internally) and on its half-size copy agree after scaling."""
    image = photos("deepface_img4.jpg")  # 2500 x 1728, over max_side
    half = np.ascontiguousarray(image[::2, ::2])
    big, small = dlib_detector.detect(image)[0], dlib_detector.detect(half)[0]
    np.testing.assert_allclose(np.array(big.box), np.array(small.box) * 2, atol=0.02 * image.shape[1])
    np.testing.assert_allclose(big.landmarks5, small.landmarks5 * 2, atol=0.01 * image.shape[1])


@pytest.mark.parametrize("name", ["paul_rudd.jpg", "kate_siegel.jpg"])
def test_dlib_keeps_the_landmarks_of_a_face_cut_by_the_border(
    dlib_detector: Any, photos: Callable[[str], np.ndarray], name: str
):
    image = photos(name)
    whole = dlib_detector.detect(image)[0]
    x0, _, x1, _ = whole.box
    cut = np.ascontiguousarray(image[:, : round(x0 + 0.75 * (x1 - x0))])  # a quarter of the face is gone
    faces = dlib_detector.detect(cut)
    assert len(faces) == 1
    check_faces(faces, cut)
    eye_distance = np.linalg.norm(whole.landmarks5[1] - whole.landmarks5[0])
    assert np.linalg.norm(faces[0].landmarks5 - whole.landmarks5, axis=1).max() < 0.2 * eye_distance


def test_dlib_finds_nothing_in_a_blank_image(dlib_detector: Any):
    assert dlib_detector.detect(np.full((200, 300, 3), 90, np.uint8)) == []


def test_detectors_refuse_images_that_are_not_uint8_rgb(dlib_detector: Any):
    with pytest.raises(ValueError, match="uint8 RGB"):
        dlib_detector.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        dlib_detector.detect(np.zeros((64, 64, 3), np.float32))


# ---------------------------------------------------------------------------------------------- YuNet


def test_yunet_finds_faces(yunet_context: PluginContext, photos: Callable[[str], np.ndarray]):
    detector = make_catalog(yunet_context).create("detector", "yunet")
    faces = check_finds_faces(detector, photos, {"paul_rudd.jpg": 1, "deepface_img5.jpg": 1, **GROUPS})
    assert all(face.landmarks68 is None and 0.0 < face.score <= 1.0 for face in faces)


def test_yunet_and_dlib_agree_on_the_eyes(
    yunet_context: PluginContext, dlib_detector: Any, photos: Callable[[str], np.ndarray]
):
    yunet = make_catalog(yunet_context).create("detector", "yunet")
    image = photos("kate_siegel.jpg")
    by_yunet, by_dlib = yunet.detect(image)[0], dlib_detector.detect(image)[0]
    eye_distance = np.linalg.norm(by_dlib.landmarks5[1] - by_dlib.landmarks5[0])
    assert np.abs(by_yunet.landmarks5[:2] - by_dlib.landmarks5[:2]).max() < 0.25 * eye_distance


def test_yunet_finds_its_model_in_the_cache(shared_dir: Path, tmp_path: Path):
    (tmp_path / "detectors").mkdir()
    shutil.copy(shared_dir / "weights" / "yunet_s_640_640.onnx", tmp_path / "detectors" / "yunet_s_640_640.onnx")
    context = make_context(tmp_path)
    assert find_model_file(context, ("yunet*.onnx",)) == tmp_path / "detectors" / "yunet_s_640_640.onnx"
    assert make_catalog(context).unavailable_reason("detector", "yunet") is None


# ------------------------------------------------------------------------------------ optional plugins


@pytest.mark.parametrize(
    ("detector_name", "at_least", "in_default_cache"),
    [
        ("mediapipe", {"paul_rudd.jpg": 1, "deepface_img12.jpg": 1, "couple.jpg": 2}, False),
        ("insightface", {"paul_rudd.jpg": 1, "couple.jpg": 2, "multiface.jpg": 5}, True),  # models in the user cache
    ],
)
def test_optional_detectors_find_faces(
    tmp_path: Path,
    photos: Callable[[str], np.ndarray],
    detector_name: str,
    at_least: dict[str, int],
    in_default_cache: bool,
):
    catalog = make_catalog(make_context(default_cache_dir() if in_default_cache else tmp_path))
    reason = catalog.unavailable_reason("detector", detector_name)
    if reason is not None:
        pytest.skip(f"{detector_name} unavailable: {reason}")
    check_finds_faces(catalog.create("detector", detector_name), photos, at_least)


# -------------------------------------------------------------------------------------- availability


def test_every_detector_is_registered_and_described(tmp_path: Path):
    infos = {info.name: info for info in make_catalog(make_context(tmp_path)).describe() if info.stage == "detector"}
    assert set(DETECTORS) <= set(infos)
    assert infos["dlib"].available, infos["dlib"].reason
    for info in infos.values():
        assert info.description
        assert info.available == (info.reason is None)


def test_model_plugins_without_their_files_say_why(tmp_path: Path):
    catalog = make_catalog(make_context(tmp_path))
    reason = catalog.unavailable_reason("detector", "yunet")
    assert reason is not None and "yunet" in reason.lower() and str(tmp_path) in reason
    reason = catalog.unavailable_reason("detector", "insightface")
    assert reason is not None and ("insightface" in reason.lower() or "det_10g" in reason)
    explicit = make_catalog(make_context(tmp_path, model=str(tmp_path / "missing.onnx")))
    assert "does not exist" in (explicit.unavailable_reason("detector", "yunet") or "")


def block_package(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``import package`` (and its submodules) fail as if it were not installed."""
    for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def fresh_import(monkeypatch: pytest.MonkeyPatch, module: str) -> ModuleType:
    """Import ``plugins/<module>.py`` as a new module object (the installed one stays untouched)."""
    name = f"fresh_{module}"
    spec = importlib.util.spec_from_file_location(name, PLUGINS_DIR / f"{module}.py")
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, fresh)  # dataclasses look their module up while being built
    spec.loader.exec_module(fresh)
    return fresh


@pytest.mark.parametrize(
    ("module", "package"),
    [
        ("detect_dlib", "dlib"),
        ("detect_mediapipe", "mediapipe"),
        ("detect_insightface", "insightface"),
    ],
)
def test_plugins_import_and_report_a_missing_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str, package: str
):
    block_package(monkeypatch, package)
    with pytest.raises(ImportError):
        importlib.import_module(package)
    plugin = fresh_import(monkeypatch, module)
    (factory,) = plugin.fluidsrv_detectors()
    reason = factory.unavailable(make_context(tmp_path, model=str(PLUGINS_DIR / "__init__.py")))
    assert reason is not None and package in reason


# ---------------------------------------------------------------------------------------------- helpers


def test_five_points_from_68():
    points = np.arange(136, dtype=np.float64).reshape(68, 2)
    five = five_from_68(points)
    np.testing.assert_allclose(five[0], points[36:42].mean(axis=0))
    np.testing.assert_allclose(five[1], points[42:48].mean(axis=0))
    np.testing.assert_allclose(five[2:], points[[30, 48, 54]])


def test_largest_first_and_overlap_suppression():
    def face(box: tuple[float, float, float, float], score: float) -> Face:
        return Face(box, score, np.zeros((5, 2)))

    small, big, tie = face((0, 0, 10, 10), 0.9), face((0, 0, 50, 40), 0.1), face((5, 5, 15, 15), 0.95)
    assert largest_first([small, big, tie]) == [big, tie, small]
    boxes = [(0.0, 0.0, 10.0, 10.0), (1.0, 1.0, 11.0, 11.0), (20.0, 20.0, 30.0, 30.0)]
    assert suppress_overlaps(boxes, [0.5, 0.9, 0.1]) == [1, 2]
