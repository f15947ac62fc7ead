"""The ``generator`` previewer: previews render with the session's fine-tuned generator itself.

This is exact (the preview is what finalize will render) and fast for small generators such as the
embedded 128² one; for a 1024² generator on a CPU a distilled student is the faster choice. Frames
larger than ``max_side`` (option, default 512) are downscaled for the wire. On CUDA the renders run under
bf16 / fp16 autocast with channels-last activations unless ``FLUIDSRV_INFERENCE_PRECISION=fp32`` (see
:mod:`fluidsrv.precision`); frames leave as float32.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fluidsrv import hookimpl
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.precision import inference_autocast, prepare_for_inference
from fluidsrv.stages import PluginContext, PluginFactory, Previewer, PreviewRenderer, Progress, StepJob

DEFAULT_MAX_SIDE = 512


class GeneratorRenderer:
    """Renders ``ws`` with a (fine-tuned) generator, downscaled to at most ``max_side`` pixels."""

    def __init__(self, generator: Generator, max_side: int, precision: str = "auto") -> None:
        self.generator = generator
        self.max_side = max_side
        self.precision = precision  # FLUIDSRV_INFERENCE_PRECISION: autocast + channels-last on CUDA unless "fp32"
        prepare_for_inference(generator, generator.input.input.device, precision)

    @torch.inference_mode()
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        """Render ``ws`` [1, num_ws, w_dim] to [1, 3, H, W] in [-1, 1]."""
        with inference_autocast(ws.device, self.precision):
            image = self.generator.synthesis(ws, noise_mode="const").float()  # [1, 3, R, R]
        if image.shape[-1] > self.max_side:
            image = F.interpolate(image, size=(self.max_side, self.max_side), mode="bilinear", antialias=True)
        return image

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing to store: the renderer is rebuilt from the session's generator."""
        return {}


class GeneratorPreviewer:
    """Builds :class:`GeneratorRenderer` instances (no training step)."""

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE, precision: str = "auto") -> None:
        self.max_side = max_side
        self.precision = precision  # FLUIDSRV_INFERENCE_PRECISION

    def fit(self, generator: Generator, ws: torch.Tensor, edits: torch.Tensor) -> StepJob[PreviewRenderer]:
        """Return a renderer of ``generator`` after one (trivial) step (``edits`` are not needed)."""
        yield Progress("distill", 1, 1, "previews render with the fine-tuned generator")
        return GeneratorRenderer(generator, self.max_side, self.precision)

    def restore(self, generator: Generator, state: dict[str, torch.Tensor]) -> PreviewRenderer:
        """Rebuild the renderer of ``generator`` (``state`` is empty)."""
        return GeneratorRenderer(generator, self.max_side, self.precision)


def _create(context: PluginContext) -> Previewer:
    return GeneratorPreviewer(int(context.options.get("max_side", DEFAULT_MAX_SIDE)), context.inference_precision)


@hookimpl
def fluidsrv_previewers() -> list[PluginFactory[Previewer]]:
    """Register the ``generator`` previewer."""
    return [PluginFactory("generator", "render previews with the fine-tuned generator itself (exact)", _create)]
