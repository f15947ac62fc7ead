"""SeFa: closed-form edit directions from the generator's own style-modulation weights (no sampling, milliseconds).

Options (``context.options``): ``variant`` = ``genforce`` (default: channel-normalised weights of each chosen
layer range) or ``rosinality`` (raw weights of every conv layer, directions applied to all layers);
``layers`` = comma-separated ranges for the genforce variant (default ``coarse,middle,fine``; also ``all``
or ``START:STOP``); ``k`` = directions per range (default 5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fluidsrv import hookimpl
from fluidsrv.directions import MORE_SLIDERS, sefa
from fluidsrv.plugin_options import option_int, option_layer_ranges
from fluidsrv.stages import Direction, DirectionSource, PluginContext, PluginFactory

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

VARIANTS = ("genforce", "rosinality")
SLIDER_RANGE = (-3.0, 3.0)  # in standard deviations of w along the direction (see fluidsrv.latents)


class SefaSource:
    """Top-k SeFa eigenvectors per layer range, as slider directions."""

    def __init__(self, variant: str = "genforce", layers: str = "coarse,middle,fine", k: int = 5) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown SeFa variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.layers = layers
        self.k = k

    def directions(self, generator: Generator) -> list[Direction]:
        """Return ``k`` directions per layer range (one range, every layer, for the rosinality variant)."""
        if self.variant == "rosinality":
            found = sefa(generator, None, normalize=False)
            return [
                Direction(
                    name=f"sefa:all:{index}",
                    label=f"SeFa {index + 1}",
                    vector=found.directions[index : index + 1],  # [1, w_dim]
                    layers=None,
                    slider_range=SLIDER_RANGE,
                    group=MORE_SLIDERS,
                    provenance=f"SeFa (rosinality, raw weights of all conv layers) eigenvector {index}, "
                    f"eigenvalue {float(found.values[index]):.4g}",
                )
                for index in range(min(self.k, generator.w_dim))
            ]
        directions = []
        for label, (start, stop) in option_layer_ranges({"layers": self.layers}, generator.num_ws, self.layers):
            found = sefa(generator, (start, stop), normalize=True)
            for index in range(min(self.k, generator.w_dim)):
                directions.append(
                    Direction(
                        name=f"sefa:{start}:{stop}:{index}",
                        label=f"SeFa {label} {index + 1}",
                        vector=found.directions[index : index + 1],  # [1, w_dim]
                        layers=(start, stop),
                        slider_range=SLIDER_RANGE,
                        group=MORE_SLIDERS,
                        provenance=f"SeFa (genforce, normalised weights of layers [{start}, {stop})) eigenvector "
                        f"{index}, eigenvalue {float(found.values[index]):.4g}",
                    )
                )
        return directions


def _create(context: PluginContext) -> SefaSource:
    options = context.options
    return SefaSource(
        variant=str(options.get("variant", "genforce")),
        layers=str(options.get("layers", "coarse,middle,fine")),
        k=option_int(options, "k", 5),
    )


@hookimpl
def fluidsrv_directions() -> list[PluginFactory[DirectionSource]]:
    """Register the SeFa direction source (the default for any generator)."""
    return [
        PluginFactory(
            "sefa",
            "SeFa closed-form directions from the style-modulation weights (options: variant, layers, k)",
            create=_create,
        )
    ]
