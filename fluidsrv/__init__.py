"""fluidsrv: a self-hosted server for real-time AI face editing, built on StyleGAN2.

This package's namespace is the plugin API: ``from fluidsrv import hookimpl, PluginFactory, Detector, ...``
(see the README's plugin guide). The contracts themselves live in :mod:`fluidsrv.stages` and the hooks in
:mod:`fluidsrv.hookspecs`.
"""

from fluidsrv.hookspecs import hookimpl
from fluidsrv.stages import (
    Detector,
    Direction,
    DirectionSource,
    Encoder,
    Face,
    Inpainter,
    Latents,
    PluginContext,
    PluginFactory,
    Previewer,
    PreviewRenderer,
    Progress,
    Scorer,
    Segmenter,
    StageName,
    StepJob,
)

__all__ = [
    "Detector",
    "Direction",
    "DirectionSource",
    "Encoder",
    "Face",
    "Inpainter",
    "Latents",
    "PluginContext",
    "PluginFactory",
    "PreviewRenderer",
    "Previewer",
    "Progress",
    "Scorer",
    "Segmenter",
    "StageName",
    "StepJob",
    "__version__",
    "hookimpl",
]
__version__ = "0.1.0"
