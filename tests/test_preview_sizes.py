"""Preview frames are P×P (P = preview_side(R)) at every generator resolution, whatever size a previewer renders at.

Small random generators of the real architecture (narrow channels, so a 1024² render stays well under a second on
one CPU thread), a synthetic photo with a made-up face and stub encoder / segmenter / inpainter: these tests are
about the pipeline's sizes (prepare → preview → compose → finalize), not about the stages' quality.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fluidsrv_plugins.preview_generator import GeneratorPreviewer

from fluidsrv import pipeline
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.pipeline import PreparedFace, StageBundle, preview_side
from fluidsrv.runtime import build_random_generator, random_generator_config
from fluidsrv.stages import Face, Latents, Previewer, PreviewRenderer, Progress, StepJob
from tests.model_support import drain

RESOLUTIONS = (64, 128, 256, 512, 1024)
STUDENT_SIDE = 256
"""What the stub "student" renders at for any generator (like a 256² student of a 1024² generator)."""


def slim_generator(resolution: int) -> Generator:
    """A random generator of ``resolution`` with 8 channels above 32² (a 1024² render in ~0.1 s)."""
    config = random_generator_config(resolution)
    channels = {size: (width if size <= 32 else 8) for size, width in config.channels.items()}
    return build_random_generator(dataclasses.replace(config, channels=channels)).eval()


class NoDetector:
    """Finds nothing (the tests give the face)."""

    def detect(self, image: np.ndarray) -> list[Face]:
        """No faces."""
        return []


class MeanEncoder:
    """Inverts every face to one fixed mapped code (no optimisation)."""

    def encode(self, image: torch.Tensor, generator: Generator) -> StepJob[Latents]:
        """Return the code of z = 0.5 for any image."""
        ws = generator.mapping(torch.full((1, generator.w_dim), 0.5, device=image.device))  # [1, num_ws, w_dim]
        yield Progress("encode", 1, 1)
        return Latents(w=ws[:, 0], ws=ws)


class DiscSegmenter:
    """A centred disc as the face and nothing as the hair."""

    def parse(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Masks of ``image``'s own size."""
        side = image.shape[0]
        yy, xx = np.mgrid[:side, :side]
        face = ((xx - side / 2) ** 2 + (yy - side / 2) ** 2 <= (side / 3) ** 2).astype(np.float32)
        return {"face": face, "hair": np.zeros_like(face)}


