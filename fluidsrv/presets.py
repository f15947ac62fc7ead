"""Single-edit presets: one hard-coded edit of a face, distilled from a generator, applied with no generator.

A preset file (safetensors) holds a :class:`~fluidsrv.models.preset.PresetNet` and, in its metadata, what it was
distilled from: the direction, the strength, the generator's sha256 and how close it came to the generator's own
edit on held-out faces (:mod:`fluidsrv.training.preset` writes them; ``weights/presets/`` ships some).

Applying one is finalize without the generator: detect → align each face at the preset's side → the network draws
the edited crop → the change between the crop and its edit is laid over the photo's head at the photo's own
resolution, with finalize's detail transfer and seam handling (:mod:`fluidsrv.transfer`: the change kept on the
parsed head, feathered and faded toward the crop's border, the photo's detail kept where structure did not move)
→ JPEG with the upload's metadata. Pixels outside the faces' heads are never touched. As in
:mod:`fluidsrv.pipeline`, each function says whether it is *device* work (the network, the segmenter: the
executor's worker) or *host* work (numpy on a thread).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluidsrv.compose import head_mask
from fluidsrv.convert import image_to_tensor, tensor_to_image
from fluidsrv.geometry import Alignment, align_face, face_landmarks, warp_crop
from fluidsrv.models.preset import PresetNet, PresetNetConfig
from fluidsrv.pipeline import detect_faces, host_square, preview_side
from fluidsrv.stages import Detector, Face, Segmenter
from fluidsrv.transfer import apply_to_photo, edit_layer, head_region

PRESET_FORMAT = "fluidsrv-preset"
PRESET_VERSION = "1"
PRESET_SUFFIX = ".safetensors"
PRESETS_FOLDER = "presets"  # under the weights folder
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")


class PresetError(ValueError):
    """A file is not a readable preset, or a preset cannot be made or applied as asked."""


@dataclass(frozen=True)
class PresetFacts:
    """What a preset is: its name and label, the edit it distils and how faithfully (from the file's metadata)."""

    name: str  # the file's stem: what the CLI, the API and the buttons call it
    label: str  # what a person sees on the button
    direction: str  # the slider it distils, e.g. "age"
    strength: float  # the slider value it bakes in
    generator_sha256: str  # the generator whose edit it learnt
    resolution: int  # the aligned crop side it works at
    fidelity: Mapping[str, Any] = field(default_factory=dict)  # held-out figures (PSNR...) of its training run
    training: Mapping[str, Any] = field(default_factory=dict)  # steps, seconds, pairs

    def describe(self) -> dict[str, Any]:
        """The JSON form (the API's ``GET /api/presets`` and ``fluidsrv preset list``)."""
        return {"name": self.name, "label": self.label, "direction": self.direction, "strength": self.strength,
                "generator_sha256": self.generator_sha256, "resolution": self.resolution,
                "fidelity": dict(self.fidelity), "training": dict(self.training)}


@dataclass(frozen=True, eq=False)
class Preset:
    """A loaded preset: its facts and its network (eval mode, frozen, on some device)."""

    facts: PresetFacts
    network: PresetNet


@dataclass(frozen=True, eq=False)
class FaceEdit:
    """A preset's edit of one face: its alignment, the crop the network saw, the network's edit and the head."""

    alignment: Alignment
    crop: np.ndarray  # uint8 [R, R, 3] the photo's aligned inner crop
    edited: np.ndarray  # uint8 [R, R, 3] the network's edit of it
    head: np.ndarray  # float32 [P, P] the segmenter's face + hair of the photo's inner crop


# ---- files ---------------------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """Return ``name`` when it is a valid preset name (lowercase letters, digits, ``-``, ``_``), else PresetError."""
    if not NAME_PATTERN.match(name):
        raise PresetError(f"{name!r} is not a preset name: use 1-48 lowercase letters, digits, '-' or '_'")
    return name


def save_preset(network: PresetNet, facts: PresetFacts, path: Path) -> None:
    """Write the network (fp16) and its facts to ``path`` (atomically); the file's stem must be the name."""
    check_name(path.stem)
    if path.stem != facts.name:
        raise PresetError(f"a preset named {facts.name!r} must be saved as {facts.name}{PRESET_SUFFIX}")
    tensors = {name: tensor.detach().to("cpu", torch.float16).contiguous()
               for name, tensor in network.state_dict().items()}
    metadata = {"format": PRESET_FORMAT, "version": PRESET_VERSION, "config": json.dumps(network.config.to_dict()),
                "label": facts.label, "direction": facts.direction, "strength": repr(float(facts.strength)),
                "generator_sha256": facts.generator_sha256, "fidelity": json.dumps(dict(facts.fidelity)),
                "training": json.dumps(dict(facts.training))}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a killed writer leaves no torn preset
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def read_facts(path: Path) -> tuple[PresetFacts, PresetNetConfig]:
    """The facts and network config of a preset file, from its header alone; PresetError when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises several types for a missing or broken file
        raise PresetError(f"{path.name} is not a readable safetensors file: {error}") from None
    if metadata.get("format") != PRESET_FORMAT:
        raise PresetError(f"{path.name} is not a fluidsrv preset (format={metadata.get('format')!r})")
    try:
        config = PresetNetConfig.from_dict(json.loads(metadata["config"]))
        facts = PresetFacts(
            name=check_name(path.stem), label=metadata.get("label") or path.stem, direction=metadata["direction"],
            strength=float(metadata["strength"]), generator_sha256=metadata.get("generator_sha256", ""),
            resolution=config.resolution, fidelity=json.loads(metadata.get("fidelity") or "{}"),
            training=json.loads(metadata.get("training") or "{}"))
    except (KeyError, ValueError, TypeError) as error:
        raise PresetError(f"{path.name}: the preset's metadata is incomplete: {error}") from None
    return facts, config


def load_preset(path: Path, device: torch.device | str = "cpu") -> Preset:
    """Device: load a preset file (fp32 on ``device``, eval mode, frozen)."""
    facts, config = read_facts(path)
    network = PresetNet(config)
    try:
        network.load_state_dict({name: tensor.float() for name, tensor in load_file(str(path)).items()}, strict=True)
    except RuntimeError as error:
        raise PresetError(f"{path.name}: the network does not match its config: {error}") from None
    return Preset(facts, network.to(device).eval().requires_grad_(False))


def find_presets(folder: Path) -> dict[str, Path]:
    """Every preset file in ``folder`` by name (sorted; a missing folder has none)."""
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.glob(f"*{PRESET_SUFFIX}")) if NAME_PATTERN.match(path.stem)}


# ---- applying ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def run_network(preset: Preset, crop: np.ndarray) -> np.ndarray:
    """Device: the preset's edit (uint8 [R, R, 3]) of an aligned crop (uint8 [R, R, 3])."""
    device = next(preset.network.parameters()).device
    return tensor_to_image(preset.network(image_to_tensor(crop, device)).float())


def parse_head(segmenter: Segmenter, photo: np.ndarray, alignment: Alignment) -> np.ndarray:
    """Device: the face + hair (float32 [P, P]) of the photo's inner crop, parsed at the preview side P (as
    prepare parses it for finalize's transfer)."""
    side = preview_side(alignment.inner.size)
    crop = warp_crop(photo, alignment.inner.resized(side), qsize=alignment.inner.side)  # [P, P, 3]
    return host_square(head_mask(segmenter.parse(crop)), side)


def edit_face(preset: Preset, segmenter: Segmenter, photo: np.ndarray, face: Face) -> FaceEdit:
    """Device: align ``face`` of ``photo`` at the preset's side, draw the preset's edit and parse the head."""
    alignment = align_face(photo, face_landmarks(face), size=preset.facts.resolution)
    edited = run_network(preset, alignment.inner_image)
    return FaceEdit(alignment, alignment.inner_image, edited, parse_head(segmenter, photo, alignment))


def edit_faces(preset: Preset, segmenter: Segmenter, photo: np.ndarray, faces: Sequence[Face]) -> list[FaceEdit]:
    """Device: :func:`edit_face` for each of ``faces``."""
    return [edit_face(preset, segmenter, photo, face) for face in faces]


def lay_edits_into_photo(photo: np.ndarray, edits: Sequence[FaceEdit]) -> np.ndarray:
    """Host: the photo (uint8 RGB [H, W, 3]) with every face's edit laid over its head, at the photo's resolution.

    The layer is finalize's (:func:`fluidsrv.transfer.edit_layer` of the edit against what the network saw, on
    the head region); only pixels inside each face's inner crop, and there only on its head, change.
    """
    result = photo
    for edit in edits:
        if edit.alignment.photo_shape != photo.shape[:2]:
            raise PresetError("a face edit was made on another photo")
        layer = edit_layer(edit.edited, edit.crop, head_region(edit.head, edit.edited.shape[0]))
        result = apply_to_photo(result, layer, edit.alignment.inner)
    return result.copy() if result is photo else result


def choose_faces(faces: Sequence[Face], face_index: int | None) -> tuple[Face, ...]:
    """All ``faces`` (``face_index`` None) or the one of that index; PresetError when it does not exist."""
    if face_index is None:
        return tuple(faces)
    if not 0 <= face_index < len(faces):
        raise PresetError(f"face {face_index} does not exist in this photo (found {len(faces)})")
    return (faces[face_index],)


def apply_preset(preset: Preset, detector: Detector, segmenter: Segmenter, photo: np.ndarray,
                 face_index: int | None = None) -> tuple[np.ndarray, int]:
    """Device and host in one call (the CLI's path): detect, edit every face (or one), lay the edits into the
    photo; returns the edited photo and how many faces were edited (0: no face, the photo unchanged)."""
    faces = choose_faces(detect_faces(detector, photo), face_index)
    edits = edit_faces(preset, segmenter, photo, faces)
    return lay_edits_into_photo(photo, edits), len(edits)
