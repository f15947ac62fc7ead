"""The named sliders: Age, Gender, Smile, Mouth open, Eyes open, Head turn, Head tilt.

They are fitted once per generator by :mod:`fluidsrv.training.named_directions` (boundaries orthogonal to the
other attributes and to colour / lighting, with a measured layer range and slider range each). The embedded
generator's ship in ``weights/directions-128.safetensors``; for another generator,
``fluidsrv directions compute --source named --generator PATH`` writes ``<cache>/directions/named-<sha>.safetensors``.
A file is used only for the generator whose fingerprint it records.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fluidsrv import hookimpl
from fluidsrv.direction_files import DirectionsUnavailableError, load_directions, named_cache_path
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.stages import Direction, DirectionSource, PluginContext, PluginFactory

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

SHIPPED_PATTERN = "directions-*.safetensors"


def candidate_files(context: PluginContext, generator: Generator) -> list[Path]:
    """The files that may hold this generator's named sliders: the computed cache file, then the shipped ones."""
    return [named_cache_path(context.cache_dir, generator), *sorted(Path(context.weights_dir).glob(SHIPPED_PATTERN))]


class NamedDirections:
    """Reads the named sliders recorded for a generator's fingerprint."""

    def __init__(self, context: PluginContext) -> None:
        self.context = context

    def directions(self, generator: Generator) -> list[Direction]:
        """Return the generator's named sliders; DirectionsUnavailableError says what to run when none exist."""
        fingerprint = generator_sha256(generator)
        for path in candidate_files(self.context, generator):
            if not path.is_file():
                continue
            directions, metadata = load_directions(path)
            if metadata.get("kind") == "named" and metadata.get("generator_sha256") == fingerprint:
                return directions
        raise DirectionsUnavailableError(
            "named sliders (Age, Smile, Head turn, ...) are not computed for this generator: run "
            "`fluidsrv directions compute --source named --generator PATH` (a few minutes on a CPU), then restart"
        )


@hookimpl
def fluidsrv_directions() -> list[PluginFactory[DirectionSource]]:
    """Register the named-slider direction source."""
    return [
        PluginFactory(
            "named",
            "Named sliders (Age, Gender, Smile, Mouth open, Eyes open, Head turn, Head tilt), fitted per generator",
            create=NamedDirections,
        )
    ]