class FlatInpainter:
    """Fills with grey."""

    def inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return ``image`` grey where ``mask`` is set."""
        filled = image.copy()
        filled[mask] = 128
        return filled


class FixedSideRenderer:
    """Renders with the generator, then always returns STUDENT_SIDE² (like a student previewer)."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    @torch.inference_mode()
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        """[1, 3, STUDENT_SIDE, STUDENT_SIDE] in [-1, 1]."""
        image = self.generator.synthesis(ws, noise_mode="const")  # [1, 3, R, R]
        return torch.nn.functional.interpolate(image, size=(STUDENT_SIDE, STUDENT_SIDE), mode="bilinear")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing to keep."""
        return {}


class FixedSidePreviewer:
    """Builds :class:`FixedSideRenderer` instances."""

    def fit(self, generator: Generator, ws: torch.Tensor, edits: torch.Tensor) -> StepJob[PreviewRenderer]:
        """One trivial step."""
        yield Progress("distill", 1, 1)
        return FixedSideRenderer(generator)

    def restore(self, generator: Generator, state: dict[str, torch.Tensor]) -> PreviewRenderer:
        """Rebuild the renderer."""
        return FixedSideRenderer(generator)


PREVIEWERS: dict[str, Callable[[], Previewer]] = {"generator": GeneratorPreviewer, "fixed-256": FixedSidePreviewer}


def photo_with_face() -> tuple[np.ndarray, Face]:
    """A 900×700 photo (noise over a gradient) and a made-up face of ~300 px eye-to-mouth in it."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:900, 0:700]
    base = np.stack([xs * 255 // 700, ys * 255 // 900, np.full_like(xs, 120)], axis=-1)
    photo = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    landmarks = np.array([[280.0, 380.0], [420.0, 380.0], [350.0, 460.0], [295.0, 540.0], [405.0, 540.0]])
    return photo, Face(box=(200.0, 280.0, 500.0, 620.0), score=1.0, landmarks5=landmarks)


def bundle(generator: Generator, previewer: Previewer, photo_detail: str = "transfer") -> StageBundle:
    """The stage bundle of these tests (no fine-tuning: it does not change sizes)."""
    return StageBundle(generator=generator, detector=NoDetector(), encoder=MeanEncoder(),
                       segmenter=DiscSegmenter(), inpainter=FlatInpainter(), previewer=previewer,
                       device=torch.device("cpu"), finetune="none", photo_detail=photo_detail)


@pytest.fixture(scope="module", params=RESOLUTIONS, ids=lambda resolution: f"{resolution}px")
def generator(request: pytest.FixtureRequest) -> Iterator[Generator]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU
    yield slim_generator(int(request.param))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("previewer_name", list(PREVIEWERS))
def test_previews_are_preview_side_squared_at_every_resolution_in_both_modes(
        generator: Generator, previewer_name: str) -> None:
    side = preview_side(generator.resolution)
    photo, face = photo_with_face()
    stages = bundle(generator, PREVIEWERS[previewer_name]())
    _, made = drain(pipeline.prepare(stages, photo, (face,), 0))
    assert isinstance(made, PreparedFace)
    prepared = made.prepared
    assert prepared.reconstruction.shape == (side, side, 3) and prepared.reconstruction.dtype == np.uint8
    assert prepared.preview_crop.shape == (side, side, 3)
    assert prepared.head_mask.shape == (side, side)

    unedited = pipeline.render_preview(made.renderer, prepared.ws, pipeline.frame_side(prepared))
    assert np.array_equal(pipeline.compose_preview(prepared, unedited, "transfer"), prepared.preview_crop)
    edited_ws = prepared.ws + 0.8 * torch.randn(prepared.ws.shape, generator=torch.Generator().manual_seed(1))
    frame = pipeline.render_preview(made.renderer, edited_ws, pipeline.frame_side(prepared))
    assert frame.shape == (side, side, 3)
    for mode in ("transfer", "replace"):
        composed = pipeline.compose_preview(prepared, frame, mode)
        assert composed.shape == (side, side, 3) and composed.dtype == np.uint8, mode
    assert not np.array_equal(pipeline.compose_preview(prepared, frame, "transfer"), prepared.preview_crop)
    assert np.array_equal(pipeline.compose_preview(prepared, frame, "replace"), frame)


@pytest.mark.parametrize("photo_detail", ["transfer", "replace"])
def test_finalize_lays_a_full_size_render_into_the_photo_at_every_resolution(
        generator: Generator, photo_detail: str) -> None:
    photo, face = photo_with_face()
    stages = bundle(generator, GeneratorPreviewer(), photo_detail)
    _, made = drain(pipeline.prepare(stages, photo, (face,), 0))
    edited_ws = made.prepared.ws + 0.8 * torch.randn(made.prepared.ws.shape,
                                                     generator=torch.Generator().manual_seed(1))
    _, renders = drain(pipeline.render_final(stages, made.generator, made.prepared, edited_ws))
    assert renders.edited.shape == (generator.resolution, generator.resolution, 3)
    result = pipeline.lay_into_photo(photo, made.prepared, renders)
    assert result.shape == photo.shape and not np.array_equal(result, photo)


def test_a_reconstruction_of_another_size_still_composes() -> None:
    """A session spilled before frames were always P×P kept its reconstruction at the renderer's size."""
    generator = slim_generator(128)
    photo, face = photo_with_face()
    _, made = drain(pipeline.prepare(bundle(generator, GeneratorPreviewer()), photo, (face,), 0))
    prepared = made.prepared
    old = dataclasses.replace(prepared, reconstruction=prepared.reconstruction[::2, ::2].copy())  # 128² of P=256
    frame = pipeline.render_preview(made.renderer, prepared.ws, pipeline.frame_side(prepared))
    composed = pipeline.compose_preview(old, frame, "transfer")
    assert composed.shape == prepared.preview_crop.shape
    assert np.abs(composed.astype(int) - prepared.preview_crop).mean() < 8  # (almost) no edit


def test_a_previewer_with_the_older_two_argument_fit_still_prepares() -> None:
    """A third-party previewer written before fit took the sliders' edits keeps working."""
    from fluidsrv_plugins.preview_generator import GeneratorRenderer

    from fluidsrv.pipeline import fit_previewer

    class OldPreviewer:
        def fit(self, generator: Any, ws: torch.Tensor) -> Any:
            yield from ()
            return GeneratorRenderer(generator, 512)

    generator = build_random_generator(random_generator_config(16))
    ws = generator.mapping(torch.zeros(1, generator.w_dim))
    job = fit_previewer(OldPreviewer(), generator, ws, torch.zeros(0, generator.num_ws, generator.w_dim))  # type: ignore[arg-type]
    with pytest.raises(StopIteration) as done:
        next(job)
    assert isinstance(done.value.value, GeneratorRenderer)
