"""Every plugin hook of fluidsrv: the contract between the core and its plugins.

Each hook returns a list of :class:`fluidsrv.stages.PluginFactory`; the core collects the factories
of all registered plugins per stage and picks one by name from the settings. A factory reports a
missing dependency or weights file through ``unavailable`` instead of raising at import; one that needs another
stage (e.g. a scorer) builds it with ``context.stage(kind, name)`` from the process's plugin catalog.
"""

from __future__ import annotations

import pluggy

from fluidsrv.stages import (
    Detector,
    DirectionSource,
    Encoder,
    Inpainter,
    PluginFactory,
    Previewer,
    Scorer,
    Segmenter,
)

PROJECT_NAME = "fluidsrv"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def fluidsrv_detectors() -> list[PluginFactory[Detector]]:
    """Return face detector factories; a detector returns faces with boxes, scores and landmarks."""
    raise NotImplementedError


@hookspec
def fluidsrv_encoders() -> list[PluginFactory[Encoder]]:
    """Return encoder factories that invert an aligned face into w / w+ of a generator."""
    raise NotImplementedError


@hookspec
def fluidsrv_directions() -> list[PluginFactory[DirectionSource]]:
    """Return direction source factories that produce named edit directions for the sliders."""
    raise NotImplementedError


@hookspec
def fluidsrv_segmenters() -> list[PluginFactory[Segmenter]]:
    """Return segmenter factories that parse a face image into part masks (face, hair, ...)."""
    raise NotImplementedError


@hookspec
def fluidsrv_inpainters() -> list[PluginFactory[Inpainter]]:
    """Return inpainter factories that fill the seam region when an edited face is pasted back."""
    raise NotImplementedError


@hookspec
def fluidsrv_previewers() -> list[PluginFactory[Previewer]]:
    """Return previewer factories that build the fast per-session renderer for live slider previews."""
    raise NotImplementedError


@hookspec
def fluidsrv_scorers() -> list[PluginFactory[Scorer]]:
    """Return attribute scorer factories used to find and measure attribute directions."""
    raise NotImplementedError
