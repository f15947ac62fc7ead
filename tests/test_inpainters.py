"""Inpainters: OpenCV Telea / Navier-Stokes, LaMa's mechanics with a scripted stand-in, and the finalize seam."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from fluidsrv_plugins import inpaint_lama, inpaint_opencv
from fluidsrv_plugins.detect_dlib import DlibDetector, predictor_path
from fluidsrv_plugins.inpaint_lama import LamaInpainter, pad_to_multiple
from fluidsrv_plugins.inpaint_opencv import OpenCVInpainter, shrink_for_fill
from fluidsrv_plugins.segment_landmarks import LandmarkSegmenter

from fluidsrv.geometry import align_face
from fluidsrv.image_io import decode_image
from fluidsrv.masks import border_band, seam_mask
from fluidsrv.plugins import DEFAULT_PLUGINS
from fluidsrv.stages import Inpainter, PluginContext, PluginFactory

# the stand-in is made with TorchScript, as the real big-lama.pt is; torch deprecates making new ones
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.(script|save)` is deprecated:FutureWarning")

OPENCV_METHODS = ("telea", "navier-stokes")
LAMA_FILE = "big-lama.pt"
STAND_IN_FILL = (1.0, 0.5, 0.0)  # the stand-in LaMa paints holes in this RGB colour


def make_context(cache_dir: Path, **options: Any) -> PluginContext:
    return PluginContext(torch.device("cpu"), Path("weights"), cache_dir, options)


def factories() -> dict[str, PluginFactory[Inpainter]]:
    found = [*inpaint_opencv.fluidsrv_inpainters(), *inpaint_lama.fluidsrv_inpainters()]
    return {factory.name: factory for factory in found}


def gradient_with_holes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB gradient [size, size, 3] and a hole mask: a disc and a thin horizontal scratch."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    image = np.stack([40 + 180 * x, 30 + 150 * y, 120 + 60 * x * y], axis=-1).round().astype(np.uint8)
    mask = (x - 0.45) ** 2 + (y - 0.55) ** 2 < 0.12**2
    mask |= (np.abs(y - 0.2) < 0.02) & (x > 0.1) & (x < 0.9)
    return image, mask


# --- OpenCV -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", OPENCV_METHODS)
@pytest.mark.parametrize("size", [128, 1024])
def test_opencv_fills_a_gradient_hole_close_to_the_truth(method: str, size: int) -> None:
    image, mask = gradient_with_holes(size)
    broken = image.copy()
    broken[mask] = (255, 0, 255)  # what was there must not leak into the fill
    result = factories()[method].create(make_context(Path("/nonexistent"))).inpaint(broken, mask)
    assert result.dtype == np.uint8 and result.shape == image.shape
    assert np.array_equal(result[~mask], broken[~mask])  # unmasked pixels byte-identical
    error = np.abs(result.astype(np.int16) - image)[mask]
    flat_fill_error = np.abs(image[~mask].mean(axis=0) - image[mask]).mean()  # a mean-colour fill's error
    assert error.mean() < 5.0 and error.mean() < 0.2 * flat_fill_error
    assert error.max() < 40


def test_opencv_radius_scales_with_the_image() -> None:
    inpainter = OpenCVInpainter("telea")
    assert inpainter.radius(64) == 2 and inpainter.radius(512) == 3 and inpainter.radius(2048) == 12


def test_shrunk_hole_covers_every_pixel_of_the_full_size_hole() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    mask = np.zeros((300, 500), dtype=bool)
    mask[rng.integers(0, 300, 40), rng.integers(0, 500, 40)] = True  # isolated single pixels
    small_image, small_mask = shrink_for_fill(image, mask, 128)
    assert small_image.shape == (77, 128, 3) and small_mask.shape == (77, 128)
    grown_back = cv2.resize(small_mask, (500, 300), interpolation=cv2.INTER_NEAREST) > 0
    assert grown_back[mask].all()


@pytest.mark.parametrize("method", OPENCV_METHODS)
def test_opencv_mask_contract(method: str) -> None:
    inpainter = OpenCVInpainter(method)
    image = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    empty = inpainter.inpaint(image, np.zeros((32, 48), dtype=bool))
    assert np.array_equal(empty, image) and empty is not image
    as_uint8 = np.zeros((32, 48), dtype=np.uint8)
    as_uint8[10:20, 10:20] = 255
    assert np.array_equal(inpainter.inpaint(image, as_uint8), inpainter.inpaint(image, as_uint8 > 0))
    with pytest.raises(ValueError, match="does not match"):
        inpainter.inpaint(image, np.zeros((48, 32), dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        inpainter.inpaint(image, np.zeros((32, 48), dtype=np.float32))
    with pytest.raises(ValueError, match="whole image"):
        inpainter.inpaint(image, np.ones((32, 48), dtype=bool))
    with pytest.raises(ValueError, match="uint8 RGB"):
        inpainter.inpaint(image.astype(np.float32), np.zeros((32, 48), dtype=bool))


def test_opencv_inpainters_are_registered_and_always_available(tmp_path: Path) -> None:
    assert "fluidsrv_plugins.inpaint_opencv" in DEFAULT_PLUGINS and "fluidsrv_plugins.inpaint_lama" in DEFAULT_PLUGINS
    context = make_context(tmp_path, max_side=0, radius_fraction=0.01)
    for method in OPENCV_METHODS:
        factory = factories()[method]
        assert factory.unavailable(context) is None
        inpainter = factory.create(context)
        assert isinstance(inpainter, OpenCVInpainter) and inpainter.max_side == 0 and inpainter.method == method


# --- LaMa --------------------------------------------------------------------------------------------------


class StandInLama(torch.nn.Module):
    """A stand-in with big-lama.pt's interface that checks its inputs and paints holes one colour."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        torch._assert(image.shape[2] % 8 == 0 and image.shape[3] % 8 == 0, "image not padded to multiples of 8")
        torch._assert(image.shape[1] == 3 and mask.shape[1] == 1, "expected [1, 3, H, W] and [1, 1, H, W]")
        torch._assert(bool(image.min() >= 0.0) and bool(image.max() <= 1.0), "image not in [0, 1]")
        torch._assert(bool(((mask == 0) | (mask == 1)).all()), "mask not binary")
        fill = torch.tensor([1.0, 0.5, 0.0], dtype=image.dtype).view(1, 3, 1, 1)
        return image * (1.0 - mask) + fill * mask


