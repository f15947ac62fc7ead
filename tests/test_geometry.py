"""FFHQ alignment, crop transforms and paste-back (fluidsrv.geometry)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fluidsrv import geometry
from fluidsrv.crops import crop_corners
from fluidsrv.geometry import Alignment, CropName, CropTransform, align_face, face_landmarks, ffhq_quad
from fluidsrv.paste import paste_back
from fluidsrv.resample import map_points

Landmarker = Callable[[np.ndarray], np.ndarray]
CROPS: tuple[CropName, ...] = ("inner", "outer")


# ---------------------------------------------------------------------------------------------
# helpers


def rotation_about(centre: np.ndarray, degrees: float) -> np.ndarray:
    """3×3 rotation by ``degrees`` (counter-clockwise on screen) about ``centre``."""
    matrix = np.eye(3)
    matrix[:2] = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), degrees, 1.0)
    return matrix


def rotate_photo(photo: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a photo on an enlarged canvas (nothing cut off); return it and the 3×3 point map."""
    height, width = photo.shape[:2]
    if degrees % 90 == 0:
        turns = int(degrees // 90) % 4
        rotated = np.ascontiguousarray(np.rot90(photo, turns))  # counter-clockwise
        matrix = np.eye(3)
        for _ in range(turns):  # (x, y) -> (y, W - 1 - x) for one counter-clockwise quarter turn
            matrix = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, width - 1.0], [0.0, 0.0, 1.0]]) @ matrix
            height, width = width, height
        return rotated, matrix
    corners = np.array([[-0.5, -0.5], [width - 0.5, -0.5], [width - 0.5, height - 0.5], [-0.5, height - 0.5]])
    matrix = rotation_about(np.array([(width - 1) / 2, (height - 1) / 2]), degrees)
    mapped = map_points(matrix, corners)
    low, high = mapped.min(axis=0), mapped.max(axis=0)
    matrix[:2, 2] -= low + 0.5  # the rotated photo's outer corner lands on (-0.5, -0.5)
    size = np.ceil(high - low).astype(int)
    rotated = cv2.warpAffine(photo, matrix[:2], (int(size[0]), int(size[1])), flags=cv2.INTER_CUBIC)
    return rotated, matrix


