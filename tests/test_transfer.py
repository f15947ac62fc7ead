"""Edit transfer: the render's change laid over the photo only on the head, at any resolution."""

from __future__ import annotations

import numpy as np

from fluidsrv.geometry import CropTransform
from fluidsrv.transfer import apply_to_crop, apply_to_photo, border_fade, edit_layer, head_region

SIZE = 64


def disc(size: int, radius: float) -> np.ndarray:
    """A centred bool disc [size, size]."""
    yy, xx = np.mgrid[:size, :size]
    return (xx - (size - 1) / 2) ** 2 + (yy - (size - 1) / 2) ** 2 <= radius**2


def renders(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey reconstruction and an edit that brightens every pixel by ``shift``."""
    rng = np.random.default_rng(0)
    reconstructed = np.repeat(rng.integers(60, 190, (SIZE, SIZE, 1), dtype=np.uint8), 3, axis=2)
    return np.clip(reconstructed.astype(int) + shift, 0, 255).astype(np.uint8), reconstructed


def test_no_edit_gives_the_target_back_byte_for_byte() -> None:
    edited, reconstructed = renders(0)
    layer = edit_layer(edited, reconstructed, head_region(disc(128, 40), SIZE))
    crop = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert np.array_equal(apply_to_crop(crop, layer), crop)
    photo = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    transform = CropTransform(np.array([[50.0, 40.0], [50.0, 240.0], [250.0, 240.0], [250.0, 40.0]]), SIZE)
    assert np.array_equal(apply_to_photo(photo, layer, transform), photo)


def test_a_small_edit_moves_the_head_by_the_change_and_keeps_the_background() -> None:
    edited, reconstructed = renders(20)
    region = head_region(disc(128, 30), SIZE)
    layer = edit_layer(edited, reconstructed, region)
    crop = np.full((128, 128, 3), 100, dtype=np.uint8)
    result = apply_to_crop(crop, layer).astype(int)
    assert abs(result[64, 64, 0] - 120) <= 1  # the head's centre: the photo plus the render's change
    assert np.array_equal(result[:6], crop[:6])  # the crop's border never moves
    assert np.array_equal(result[~disc(128, 52)], crop[~disc(128, 52)])  # nor the background beyond the margin


def test_the_region_fades_out_toward_the_crop_border_and_grows_past_the_head() -> None:
    fade = border_fade(100, 10)
    assert fade[0, 50] == 0 and fade[50, 50] == 1 and 0 < fade[5, 50] < 1
    region = head_region(disc(100, 20), 100)
    assert region[50, 50] > 0.99 and region[50, 50 + 21] > 0.4 and region[50, 95] == 0


def test_where_structure_moved_the_render_replaces_the_photo() -> None:
    edited, reconstructed = renders(0)
    edited[24:40, 24:40] = 250  # an opened mouth: a large local change
    layer = edit_layer(edited, reconstructed, np.ones((SIZE, SIZE), np.float32))
    crop = np.full((SIZE, SIZE, 3), 30, dtype=np.uint8)  # the photo's own (very different) pixels
    result = apply_to_crop(crop, layer)
    assert np.abs(result[30:34, 30:34].astype(int) - 250).max() <= 2  # the render, not photo + change
    assert np.array_equal(result[2:6, 2:6], crop[2:6, 2:6])  # unchanged pixels keep the photo


def test_the_photo_outside_the_inner_quad_is_byte_identical() -> None:
    edited, reconstructed = renders(25)
    layer = edit_layer(edited, reconstructed, np.ones((SIZE, SIZE), np.float32) * border_fade(SIZE, 6))
    photo = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    transform = CropTransform(np.array([[100.0, 50.0], [100.0, 250.0], [300.0, 250.0], [300.0, 50.0]]), SIZE)
    result = apply_to_photo(photo, layer, transform)
    outside = np.ones(photo.shape[:2], dtype=bool)
    outside[50:250, 100:300] = False
    assert np.array_equal(result[outside], photo[outside])
    centre = result[140:160, 190:210].astype(int) - photo[140:160, 190:210]
    assert abs(np.median(centre) - 25) <= 2


def test_a_colour_cast_of_the_render_is_damped_and_its_brightness_kept() -> None:
    _, reconstructed = renders(0)
    edited = reconstructed.copy()
    edited[..., 2] = np.clip(edited[..., 2].astype(int) + 30, 0, 255)  # the render turns bluish
    layer = edit_layer(edited, reconstructed, np.ones((SIZE, SIZE), np.float32))
    blue_minus_red = float((layer.change[..., 2] - layer.change[..., 0]).mean())
    assert 5 < blue_minus_red < 15  # 30 of blue cast, a third kept
    luminance = layer.change @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert abs(float(luminance.mean()) - 30 * 0.114) < 0.5  # the brightness of the change is kept whole
