"""Direction files: our ``fluidsrv-directions`` safetensors, where cached ones live, and the error when none fits.

A file holds each direction's vector as the tensor ``direction.<index>`` and everything else as JSON in the
metadata key ``directions``, in :meth:`fluidsrv.stages.Direction.describe`'s form. Files written before that
form stored the slider range as ``slider_range: [min, max]``; they load unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from safetensors.torch import save_file

from fluidsrv.fingerprint import generator_sha256
from fluidsrv.stages import Direction

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

DIRECTIONS_FORMAT = "fluidsrv-directions"


class DirectionsUnavailableError(RuntimeError):
    """A direction source cannot offer directions for this generator yet; the message says why and what to do."""


def save_directions(path: str | Path, directions: Sequence[Direction], metadata: dict[str, str] | None = None) -> None:
    """Write ``directions`` as safetensors (vectors as tensors, the rest as JSON metadata)."""
    names = [d.name for d in directions]
    assert len(set(names)) == len(names), f"direction names must be unique: {names}"
    tensors = {f"direction.{index}": d.vector.detach().float().cpu().contiguous() for index, d in enumerate(directions)}
    extra = dict(metadata or {})
    extra.update(format=DIRECTIONS_FORMAT, directions=json.dumps([d.describe() for d in directions]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=extra)


def load_directions(path: str | Path) -> tuple[list[Direction], dict[str, str]]:
    """Read directions written by :func:`save_directions` (either form); returns them with the file's metadata."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("format") != DIRECTIONS_FORMAT:
            raise ValueError(f"{path}: not a {DIRECTIONS_FORMAT} file")
        described: list[dict[str, Any]] = json.loads(metadata["directions"])
        directions = [
            Direction.from_description(_current_form(facts), handle.get_tensor(f"direction.{index}"))
            for index, facts in enumerate(described)
        ]
    return directions, metadata


def _current_form(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The description with an older file's ``slider_range: [min, max]`` turned into ``min`` and ``max``."""
    current = dict(facts)
    if "slider_range" in current:
        current["min"], current["max"] = current.pop("slider_range")
    return current


def attribute_cache_path(cache_dir: Path, generator: Generator, scorer_name: str) -> Path:
    """Where the attribute directions of ``generator`` scored by ``scorer_name`` are cached."""
    safe_scorer = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in scorer_name)
    fingerprint = generator_sha256(generator)[:16]
    return Path(cache_dir) / "directions" / f"attributes-{fingerprint}-{safe_scorer}.safetensors"


def named_cache_path(cache_dir: Path, generator: Generator) -> Path:
    """Where ``fluidsrv directions compute --source named`` writes this generator's named sliders."""
    return Path(cache_dir) / "directions" / f"named-{generator_sha256(generator)[:16]}.safetensors"
