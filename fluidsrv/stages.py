"""The contracts between the core and the stage plugins: what each stage takes and what it returns.

Conventions (see ARCHITECTURE.md): images on the geometry / IO side are uint8 RGB numpy arrays
``[H, W, 3]``; images on the model side are float tensors ``[N, 3, H, W]`` in [-1, 1]; ``w`` is
``[N, w_dim]`` and ``ws`` (w+) is ``[N, num_ws, w_dim]``.

Long-running stage work (projection, fine-tuning, distillation) is written as a Python generator
that yields :class:`Progress` after each step and *returns* its result: the executor drives it one
step at a time so previews interleave and a job can be cancelled between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

import numpy as np
import torch

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator as StyleGenerator

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class PluginError(RuntimeError):
    """A stage plugin is unknown, unavailable or failed to build."""


@dataclass(frozen=True)
class Progress:
    """One step of a long job: which stage, how far, and optionally an intermediate frame."""

    stage: str
    step: int
    total: int
    message: str = ""
    frame: np.ndarray | None = None  # optional uint8 [H, W, 3] intermediate image


StepJob = Generator[Progress, None, T]
"""A step-wise job: yields Progress after each step, returns its result (``StopIteration.value``)."""


@dataclass(frozen=True)
class Face:
    """A detected face in original-photo pixel coordinates.

    ``landmarks5`` is always present, ordered as in the image (viewer's left first): left eye centre,
    right eye centre, nose tip, left mouth corner, right mouth corner. ``landmarks68`` follows the
    dlib / iBUG 300-W order when the detector provides it.
    """

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    landmarks5: np.ndarray  # [5, 2] float64
    landmarks68: np.ndarray | None = None  # [68, 2] float64

    @property
    def area(self) -> float:
        """Area of the box in pixels."""
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class Latents:
    """An inversion result: ``w`` [1, w_dim] and ``ws`` (w+) [1, num_ws, w_dim]."""

    w: torch.Tensor
    ws: torch.Tensor


class LatentWarp(Protocol):
    """A nonlinear slider edit whose Δw depends on the face (e.g. a conditional flow's; see ``Direction.warp``)."""

    def delta(self, w: torch.Tensor, amounts: Mapping[str, float]) -> torch.Tensor:
        """Δw [N, w_dim] of faces ``w`` [N, w_dim] when this warp's sliders are set to ``amounts`` (name -> value)."""
        ...


@dataclass(frozen=True)
class Direction:
    """A named edit direction in W / W+ with the metadata a slider needs.

    With a ``unit`` the slider value is measured in that attribute unit ("years") and ``vector`` is the Δw of one
    unit (never rescaled by the spread of w); without, a value is in standard deviations of w along the vector.
    A ``warp`` makes the slider nonlinear and per face: :func:`fluidsrv.latents.apply_sliders` asks it for the Δw
    of the face at hand, and ``vector`` is its linear stand-in (e.g. for a previewer learning the edits).
    """

    name: str  # unique id within its source, e.g. "sefa:0-3:2"
    label: str  # what a person sees on the slider
    vector: torch.Tensor  # [1, w_dim] (all layers) or [num_ws, w_dim] (per layer)
    layers: tuple[int, int] | None = None  # [start, stop) layers it acts on; None = every layer
    slider_range: tuple[float, float] = (-3.0, 3.0)
    group: str = ""  # UI group, e.g. "Attributes", "SeFa", "GANSpace"
    provenance: str = ""  # how it was made (source, file, parameters)
    unit: str = ""  # the attribute unit of a slider value ("years", "degrees"); "" = standard deviations of w
    warp: LatentWarp | None = field(default=None, compare=False, repr=False)  # per-face nonlinear edit (not saved)

    def describe(self) -> dict[str, Any]:
        """The JSON form of everything but the vector (the one mapping: API, session spill and direction files)."""
        facts: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            "group": self.group,
            "min": float(self.slider_range[0]),
            "max": float(self.slider_range[1]),
            "layers": list(self.layers) if self.layers else None,
            "provenance": self.provenance,
        }
        if self.unit:
            facts["unit"] = self.unit
        return facts

    @classmethod
    def from_description(cls, facts: Mapping[str, Any], vector: torch.Tensor) -> Direction:
        """Rebuild a direction from :meth:`describe`'s JSON form and its vector."""
        layers = facts.get("layers")
        return cls(
            name=str(facts["name"]),
            label=str(facts["label"]),
            vector=vector,
            layers=(int(layers[0]), int(layers[1])) if layers else None,
            slider_range=(float(facts["min"]), float(facts["max"])),
            group=str(facts.get("group", "")),
            provenance=str(facts.get("provenance", "")),
            unit=str(facts.get("unit", "")),
        )


class Detector(Protocol):
    """Finds faces in an uploaded photo."""

    def detect(self, image: np.ndarray) -> list[Face]:
        """Return the faces in a uint8 RGB image [H, W, 3], largest first."""
        ...


class Encoder(Protocol):
    """Inverts an aligned face into the latent space of a generator."""

    def encode(self, image: torch.Tensor, generator: StyleGenerator) -> StepJob[Latents]:
        """Step-wise inversion of ``image`` [1, 3, R, R] in [-1, 1] (R = generator resolution)."""
        ...


class DirectionSource(Protocol):
    """Produces edit directions for a generator."""

    def directions(self, generator: StyleGenerator) -> list[Direction]:
        """Return the directions this source offers for ``generator``."""
        ...


class Segmenter(Protocol):
    """Parses a face image into soft part masks."""

    def parse(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Return float32 masks [H, W] in [0, 1] for at least "face" and "hair" of a uint8 RGB image."""
        ...


class Inpainter(Protocol):
    """Fills the masked region of an image."""

    def inpaint(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return ``image`` (uint8 RGB [H, W, 3]) with the pixels where ``mask`` (bool [H, W]) is set filled."""
        ...


class PreviewRenderer(Protocol):
    """Renders fast previews of one session's edits."""

    def render(self, ws: torch.Tensor) -> torch.Tensor:
        """Render ``ws`` [1, num_ws, w_dim] to an image [1, 3, H, W] in [-1, 1]."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the tensors that :meth:`Previewer.restore` needs to rebuild this renderer."""
        ...


class Previewer(Protocol):
    """Builds a per-session preview renderer (e.g. distils a student from the fine-tuned generator)."""

    def fit(self, generator: StyleGenerator, ws: torch.Tensor, edits: torch.Tensor) -> StepJob[PreviewRenderer]:
        """Step-wise preparation of a renderer that imitates ``generator`` (fine-tuned) around ``ws``.

        ``edits`` [K, num_ws, w_dim] are the server's sliders as Δws at full strength (K may be 0): the edits a
        renderer will be asked to draw, for a previewer that learns them (see the ``student`` previewer).
        """
        ...

    def restore(self, generator: StyleGenerator, state: dict[str, torch.Tensor]) -> PreviewRenderer:
        """Rebuild a renderer from its ``state_dict`` (after a session was spilled to disk)."""
        ...


class Scorer(Protocol):
    """Scores face attributes of generated images (used to find attribute directions)."""

    attributes: tuple[str, ...]

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return one [N] tensor per attribute for images [N, 3, H, W] in [-1, 1]."""
        ...


StageName = Literal["detector", "encoder", "directions", "segmenter", "inpainter", "previewer", "scorer"]
"""The stages a plugin can provide (one hook each, see :mod:`fluidsrv.hookspecs`)."""


class StageLookup(Protocol):
    """What a plugin context needs of the plugin catalog to build other stages (see :mod:`fluidsrv.plugins`)."""

    def create(self, stage: str, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """Build a new instance of ``stage``/``name``; raise PluginError when it is unavailable."""
        ...

    def unavailable_reason(self, stage: str, name: str, options: Mapping[str, Any] | None = None) -> str | None:
        """Return why ``stage``/``name`` cannot be built, or None."""
        ...


@dataclass(frozen=True)
class PluginContext:
    """What a plugin factory may use to build its stage object.

    A context made by the plugin catalog knows that catalog: :meth:`stage` builds another stage's plugin (e.g. the
    scorer a direction source fits with) from the same plugins, allow-list, options and device.
    """

    device: torch.device
    weights_dir: Path  # the embedded models shipped in the repository's weights/
    cache_dir: Path  # the user's weights cache (downloaded or user-provided files)
    options: Mapping[str, Any] = field(default_factory=dict)  # free-form settings for this plugin
    inference_precision: str = "auto"  # FLUIDSRV_INFERENCE_PRECISION (auto, bf16, fp16, fp32): fluidsrv.precision
    catalog: StageLookup | None = field(default=None, repr=False, compare=False)  # set by the plugin catalog

    @overload
    def stage(self, kind: Literal["detector"], name: str, options: Mapping[str, Any] | None = None) -> Detector: ...
    @overload
    def stage(self, kind: Literal["encoder"], name: str, options: Mapping[str, Any] | None = None) -> Encoder: ...
    @overload
    def stage(
        self, kind: Literal["directions"], name: str, options: Mapping[str, Any] | None = None
    ) -> DirectionSource: ...
    @overload
    def stage(self, kind: Literal["segmenter"], name: str, options: Mapping[str, Any] | None = None) -> Segmenter: ...
    @overload
    def stage(self, kind: Literal["inpainter"], name: str, options: Mapping[str, Any] | None = None) -> Inpainter: ...
    @overload
    def stage(self, kind: Literal["previewer"], name: str, options: Mapping[str, Any] | None = None) -> Previewer: ...
    @overload
    def stage(self, kind: Literal["scorer"], name: str, options: Mapping[str, Any] | None = None) -> Scorer: ...

    def stage(self, kind: StageName, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """Build a new instance of the ``kind`` plugin ``name`` (``options`` replace its configured ones).

        Raises :class:`PluginError` when it is unknown or unavailable, or when this context was
        not made by a plugin catalog.
        """
        return self._catalog().create(kind, name, options)

    def stage_unavailable(self, kind: StageName, name: str, options: Mapping[str, Any] | None = None) -> str | None:
        """Why the ``kind`` plugin ``name`` cannot be built (unknown, unavailable, no catalog), or None when it can."""
        if self.catalog is None:
            return "this plugin context has no plugin catalog"
        try:
            return self.catalog.unavailable_reason(kind, name, options)
        except Exception as error:  # an unknown stage or name
            return str(error)

    def _catalog(self) -> StageLookup:
        if self.catalog is None:

            raise PluginError("this plugin context has no plugin catalog: build it with fluidsrv.plugins.catalog_for")
        return self.catalog


def _always_available(context: PluginContext) -> str | None:
    return None


@dataclass(frozen=True)
class PluginFactory(Generic[T_co]):
    """A named, described way to build one stage object; ``unavailable`` says why it cannot be built."""

    name: str
    description: str
    create: Callable[[PluginContext], T_co]
    unavailable: Callable[[PluginContext], str | None] = _always_available
