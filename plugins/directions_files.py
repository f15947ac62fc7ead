"""Directions read from files: e4e's InterFaceGAN boundaries and GANSpace PCA dicts (``.pt``), our safetensors.

Formats (all loaded with ``torch.load(weights_only=True)`` or safetensors, never unpickling code):

* InterFaceGAN boundary: a tensor [1, w_dim] (every layer) or [1, num_ws, w_dim] / [num_ws, w_dim] (per layer),
  e.g. ``interfacegan_age.pt``; the slider is named after the file (``age``);
* GANSpace PCA: ``{"mean": [1, w_dim], "comp": [K, 1, w_dim], "std": [K]}`` (``ganspace_ffhq_pca.pt``); the first
  ``k`` components become sliders on every layer;
* our ``fluidsrv-directions`` safetensors (:func:`fluidsrv.direction_files.save_directions`).

Options: ``path`` = a file or a folder of them (default ``<cache>/directions/files``); ``k`` = GANSpace components
per PCA file (default 10). Files that do not fit the generator (other w_dim or num_ws) are skipped with a warning.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fluidsrv import hookimpl
from fluidsrv.direction_files import DirectionsUnavailableError, load_directions
from fluidsrv.plugin_options import option_int
from fluidsrv.stages import Direction, DirectionSource, PluginContext, PluginFactory

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".pth", ".safetensors")
SLIDER_RANGE = (-3.0, 3.0)  # in standard deviations of w along the direction (see fluidsrv.latents)
_PREFIXES = re.compile(r"^(interfacegan|boundary|stylegan2?|ffhq)[_-]+|[_-]+(boundary|direction)$")


def slider_label(stem: str) -> str:
    """A readable slider label from a file name: ``interfacegan_age`` -> ``age``, ``smile_boundary`` -> ``smile``."""
    core = _PREFIXES.sub("", stem) or stem
    return core.replace("_", " ").replace("-", " ").strip()


def read_direction_file(path: Path, k: int = 10) -> list[Direction]:
    """Read one direction file (format chosen by content); ValueError for anything else."""
    if path.suffix == ".safetensors":
        directions, _ = load_directions(path)
        return directions
    data: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        return [interfacegan_direction(path, data)]
    if isinstance(data, dict) and {"comp", "std"} <= set(data):
        return ganspace_directions(path, data, k)
    kind = type(data).__name__ if not isinstance(data, dict) else f"dict with keys {sorted(map(str, data))}"
    raise ValueError(f"{path}: not a boundary tensor or a GANSpace PCA dict ({kind})")


def interfacegan_direction(path: Path, vector: torch.Tensor) -> Direction:
    """An InterFaceGAN boundary normal [1, w_dim], [w_dim], [1, num_ws, w_dim] or [num_ws, w_dim] as a slider."""
    vector = vector.detach().float()
    if vector.ndim == 3:
        if vector.shape[0] != 1:
            raise ValueError(f"{path}: a per-layer boundary must be [1, num_ws, w_dim], got {tuple(vector.shape)}")
        vector = vector[0]  # [num_ws, w_dim]
    if vector.ndim == 1:
        vector = vector.unsqueeze(0)  # [1, w_dim]
    if vector.ndim != 2:
        raise ValueError(f"{path}: a boundary must be [1, w_dim] or [num_ws, w_dim], got {tuple(vector.shape)}")
    label = slider_label(path.stem)
    return Direction(
        name=f"file:{path.stem}",
        label=label,
        vector=vector,
        layers=None,
        slider_range=SLIDER_RANGE,
        group="Files",
        provenance=f"InterFaceGAN boundary {tuple(vector.shape)} from {path}",
    )


def ganspace_directions(path: Path, pca: dict[str, Any], k: int) -> list[Direction]:
    """The first ``k`` components of a GANSpace PCA dict (``comp`` [K, 1, w_dim], ``std`` [K]) as sliders."""
    components = pca["comp"].detach().float()
    components = components.reshape(components.shape[0], -1)  # [K, w_dim]
    std = pca["std"].detach().float().reshape(-1)  # [K]
    if std.shape[0] != components.shape[0]:
        raise ValueError(f"{path}: {components.shape[0]} components but {std.shape[0]} std values")
    return [
        Direction(
            name=f"file:{path.stem}:{index}",
            label=f"{slider_label(path.stem)} PC {index + 1}",
            vector=components[index : index + 1],  # [1, w_dim]
            layers=None,
            slider_range=SLIDER_RANGE,
            group="Files",
            provenance=f"GANSpace component {index} (std {float(std[index]):.4g}) from {path}",
        )
        for index in range(min(k, components.shape[0]))
    ]


def fits(direction: Direction, generator: Generator) -> bool:
    """Whether a direction's vector and layers fit ``generator`` (w_dim, num_ws)."""
    shape = direction.vector.shape
    if shape[-1] != generator.w_dim or (direction.vector.ndim == 2 and shape[0] not in (1, generator.num_ws)):
        return False
    return direction.layers is None or direction.layers[1] <= generator.num_ws


class FileDirections:
    """Directions from a file or every direction file in a folder."""

    def __init__(self, path: Path, k: int = 10) -> None:
        self.path = path
        self.k = k

    def files(self) -> list[Path]:
        """The direction files this source reads, sorted by name."""
        if self.path.is_file():
            return [self.path]
        return sorted(path for path in self.path.iterdir() if path.suffix in SUFFIXES and path.is_file())

    def directions(self, generator: Generator) -> list[Direction]:
        """Read every file; keep the directions that fit ``generator``."""
        found, skipped = [], []
        for path in self.files():
            try:
                directions = read_direction_file(path, self.k)
            except (ValueError, RuntimeError, OSError) as error:
                log.warning("skipping direction file %s: %s", path, error)
                skipped.append(f"{path.name}: {error}")
                continue
            for direction in directions:
                if fits(direction, generator):
                    found.append(direction)
                else:
                    shape = tuple(direction.vector.shape)
                    skipped.append(f"{direction.name} {shape} does not fit [{generator.num_ws}, {generator.w_dim}]")
        if skipped:
            log.warning("direction files skipped: %s", "; ".join(skipped))
        if not found:
            raise DirectionsUnavailableError(
                f"no usable direction file in {self.path}: " + ("; ".join(skipped) or "empty")
            )
        return found


def _path(context: PluginContext) -> Path:
    explicit = context.options.get("path")
    return Path(explicit).expanduser() if explicit else context.cache_dir / "directions" / "files"


def _unavailable(context: PluginContext) -> str | None:
    path = _path(context)
    if path.is_file():
        return None
    if not path.is_dir():
        return f"no direction files: {path} does not exist (set the plugin option 'path' or put .pt files there)"
    if not any(child.suffix in SUFFIXES for child in path.iterdir()):
        return f"no .pt / .safetensors direction files in {path}"
    return None


def _create(context: PluginContext) -> FileDirections:
    return FileDirections(_path(context), k=option_int(context.options, "k", 10))


@hookimpl
def fluidsrv_directions() -> list[PluginFactory[DirectionSource]]:
    """Register the direction-file source."""
    return [
        PluginFactory(
            "files",
            "Directions from files: e4e InterFaceGAN boundaries, GANSpace PCA dicts (options: path, k)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