@pytest.fixture()
def lama_cache(tmp_path: Path) -> Path:
    """A weights cache holding a scripted stand-in saved under big-lama.pt's name."""
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.jit.save(torch.jit.script(StandInLama()), str(cache / LAMA_FILE))
    return cache


def test_lama_is_unavailable_without_its_file(tmp_path: Path) -> None:
    reason = factories()["lama"].unavailable(make_context(tmp_path))
    assert reason is not None and LAMA_FILE in reason and str(tmp_path) in reason
    assert "fluidsrv weights fetch big-lama" in reason
    explicit = factories()["lama"].unavailable(make_context(tmp_path, model=str(tmp_path / "nowhere.pt")))
    assert explicit is not None and "nowhere.pt" in explicit


def test_lama_pads_runs_and_keeps_unmasked_pixels(lama_cache: Path) -> None:
    factory = factories()["lama"]
    context = make_context(lama_cache)
    assert factory.unavailable(context) is None
    inpainter = factory.create(context)
    image = np.random.default_rng(2).integers(0, 256, (37, 50, 3), dtype=np.uint8)  # neither side a multiple of 8
    mask = np.zeros((37, 50), dtype=bool)
    mask[5:30, 20:49] = True
    result = inpainter.inpaint(image, mask)
    assert result.shape == image.shape and result.dtype == np.uint8
    assert np.array_equal(result[~mask], image[~mask])
    assert np.all(result[mask] == (255, 128, 0))  # RGB in, RGB out, [0, 1] scaled to bytes
    assert np.array_equal(inpainter.inpaint(image, np.zeros_like(mask)), image)


