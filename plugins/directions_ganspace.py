"""GANSpace: principal components of sampled ``w``'s, applied on chosen layers.

Options: ``layers`` = comma-separated ranges the components act on (default ``all``; ``coarse``, ``middle``,
``fine``, ``START:STOP``); ``k`` = components (default 10); ``samples`` = mapped z's (default 10,000);
``seed`` (default 0). The components are computed once per generator and remembered.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from fluidsrv import hookimpl
from fluidsrv.directions import MORE_SLIDERS, Factorization, pca, sample_w
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.plugin_options import option_int, option_layer_ranges
from fluidsrv.stages import Direction, DirectionSource, PluginContext, PluginFactory

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

SLIDER_RANGE = (-3.0, 3.0)  # in standard deviations of w along the component (see fluidsrv.latents)


class GanSpaceSource:
    """The top-k principal components of W as slider directions on each chosen layer range."""

    def __init__(self, layers: str = "all", k: int = 10, samples: int = 10_000, seed: int = 0) -> None:
        assert samples >= 2, "GANSpace needs at least 2 samples"
        self.layers = layers
        self.k = k
        self.samples = samples
        self.seed = seed
        self._computed: dict[str, Factorization] = {}
        self._lock = threading.Lock()

    def components(self, generator: Generator) -> Factorization:
        """The principal components [k, w_dim] and their std [k] of ``generator``'s W (computed once)."""
        key = generator_sha256(generator)
        with self._lock:
            if key not in self._computed:
                _, found = pca(sample_w(generator, self.samples, self.seed), min(self.k, generator.w_dim))
                self._computed[key] = found
            return self._computed[key]

    def directions(self, generator: Generator) -> list[Direction]:
        """Return ``k`` components per layer range."""
        found = self.components(generator)
        directions = []
        for label, (start, stop) in option_layer_ranges({"layers": self.layers}, generator.num_ws, self.layers):
            suffix = "" if label == "all" else f" {label}"
            for index in range(found.directions.shape[0]):
                directions.append(
                    Direction(
                        name=f"ganspace:{start}:{stop}:{index}",
                        label=f"PC {index + 1}{suffix}",
                        vector=found.directions[index : index + 1],  # [1, w_dim]
                        layers=None if (start, stop) == (0, generator.num_ws) else (start, stop),
                        slider_range=SLIDER_RANGE,
                        group=MORE_SLIDERS,
                        provenance=f"GANSpace PCA of {self.samples} sampled w (seed {self.seed}): component "
                        f"{index}, std {float(found.values[index]):.4g}, layers [{start}, {stop})",
                    )
                )
        return directions


def _create(context: PluginContext) -> GanSpaceSource:
    options = context.options
    return GanSpaceSource(
        layers=str(options.get("layers", "all")),
        k=option_int(options, "k", 10),
        samples=option_int(options, "samples", 10_000, minimum=2),
        seed=option_int(options, "seed", 0, minimum=0),
    )


@hookimpl
def fluidsrv_directions() -> list[PluginFactory[DirectionSource]]:
    """Register the GANSpace direction source."""
    return [
        PluginFactory(
            "ganspace",
            "GANSpace: principal components of sampled w (options: layers, k, samples, seed)",
            create=_create,
        )
    ]
