"""fluidsrv's own age / gender scorer: the small :class:`~fluidsrv.models.attributes.AttributeNet` we train on UTKFace.

Scores: ``age`` in years and ``gender`` as the probability of "male" (0–1). Weights: the embedded
``weights/attributes-128.safetensors`` (``fluidsrv train attributes``), or the plugin option ``model``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluidsrv import hookimpl
from fluidsrv.stages import PluginContext, PluginFactory, Scorer

WEIGHTS_FILE = "attributes-128.safetensors"
BATCH = 256


class ClassifierScorer:
    """Age (years) and P(male) of aligned face images from :class:`AttributeNet`."""

    attributes: tuple[str, ...] = ("age", "gender")

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        from fluidsrv.models.attributes import load_attribute_net

        self.device = torch.device(device)
        self.net = load_attribute_net(path, self.device)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``age`` [N] (years) and ``gender`` [N] (P(male)) for images [N, 3, H, W] in [-1, 1]."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(images.shape)}"
        ages, genders = [], []
        for start in range(0, images.shape[0], BATCH):
            batch = images[start : start + BATCH].to(self.device, torch.float32)  # [B, 3, H, W]
            age, logit = self.net(batch)
            age_flip, logit_flip = self.net(batch.flip(3))  # mirror-averaged, as evaluated
            ages.append(((age + age_flip) / 2).cpu())
            genders.append(torch.sigmoid((logit + logit_flip) / 2).cpu())
        return {"age": torch.cat(ages), "gender": torch.cat(genders)}


def _path(context: PluginContext) -> Path:
    explicit = context.options.get("model")
    return Path(explicit).expanduser() if explicit else context.weights_dir / WEIGHTS_FILE


def _unavailable(context: PluginContext) -> str | None:
    path = _path(context)
    if not path.is_file():
        return f"classifier weights {path} are missing; train them with `fluidsrv train attributes --data DIR`"
    return None


@hookimpl
def fluidsrv_scorers() -> list[PluginFactory[Scorer]]:
    """Register the embedded age / gender classifier."""
    return [
        PluginFactory(
            "classifier",
            "fluidsrv's small age/gender classifier trained on UTKFace (age in years, gender = P(male))",
            create=lambda context: ClassifierScorer(_path(context), context.device),
            unavailable=_unavailable,
        )
    ]