def test_lama_shrinks_large_images_when_asked(lama_cache: Path) -> None:
    inpainter = factories()["lama"].create(make_context(lama_cache, max_side=64))
    assert isinstance(inpainter, LamaInpainter) and inpainter.max_side == 64
    image = np.full((200, 160, 3), 90, dtype=np.uint8)
    mask = np.zeros((200, 160), dtype=bool)
    mask[50:150, 40:120] = True
    result = inpainter.inpaint(image, mask)
    assert np.array_equal(result[~mask], image[~mask])
    assert np.abs(result[70:130, 60:100].astype(int) - (255, 128, 0)).max() <= 2  # the hole's inside is the fill


def test_lama_refuses_a_module_with_the_wrong_output(tmp_path: Path) -> None:
    class Wrong(torch.nn.Module):
        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return mask

    inpainter = LamaInpainter(torch.jit.script(Wrong()))
    with pytest.raises(RuntimeError, match="expected"):
        inpainter.inpaint(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16), bool))


def test_pad_to_multiple_mirrors_at_the_bottom_and_right() -> None:
    array = np.arange(3 * 5).reshape(3, 5)
    padded = pad_to_multiple(array, 4)
    assert padded.shape == (4, 8)
    assert np.array_equal(padded[:3, :5], array)
    assert np.array_equal(padded[3], padded[2]) and np.array_equal(padded[:3, 5], array[:, 4])
    assert pad_to_multiple(np.zeros((8, 16)), 8).shape == (8, 16)


# --- the finalize seam on a real face ---------------------------------------------------------------------


def test_seam_inpainting_of_a_real_aligned_face(shared_dir: Path) -> None:
    """Old outer crop vs a shifted "new" inner face: segment both, cut the seam, fill it, nothing else moves."""
    path = predictor_path()
    assert path is not None
    photo = decode_image((shared_dir / "photos" / "paul_rudd.jpg").read_bytes(), max_bytes=None).pixels
    face = DlibDetector(path).detect(photo)[0]
    assert face.landmarks68 is not None
    alignment = align_face(photo, face.landmarks68, size=128)
    size, outer_size, offset = alignment.inner.size, alignment.outer.size, alignment.inner_offset
    inner = (slice(offset, offset + size), slice(offset, offset + size))

    # the "new" face: the inner crop moved 8 px right and 6 px down (its old place shows a seam)
    shift = np.array([[1, 0, 8], [0, 1, 6]], dtype=np.float32)
    new_inner = cv2.warpAffine(alignment.inner_image, shift, (size, size), borderMode=cv2.BORDER_REFLECT)

    segmenter = LandmarkSegmenter(path)
    old_parts = segmenter.parse(alignment.outer_image)
    new_parts = segmenter.parse(new_inner)
    old_head = np.maximum(old_parts["face"], old_parts["hair"]) >= 0.5  # [So, So]
    new_head = np.zeros((outer_size, outer_size), dtype=bool)
    new_head[inner] = np.maximum(new_parts["face"], new_parts["hair"]) >= 0.5
    inner_region = np.zeros((outer_size, outer_size), dtype=bool)
    inner_region[inner] = True
    border = 5
    mask = seam_mask(old_head, new_head, inner_region, dilation=4, border=border)

    # the new face is shown where its head is; the seam around it is filled
    composite = alignment.outer_image.copy()
    shown = new_head & inner_region
    composite[shown] = new_inner[shown[inner]]
    assert mask.any() and not (mask & shown).any() and not (mask & border_band(mask.shape, border)).any()
    assert (old_head & ~new_head & mask).sum() > 0.5 * (old_head & ~new_head).sum()  # the old head's rim is seam

    for inpainter in (OpenCVInpainter("telea"), OpenCVInpainter("navier-stokes")):
        result = inpainter.inpaint(composite, mask)
        assert np.array_equal(result[~mask], composite[~mask])  # nothing changes outside the mask
        changed = np.any(result != composite, axis=-1)
        assert changed[mask].mean() > 0.5
        # the fill takes its colours from the surroundings: within their range, channel by channel
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~mask
        low, high = composite[ring].min(axis=0), composite[ring].max(axis=0)
        assert np.all(result[mask] >= low) and np.all(result[mask] <= high)
