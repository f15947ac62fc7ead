"""The BiSeNet face-parsing segmenter: the public ``79999_iter.pth`` checkpoint (19 CelebAMask-HQ classes).

The image is resized to 512² (the training size), normalised with the ImageNet mean and std and parsed;
the softmax probabilities of the classes are summed into the masks below, at 512², then resized back to
the image's size. The masks are soft (class probabilities) and those of :data:`PARTS` sum to 1 everywhere.

Class grouping (CelebAMask-HQ label order: 0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye, 5 r_eye,
6 eye_g, 7 l_ear, 8 r_ear, 9 ear_r, 10 nose, 11 mouth, 12 u_lip, 13 l_lip, 14 neck, 15 neck_l, 16 cloth,
17 hair, 18 hat):

* ``face`` = skin, brows, eyes, eyeglasses, ears, nose, mouth and lips (1–8, 10–13): everything the
  generator draws as the face, ears included (the generator renders them; earrings, neck, necklace,
  clothes and hats are not part of the face);
* ``hair`` = hair (17);
* the other parts as extra masks: ``background``, ``skin``, ``brows``, ``eyes``, ``glasses``, ``ears``,
  ``earrings``, ``nose``, ``mouth`` (inner mouth and lips), ``neck``, ``necklace``, ``cloth``, ``hat``,
  and ``head`` = face + hair.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from fluidsrv_plugins._faces import check_rgb_image

from fluidsrv import hookimpl
from fluidsrv.manifest import WeightsError
from fluidsrv.models.bisenet import CELEBAMASK_HQ_LABELS, INPUT_SIZE, N_CLASSES, BiSeNet, normalize
from fluidsrv.stages import PluginContext, PluginFactory, Segmenter
from fluidsrv.weights import CheckpointError, check_state_dict
from fluidsrv.weights_manager import WeightsManager

WEIGHTS_NAME = "bisenet-faceparsing"

FACE_CLASSES = (
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eye_g",
    "l_ear",
    "r_ear",
    "nose",
    "mouth",
    "u_lip",
    "l_lip",
)

PARTS: dict[str, tuple[str, ...]] = {
    "background": ("background",),
    "face": FACE_CLASSES,
    "hair": ("hair",),
    "earrings": ("ear_r",),
    "neck": ("neck",),
    "necklace": ("neck_l",),
    "cloth": ("cloth",),
    "hat": ("hat",),
}
"""A partition of the 19 classes: these masks sum to 1 at every pixel."""

FACE_PARTS: dict[str, tuple[str, ...]] = {
    "skin": ("skin",),
    "brows": ("l_brow", "r_brow"),
    "eyes": ("l_eye", "r_eye"),
    "glasses": ("eye_g",),
    "ears": ("l_ear", "r_ear"),
    "nose": ("nose",),
    "mouth": ("mouth", "u_lip", "l_lip"),
    "head": (*FACE_CLASSES, "hair"),
}
"""Finer masks inside the face, and the head (face + hair)."""


def class_groups() -> dict[str, list[int]]:
    """Return every output mask name with the class indices it sums."""
    index = {label: i for i, label in enumerate(CELEBAMASK_HQ_LABELS)}
    return {name: [index[label] for label in labels] for name, labels in {**PARTS, **FACE_PARTS}.items()}


def load_bisenet(path: Path, device: torch.device | str = "cpu") -> BiSeNet:
    """Load a face-parsing checkpoint (a plain state dict) with ``weights_only=True`` and strict keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than tensors ({str(error).splitlines()[0]})"
        ) from error
    except RuntimeError as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {error}") from error
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: expected a plain state dict of tensors (BiSeNet face parsing)")
    network = BiSeNet(N_CLASSES)
    check_state_dict(network, state, f"BiSeNet checkpoint {path}")
    network.load_state_dict(state, strict=True)
    return network.to(device).float().eval()


class BiSeNetSegmenter:
    """Soft part masks of a face image from BiSeNet's class probabilities."""

    def __init__(self, network: BiSeNet, device: torch.device | str = "cpu", input_size: int = INPUT_SIZE) -> None:
        assert input_size >= 32 and input_size % 32 == 0, f"input_size must be a multiple of 32, got {input_size}"
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.input_size = input_size
        groups = class_groups()
        self.names = list(groups)
        membership = torch.zeros(len(groups), network.n_classes)  # [G, K]: 1 where class k belongs to group g
        for row, indices in enumerate(groups.values()):
            membership[row, indices] = 1.0
        self._membership = membership.to(self.device)

    @torch.no_grad()
    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """Return the class probabilities [K, S, S] (S = ``input_size``) of a uint8 RGB image."""
        check_rgb_image(image)
        side = self.input_size
        shrinking = image.shape[0] > side or image.shape[1] > side
        resized = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        pixels = torch.from_numpy(resized).to(self.device).permute(2, 0, 1)[None].float() / 255.0  # [1, 3, S, S]
        logits = self.network(normalize(pixels))  # [1, K, S, S]
        return torch.softmax(logits[0], dim=0)  # [K, S, S]

    @torch.no_grad()
    def parse(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Return float32 masks [H, W] in [0, 1]: "face", "hair" and the parts listed in the module doc."""
        height, width = image.shape[:2]
        probabilities = self.probabilities(image)  # [K, S, S]
        grouped = torch.einsum("gk,khw->ghw", self._membership, probabilities)  # [G, S, S]
        resized = F.interpolate(grouped[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        masks = resized.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)  # [G, H, W]
        return {name: masks[row] for row, name in enumerate(self.names)}


def checkpoint_path(context: PluginContext) -> Path:
    """Return the checkpoint to use: the plugin option ``model``, else the weights cache's entry."""
    explicit = context.options.get("model")
    if explicit:
        return Path(explicit).expanduser()
    return WeightsManager.from_context(context).path_for(WEIGHTS_NAME)


def _unavailable(context: PluginContext) -> str | None:
    explicit = context.options.get("model")
    if explicit:
        path = Path(explicit).expanduser()
        return None if path.is_file() else f"BiSeNet checkpoint {path} (plugin option 'model') does not exist"
    try:
        return WeightsManager.from_context(context).missing_reason(WEIGHTS_NAME)
    except WeightsError as error:
        return str(error)


def _create(context: PluginContext) -> BiSeNetSegmenter:
    network = load_bisenet(checkpoint_path(context), context.device)
    return BiSeNetSegmenter(network, context.device, int(context.options.get("input_size", INPUT_SIZE)))


@hookimpl
def fluidsrv_segmenters() -> list[PluginFactory[Segmenter]]:
    """Register the BiSeNet face-parsing segmenter."""
    return [
        PluginFactory(
            "bisenet",
            "BiSeNet face parsing (79999_iter.pth, 19 CelebAMask-HQ classes): face, hair and 14 more masks",
            create=_create,
            unavailable=_unavailable,
        )
    ]