def polygon_mask(shape: tuple[int, ...], polygon: np.ndarray) -> np.ndarray:
    """Boolean [H, W] mask of the pixels whose centres fall inside ``polygon`` [N, 2]."""
    mask = np.zeros(shape[:2], np.uint8)
    hull = cv2.convexHull(np.round(polygon * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1, shift=4)
    return mask.astype(bool)


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def landmarker() -> Landmarker:
    """68 landmarks of the largest face, from the embedded dlib detector plugin."""
    from fluidsrv_plugins.detect_dlib import DlibDetector, predictor_path

    path = predictor_path()
    if path is None or not path.is_file():
        pytest.skip("the dlib 68-point predictor (face-recognition-models) is not installed")
    detector = DlibDetector(path)

    def landmarks(photo: np.ndarray) -> np.ndarray:
        faces = detector.detect(photo)
        assert faces, "no face found"
        assert faces[0].landmarks68 is not None
        return face_landmarks(faces[0])

    return landmarks


_landmark_cache: dict[str, np.ndarray] = {}


def photo_and_landmarks(shared_dir: Path, name: str, landmarker: Landmarker) -> tuple[np.ndarray, np.ndarray]:
    photo = load_rgb(shared_dir / "photos" / name)
    if name not in _landmark_cache:
        _landmark_cache[name] = landmarker(photo)
    return photo, _landmark_cache[name]


def blob_photo(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    """A grey photo with a bright Gaussian blob centred at a sub-pixel position."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    blob = np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2))
    grey = 40 + 200 * blob
    return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=2)


def centroid(image: np.ndarray, background: float = 40.0) -> np.ndarray:
    weight = np.clip(image[..., 0].astype(np.float64) - background, 0, None)
    weight[weight < 20] = 0  # ignore the faint tails and the grey background
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


# ---------------------------------------------------------------------------------------------
# the quad


def test_ffhq_quad_matches_the_reference_recipe(fixtures_dir: Path) -> None:
    cases = json.loads((fixtures_dir / "ffhq_align_quads.json").read_text())["cases"]
    assert len(cases) == 8
    for case in cases:
        landmarks = np.array(case["landmarks68"])
        expected = np.array(case["quad"])
        np.testing.assert_allclose(ffhq_quad(landmarks), expected, rtol=0, atol=1e-6)
        five = np.stack(
            [landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0), landmarks[30], landmarks[48], landmarks[54]]
        )
        np.testing.assert_allclose(ffhq_quad(five), expected, rtol=0, atol=1e-6)


def test_ffhq_quad_turns_with_the_face() -> None:
    five = np.array([[100.0, 120.0], [160.0, 118.0], [131.0, 150.0], [108.0, 182.0], [152.0, 181.0]])
    quad = ffhq_quad(five)
    turn = rotation_about(np.array([300.0, 200.0]), 37.0)
    np.testing.assert_allclose(ffhq_quad(map_points(turn, five)), map_points(turn, quad), atol=1e-9)
    edges = np.roll(quad, -1, axis=0) - quad
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    np.testing.assert_allclose(lengths, lengths[0], rtol=1e-12)  # a square
    assert abs(np.dot(edges[0], edges[1])) < 1e-6 * lengths[0] ** 2


def test_ffhq_quad_rejects_bad_landmarks() -> None:
    with pytest.raises(ValueError, match="68, 2"):
        ffhq_quad(np.zeros((7, 2)))
    with pytest.raises(ValueError, match="degenerate"):
        ffhq_quad(np.ones((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        ffhq_quad(np.full((5, 2), np.nan))


# ---------------------------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize(
    "quad",
    [
        [[10.0, 20.0], [-30.0, 260.0], [210.0, 300.0], [250.0, 60.0]],  # rotated square
        [[0.0, 0.0], [30.0, 200.0], [260.0, 230.0], [200.0, -10.0]],  # a general (projective) quad
    ],
)
def test_crop_transform_maps_the_quad_onto_the_crop_exactly(quad: list[list[float]]) -> None:
    transform = CropTransform(np.array(quad), 512)
    np.testing.assert_allclose(transform.to_crop_points(np.array(quad)), crop_corners(512), atol=1e-9)
    points = np.random.default_rng(0).uniform(-100, 600, size=(50, 2))
    np.testing.assert_allclose(transform.to_photo_points(transform.to_crop_points(points)), points, atol=1e-9)
    product = transform.to_crop @ transform.from_crop  # identity up to the projective scale
    np.testing.assert_allclose(product / product[2, 2], np.eye(3), atol=1e-12)


def test_expanded_crop_shares_the_pixel_grid() -> None:
    inner = CropTransform(ffhq_quad(np.array([[100, 120], [160, 110], [131, 150], [108, 182], [152, 175.0]])), 256)
    outer = inner.expanded_to(geometry.outer_crop_size(256, 1.5))
    assert outer.size == 384
    offset = (outer.size - inner.size) // 2
    pixels = np.array([[0.0, 0.0], [255.0, 17.0], [100.5, 200.25]])
    np.testing.assert_allclose(inner.to_photo_points(pixels), outer.to_photo_points(pixels + offset), atol=1e-9)
    np.testing.assert_allclose(outer.centre, inner.centre, atol=1e-9)
    assert outer.scale == pytest.approx(inner.scale)


@pytest.mark.parametrize("side", [90.0, 420.0])  # the crop enlarges, then shrinks the photo
@pytest.mark.parametrize("degrees", [0.0, 23.0])
def test_crop_pixels_follow_the_matrices(side: float, degrees: float) -> None:
    blob = (301.3, 247.8)
    photo = blob_photo((520, 640), blob, sigma=4.0 * side / 90.0)
    square = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, 0.5], [0.5, -0.5]]) * side + [310.0, 240.0]
    quad = map_points(rotation_about(np.array([310.0, 240.0]), degrees), square)
    inner = CropTransform(quad, 192)
    outer = inner.expanded_to(288)
    alignment = Alignment(
        photo_shape=(520, 640),
        inner=inner,
        outer=outer,
        inner_image=geometry.warp_crop(photo, inner),
        outer_image=geometry.warp_crop(photo, outer, qsize=inner.side),
    )
    for crop in CROPS:
        expected = alignment.to_crop_points(np.array(blob), crop)
        assert np.abs(centroid(alignment.image(crop)) - expected).max() < 0.05
    # ...and back: paste the crop of a photo with no blob into a photo with one, the blob moves onto it.
    plain = blob_photo((520, 640), (-1e4, -1e4), 1.0)
    pasted = paste_back(plain, alignment.inner_image, inner, feather=0.0)
    assert np.abs(centroid(pasted) - blob).max() < 0.05


def test_alignment_round_trips_through_a_plain_dict(tmp_path: Path) -> None:
    photo = np.random.default_rng(1).integers(0, 256, size=(300, 280, 3), dtype=np.uint8)
    five = np.array([[100, 120], [160, 118], [131, 150], [108, 182], [152, 181.0]])
    alignment = align_face(photo, five, size=64)
    data = alignment.to_dict()
    assert {type(value) for value in data.values()} <= {str, int, list, np.ndarray}
    arrays_only: dict[str, np.ndarray] = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    np.savez(tmp_path / "a.npz", **arrays_only)  # type: ignore[arg-type]
    with np.load(tmp_path / "a.npz") as arrays:
        restored_data = {**data, **dict(arrays)}
    json_part = {k: (v.tolist() if k.endswith("quad") else v) for k, v in data.items() if "image" not in k}
    restored_data.update(json.loads(json.dumps(json_part)))
    restored = Alignment.from_dict(restored_data)
    assert restored.photo_shape == alignment.photo_shape == (300, 280)
    for crop in CROPS:
        np.testing.assert_array_equal(restored.image(crop), alignment.image(crop))
        np.testing.assert_array_equal(restored.transform(crop).to_crop, alignment.transform(crop).to_crop)
        assert restored.transform(crop).size == alignment.transform(crop).size
    with pytest.raises(ValueError, match="format"):
        Alignment.from_dict({**data, "format": "something else"})


# ---------------------------------------------------------------------------------------------
# real photos


ROUND_TRIP_PHOTOS = ["deepface_img5.jpg", "deepface_img2.jpg", "deepface_img4.jpg"]  # crop scale ~2.9, ~1.4, ~0.8


@pytest.mark.parametrize("degrees", [15, 30, 90])
@pytest.mark.parametrize("name", ROUND_TRIP_PHOTOS)
def test_align_then_paste_back_round_trips_on_rotated_photos(
    shared_dir: Path, landmarker: Landmarker, name: str, degrees: int
) -> None:
    upright, upright_landmarks = photo_and_landmarks(shared_dir, name, landmarker)
    photo, turn = rotate_photo(upright, degrees)
    landmarks = map_points(turn, upright_landmarks)
    alignment = align_face(photo, landmarks, size=1024)

    # the face sits upright in the crop whatever the photo's rotation
    eyes = alignment.to_crop_points(np.stack([landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0)]))
    assert abs(eyes[0, 1] - eyes[1, 1]) < 0.02 * 1024
    assert eyes[0, 0] < eyes[1, 0]

    # points: forward and back within 0.01 px
    for crop in CROPS:
        back = alignment.to_photo_points(alignment.to_crop_points(landmarks, crop), crop)
        assert np.abs(back - landmarks).max() < 0.01

    # pixels: pasting the unedited crop back changes the face by < 2/255 on average
    face = polygon_mask(photo.shape, landmarks)
    for crop in CROPS:
        restored = alignment.paste_back(photo, alignment.image(crop), crop)
        error = np.abs(restored.astype(np.int16) - photo.astype(np.int16))[face].mean()
        assert error < 2.0, f"{crop}: mean abs error {error:.3f}/255"


@pytest.mark.parametrize("degrees", [30, 90])
def test_crops_of_a_rotated_photo_match_the_upright_ones(
    shared_dir: Path, landmarker: Landmarker, degrees: int
) -> None:
    upright, landmarks = photo_and_landmarks(shared_dir, "deepface_img2.jpg", landmarker)
    photo, turn = rotate_photo(upright, degrees)
    reference = align_face(upright, landmarks, size=256)
    turned = align_face(photo, map_points(turn, landmarks), size=256)
    centre = slice(32, 224)  # the face, away from the padded border
    difference = np.abs(turned.inner_image.astype(np.int16) - reference.inner_image.astype(np.int16))
    assert difference[centre, centre].mean() < 1.0


@pytest.mark.parametrize("crop_size", [1024, 256])  # a generator output may be smaller than the alignment
def test_paste_back_leaves_every_other_pixel_byte_identical(
    shared_dir: Path, landmarker: Landmarker, crop_size: int
) -> None:
    photo, landmarks = photo_and_landmarks(shared_dir, "deepface_img2.jpg", landmarker)
    photo, turn = rotate_photo(photo, 15)
    alignment = align_face(photo, map_points(turn, landmarks), size=1024)
    edited = 255 - cv2.resize(alignment.inner_image, (crop_size, crop_size), interpolation=cv2.INTER_AREA)

    pasted = alignment.paste_back(photo, edited)
    changed = np.any(pasted != photo, axis=2)
    inside_quad = polygon_mask(photo.shape, alignment.inner.quad)
    assert changed[~inside_quad].sum() == 0
    assert changed[inside_quad].mean() > 0.9
    ramp = 0.05 * alignment.inner.side  # the feather runs inward from the quad's edge
    centre = alignment.inner.centre
    core = polygon_mask(photo.shape, centre + (alignment.inner.quad - centre) * (1 - 2.2 * ramp / alignment.inner.side))
    differences = np.abs(pasted.astype(np.int16) - (255 - photo.astype(np.int16)))[core]
    assert differences.mean() < 4.0  # the core is fully replaced by the edited crop

    # a caller mask (a disc in crop coordinates) confines the change further
    radius = crop_size // 5
    disc = np.zeros((crop_size, crop_size), np.uint8)
    cv2.circle(disc, (crop_size // 2, crop_size // 2), radius, 255, -1)
    masked = alignment.paste_back(photo, edited, mask=disc)
    changed = np.any(masked != photo, axis=2)
    reach = radius + 0.05 * crop_size + 2  # the disc, 4 sigma of its softening and the bilinear footprint
    angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1) * reach + crop_size // 2
    outside = ~polygon_mask(photo.shape, alignment.inner.resized(crop_size).to_photo_points(circle))
    assert changed[outside].sum() == 0
    assert changed.sum() > 0


def test_outer_crop_agrees_with_inner_crop(shared_dir: Path, landmarker: Landmarker) -> None:
    photo, landmarks = photo_and_landmarks(shared_dir, "deepface_img2.jpg", landmarker)
    alignment = align_face(photo, landmarks, size=512)
    assert alignment.outer_image.shape == (768, 768, 3)
    m = alignment.inner_offset
    window = alignment.outer_image[m : m + 512, m : m + 512].astype(np.int16)
    assert np.abs(window - alignment.inner_image).mean() < 1.0


def ffhq_pads(quad: np.ndarray, shape: tuple[int, ...], qsize: float) -> list[float]:
    """The NVlabs recipe's padding (left, top, right, bottom) in photo pixels; 0 where a side is not padded."""
    border = max(round(0.1 * qsize), 3)
    low, high = np.floor(quad.min(axis=0)), np.ceil(quad.max(axis=0))
    needed = [border - low[0], border - low[1], high[0] - shape[1] + border, high[1] - shape[0] + border]
    if max(needed) <= border - 4:
        return [0.0] * 4
    return [max(need, round(0.3 * qsize)) if need > 0 else 0.0 for need in needed]


def test_fade_where_the_quad_leaves_the_photo(shared_dir: Path, landmarker: Landmarker) -> None:
    photo, landmarks = photo_and_landmarks(shared_dir, "deepface_img2.jpg", landmarker)
    full = align_face(photo, landmarks, size=256)
    qsize = full.inner.side
    assert ffhq_pads(full.inner.quad, photo.shape, qsize) == [0.0] * 4  # inside: a plain warp
    # cut the photo just left of the left eye: the inner crop now leaves the photo on the left
    cut = int(landmarks[36, 0]) - 40
    cut_photo = np.ascontiguousarray(photo[:, cut:])
    shifted = align_face(cut_photo, landmarks - [cut, 0], size=256)
    left, top, right, bottom = ffhq_pads(shifted.inner.quad, cut_photo.shape, qsize)
    assert left > 0 and right == 0 and bottom == 0
    grid = np.stack(np.meshgrid(np.arange(256), np.arange(256)), axis=-1)
    photo_xy = shifted.inner.to_photo_points(grid)  # [256, 256, 2] photo position of every crop pixel
    xs, ys = photo_xy[..., 0], photo_xy[..., 1]
    deep_inside = (xs > left / 3 + 3) & (ys > top / 3 + 3)  # beyond the blur ramp (1/3 of a pad into the photo)
    depth = -xs / left  # the fade weight beyond the left edge (FFHQ's "mask")
    assert deep_inside.mean() > 0.2 and (depth > 0.6).mean() > 0.02
    kept = np.abs(shifted.inner_image.astype(np.int16) - full.inner_image)[deep_inside]
    assert kept.max() <= 2  # the photo itself is untouched there
    image = shifted.inner_image.astype(np.float64)
    median = np.median(image.reshape(-1, 3), axis=0)
    spread_inside = np.abs(image[deep_inside] - median).mean()
    spread_far = np.abs(image[depth > 0.6] - median).mean()
    assert spread_far < 0.4 * spread_inside  # faded toward the median colour
    gradient = np.abs(np.diff(image, axis=1))  # [256, 255, 3]
    seam = gradient[(depth[:, 1:] > -0.05) & (depth[:, 1:] < 0.05)]
    assert seam.mean() < 0.5 * gradient[deep_inside[:, 1:]].mean()  # blurred at the edge: no hard seam


def test_ffhq_aligned_photos_realign_to_the_identity(shared_dir: Path, landmarker: Landmarker) -> None:
    for name in ["ffhq_aligned_15.png", "ffhq_aligned_16.png", "ffhq_aligned_117.png"]:
        photo = load_rgb(shared_dir / "photos" / name)
        assert photo.shape == (1024, 1024, 3)
        transform = CropTransform(ffhq_quad(landmarker(photo)), 1024)
        assert np.abs(transform.quad - crop_corners(1024)).max() < 0.02 * 1024, name
        top = transform.quad[3] - transform.quad[0]
        assert abs(np.degrees(np.arctan2(top[1], top[0]))) < 1.0, name
        assert transform.scale == pytest.approx(1.0, abs=0.03), name


@pytest.mark.slow
def test_twelve_megapixel_photo_is_interactive(shared_dir: Path, landmarker: Landmarker) -> None:
    photo, landmarks = photo_and_landmarks(shared_dir, "deepface_img4.jpg", landmarker)
    factor = 1.68  # 2500x1728 -> 4200x2903, 12.2 Mpx
    big = cv2.resize(photo, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    big_landmarks = (landmarks + 0.5) * factor - 0.5
    start = time.perf_counter()
    alignment = align_face(big, big_landmarks, size=1024)
    aligned = time.perf_counter() - start
    start = time.perf_counter()
    pasted = alignment.paste_back(big, alignment.inner_image)
    pasted_in = time.perf_counter() - start
    assert pasted.shape == big.shape
    assert np.array_equal(pasted[:, :200], big[:, :200])
    assert aligned < 3.0 and pasted_in < 2.0, (aligned, pasted_in)
