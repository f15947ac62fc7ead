"""The ``flow`` sliders: attribute edits in attribute units through a conditional normalizing flow (as StyleFlow's).

A flow file (:mod:`fluidsrv.models.flow`) holds an invertible map between W and a Gaussian conditioned on the
attributes of a face (age, gender, smile, mouth and eyes open, yaw, pitch, colour and lighting), a regressor of
those attributes from w, and the calibrated sliders. An edit maps the face's w to z under its current attributes
and back under the changed ones (``+10`` on Age: ten years older as the scorer measures it, the rest held), so
each slider is a :class:`~fluidsrv.stages.Direction` with a ``unit`` and a ``warp``: the slider model asks the
warp for the face's own nonlinear Δw (a few milliseconds on a CPU), and ``vector`` is the mean Δw per unit over
sampled faces for whatever treats sliders linearly (the preview student learns the edits from it).

The embedded generator's flow ships as ``weights/flow-128.safetensors``; for another generator
``fluidsrv directions compute --source flow --generator PATH`` writes ``<cache>/directions/flow-<sha>.safetensors``.
A file is used only for the generator whose fingerprint it records.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluidsrv import hookimpl
from fluidsrv.direction_files import DirectionsUnavailableError
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.models.flow import (
    AttributeRegressor,
    ConditionalFlow,
    FlowSlider,
    edit_faces,
    load_flow,
    read_flow_metadata,
    read_sliders,
)
from fluidsrv.stages import Direction, DirectionSource, PluginContext, PluginFactory

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

SHIPPED_PATTERN = "flow-*.safetensors"
GROUP = "Flow (attribute units)"
STAND_IN_FACES = 128  # sampled faces whose mean Δw per unit is each slider's linear stand-in
STAND_IN_TRUNCATION = 0.7


def flow_cache_path(cache_dir: Path, generator: Generator) -> Path:
    """Where ``fluidsrv directions compute --source flow`` writes this generator's flow."""
    return Path(cache_dir) / "directions" / f"flow-{generator_sha256(generator)[:16]}.safetensors"


class FlowWarp:
    """The per-face edit of a flow's sliders: Δw of faces w for slider values in attribute units."""

    def __init__(self, flow: ConditionalFlow, regressor: AttributeRegressor, sliders: list[FlowSlider]) -> None:
        self.flow = flow
        self.regressor = regressor
        self.sliders = {slider.name: slider for slider in sliders}
        self.index = {slider.name: flow.config.attributes.index(slider.score) for slider in sliders}

    @torch.no_grad()
    def delta(self, w: torch.Tensor, amounts: Mapping[str, float]) -> torch.Tensor:
        """Δw [N, w_dim] of faces ``w`` [N, w_dim] for slider ``amounts`` (name -> value in the slider's unit)."""
        codes = w.detach().float().to(self.flow.w_mean.device)  # [N, w_dim]
        change = torch.zeros(codes.shape[0], self.flow.config.conditions, device=codes.device)  # [N, C]
        for name, value in amounts.items():
            change[:, self.index[name]] += self.sliders[name].condition_change(float(value))
        if not bool(change.any()):
            return torch.zeros_like(w)
        return (edit_faces(self.flow, self.regressor, codes, change) - codes).to(w)


def candidate_files(context: PluginContext, generator: Generator) -> list[Path]:
    """The files that may hold this generator's flow: the computed cache file, then the shipped ones."""
    return [flow_cache_path(context.cache_dir, generator), *sorted(Path(context.weights_dir).glob(SHIPPED_PATTERN))]


def find_flow_file(context: PluginContext, generator: Generator) -> Path | None:
    """The first flow file recorded for this generator's fingerprint, or None."""
    fingerprint = generator_sha256(generator)
    for path in candidate_files(context, generator):
        if not path.is_file():
            continue
        try:
            metadata = read_flow_metadata(path)
        except Exception:  # a damaged or foreign file is skipped, never fatal
            continue
        if metadata.get("generator_sha256") == fingerprint:
            return path
    return None


@torch.no_grad()
def stand_in_vector(generator: Generator, warp: FlowWarp, slider: FlowSlider) -> torch.Tensor:
    """The mean Δw per unit [1, w_dim] of ``slider`` over sampled faces (the secant across its range)."""
    rng = torch.Generator().manual_seed(0)
    z = torch.randn(STAND_IN_FACES, generator.w_dim, generator=rng).to(next(generator.parameters()).device)
    w = generator.mapping(z, truncation_psi=STAND_IN_TRUNCATION)[:, 0].float()  # [F, w_dim]
    low, high = slider.minimum, slider.maximum
    secant = (warp.delta(w, {slider.name: high}) - warp.delta(w, {slider.name: low})) / (high - low)
    return secant.mean(dim=0, keepdim=True).cpu()  # [1, w_dim]


class FlowDirections:
    """Reads the flow recorded for a generator's fingerprint and offers its sliders."""

    def __init__(self, context: PluginContext) -> None:
        self.context = context

    def cache_path(self, generator: Generator) -> Path:
        """Where this generator's computed flow is (or will be) cached."""
        return flow_cache_path(self.context.cache_dir, generator)

    def directions(self, generator: Generator) -> list[Direction]:
        """The flow's sliders for ``generator``; DirectionsUnavailableError says what to run when there is none."""
        path = find_flow_file(self.context, generator)
        if path is None:
            raise DirectionsUnavailableError(
                "no attribute flow for this generator: run `fluidsrv directions compute --source flow --generator "
                f"PATH` (a few minutes on a CPU; written to {self.cache_path(generator)}), then restart"
            )
        try:
            flow, regressor, metadata = load_flow(path)
        except Exception as error:  # a damaged file gives no sliders, it never stops the server
            raise DirectionsUnavailableError(f"cannot read the attribute flow {path}: {error}") from error
        if flow.config.w_dim != generator.w_dim:
            raise DirectionsUnavailableError(f"{path}: the flow's w_dim {flow.config.w_dim} is not the generator's")
        sliders = read_sliders(metadata)
        warp = FlowWarp(flow.to(self.context.device), regressor.to(self.context.device), sliders)
        samples = metadata.get("samples", "?")
        return [
            Direction(
                name=slider.name,
                label=f"{slider.label} ({slider.unit})",
                vector=stand_in_vector(generator, warp, slider),
                slider_range=(slider.minimum, slider.maximum),
                group=GROUP,
                provenance=(
                    f"conditional normalizing flow ({flow.config.blocks} affine couplings) of W given "
                    f"{len(flow.config.attributes)} attributes, trained on {samples} generated faces; per-face edit "
                    f"of {slider.score} in {slider.unit}, calibrated on generated faces ({slider.gain:.2f} measured "
                    f"per unit of condition change); {path.name}"
                ),
                unit=slider.unit,
                warp=warp,
            )
            for slider in sliders
        ]


@hookimpl
def fluidsrv_directions() -> list[PluginFactory[DirectionSource]]:
    """Register the conditional-flow direction source."""
    return [
        PluginFactory(
            "flow",
            "Attribute sliders in attribute units (years, degrees) from a conditional normalizing flow (StyleFlow)",
            create=FlowDirections,
        )
    ]
