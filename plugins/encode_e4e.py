"""The ``e4e`` encoder: one forward pass of an Encoder4Editing network gives ws (w0 + per-layer deltas + latent_avg).

Which weights: the file named by the ``encoder`` option when set (our safetensors or an e4e ``.pt``), else every
file that exists among our embedded ``weights/encoder-128.safetensors`` (for the embedded 128² generator) and
the official e4e FFHQ checkpoint in the weights cache (``e4e_ffhq_encode.pt``, for an FFHQ-1024 generator). At
``encode`` time the first file whose encoder predicts the generator's ``[num_ws, w_dim]`` codes is used (loaded
once, then kept); a generator no file matches is an error naming what exists. :meth:`E4EEncoder.suits` tells the
same without loading anything (from our files' headers and the official file's known shape), so the server skips
``e4e`` for such a generator and falls back to the next encoder of ``FLUIDSRV_ENCODER``. When our encoder file records
the fingerprint of the generator it was trained with and it differs from the generator given, a warning is
logged (same shapes, other weights: the codes will be poor until PTI corrects them).

``untrained=true`` builds a randomly initialised encoder for whatever generator is given (of the architecture named
by the ``architecture`` option, default ``tiny``; see ``fluidsrv.encoder_arch.ARCHITECTURES``), so the real code
path can be developed, tested and timed before any encoder is trained.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluidsrv import hookimpl
from fluidsrv.encoder_arch import (
    ARCHITECTURES,
    FINGERPRINT_KEY,
    encoder_config,
    generator_fingerprint,
    resize_for_encoder,
)
from fluidsrv.manifest import WeightsError
from fluidsrv.models.e4e import E4EConfig, Encoder4Editing
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.stages import Encoder, Latents, PluginContext, PluginFactory, Progress, StepJob
from fluidsrv.weights import CheckpointError, load_encoder, read_metadata
from fluidsrv.weights_manager import WeightsManager

log = logging.getLogger(__name__)

EMBEDDED_ENCODER = "encoder-128"  # manifest names
OFFICIAL_ENCODER = "e4e-ffhq"
UNTRAINED_ARCHITECTURE = "tiny"
_TRUE = {"1", "true", "yes", "on"}


@dataclass
class LoadedEncoder:
    """An encoder ready to run: the network, its latent average [num_ws, w_dim] and where it came from."""

    network: Encoder4Editing
    latent_avg: torch.Tensor
    source: str
    fingerprint: str | None = None  # the generator it was trained with, when the file says


def _is_true(value: Any) -> bool:
    return value is True or str(value).strip().lower() in _TRUE


def candidate_files(context: PluginContext) -> list[Path]:
    """The encoder files to consider, in order: the ``encoder`` option, else the existing embedded / official ones."""
    explicit = context.options.get("encoder")
    if explicit:
        return [Path(str(explicit)).expanduser()]
    return WeightsManager.from_context(context).existing_files((EMBEDDED_ENCODER, OFFICIAL_ENCODER))


def declared_shape(path: Path) -> tuple[int, int] | None:
    """(num_ws, w_dim) of an encoder file when it can be read cheaply (our safetensors metadata), else None."""
    if path.suffix != ".safetensors":
        return None
    try:
        config = E4EConfig.from_dict(json.loads(read_metadata(path)["config"]))
    except (CheckpointError, KeyError, ValueError) as error:
        log.warning("cannot read the encoder config of %s: %s", path, error)
        return None
    return config.num_ws, config.w_dim


def official_shape(path: Path, context: PluginContext) -> tuple[int, int] | None:
    """(18, 512) for the official e4e FFHQ file (known without reading its 1.2 GB), else None."""
    try:
        official = WeightsManager.from_context(context).path_for(OFFICIAL_ENCODER)
    except WeightsError:
        return None
    default = E4EConfig()
    return (default.num_ws, default.w_dim) if path == official else None


class E4EEncoder:
    """Encodes a face in one step with the encoder file that matches the generator (see the module docstring)."""

    def __init__(self, context: PluginContext) -> None:
        self.context = context
        self.untrained = _is_true(context.options.get("untrained", False))
        self.architecture = str(context.options.get("architecture", UNTRAINED_ARCHITECTURE))
        self.files = [] if self.untrained else candidate_files(context)
        self._loaded: dict[Any, LoadedEncoder] = {}
        self._shapes: dict[Path, tuple[int, int] | None] = {}
        self._lock = threading.Lock()

    def suits(self, generator: Generator) -> str | None:
        """Why no encoder file predicts ``generator``'s [num_ws, w_dim] codes, or None when one may (nothing is loaded).

        A file whose shape cannot be told without loading it (an e4e ``.pt`` named by the ``encoder`` option) is
        given the benefit of the doubt: encoding tells.
        """
        if self.untrained:
            return None
        shape = (generator.num_ws, generator.w_dim)
        with self._lock:
            known = [self._shape(path) for path in self.files]
        if any(found is None or found == shape for found in known):
            return None
        return self._no_match(generator)

    def encode(self, image: torch.Tensor, generator: Generator) -> StepJob[Latents]:
        """Step-wise (one step) encoding of ``image`` [1, 3, R, R] in [-1, 1] into ``generator``'s W+."""
        return self._encode(image, generator)

    def _encode(self, image: torch.Tensor, generator: Generator) -> StepJob[Latents]:
        resolution = generator.resolution
        assert image.shape == (1, 3, resolution, resolution), f"image must be [1, 3, {resolution}, {resolution}]"
        encoder = self.encoder_for(generator)
        device = generator.w_avg.device
        with torch.no_grad():
            inputs = resize_for_encoder(image.to(device), encoder.network.config.input_size)  # [1, 3, S, S]
            ws = encoder.network(inputs) + encoder.latent_avg  # [1, num_ws, w_dim]
        yield Progress("encode", 1, 1, f"e4e ({encoder.source})")
        return Latents(w=ws[:, 0].clone(), ws=ws)

    def encoder_for(self, generator: Generator) -> LoadedEncoder:
        """Return (loading once) the encoder for ``generator``'s [num_ws, w_dim]; raise ValueError when none fits."""
        shape = (generator.num_ws, generator.w_dim)
        device = generator.w_avg.device
        with self._lock:
            if self.untrained:
                key: Any = ("untrained", generator.config, device)
                if key not in self._loaded:
                    self._loaded[key] = self._untrained(generator)
                return self._loaded[key]
            for path in self.files:
                known = self._shape(path)
                if known is not None and known != shape:
                    continue
                key = (path, device)
                if key not in self._loaded:
                    self._loaded[key] = self._load(path, device)
                loaded = self._loaded[key]
                if (loaded.network.config.num_ws, loaded.network.config.w_dim) == shape:
                    self._warn_on_other_generator(loaded, generator)
                    return loaded
        raise ValueError(self._no_match(generator))

    def _shape(self, path: Path) -> tuple[int, int] | None:
        """(num_ws, w_dim) of ``path`` when known cheaply, read once (call with the lock held)."""
        if path not in self._shapes:  # a header for our files, nothing for the official one
            self._shapes[path] = declared_shape(path) or official_shape(path, self.context)
        return self._shapes[path]

    def _no_match(self, generator: Generator) -> str:
        """The message for a generator no encoder file predicts codes for, naming what each file predicts."""
        have = []
        for path in self.files:
            known = self._shapes.get(path)
            have.append(f"{path.name} ({known[0]} styles of width {known[1]})" if known else str(path))
        return (
            f"no e4e encoder matches this generator ({generator.resolution}², {generator.num_ws} styles of width "
            f"{generator.w_dim}); have: {', '.join(have) or 'no encoder files'}. Train one with `fluidsrv train "
            "encoder`, fetch e4e-ffhq for the FFHQ-1024 generator, or use the 'project' encoder"
        )

    def _load(self, path: Path, device: torch.device) -> LoadedEncoder:
        network, latent_avg = load_encoder(path, device)
        if latent_avg is None:
            raise ValueError(f"{path} stores no latent_avg; re-export it with save_encoder(latent_avg=...)")
        fingerprint = read_metadata(path).get(FINGERPRINT_KEY) if path.suffix == ".safetensors" else None
        log.info("loaded e4e encoder %s (%d styles, input %d²)", path, network.config.num_ws, network.config.input_size)
        return LoadedEncoder(network.requires_grad_(False), latent_avg, str(path), fingerprint)

    def _untrained(self, generator: Generator) -> LoadedEncoder:
        config = encoder_config(ARCHITECTURES[self.architecture], generator.config)
        network = Encoder4Editing(config).to(generator.w_avg.device).eval().requires_grad_(False)
        latent_avg = generator.w_avg.detach().unsqueeze(0).expand(config.num_ws, -1).clone()  # [num_ws, w_dim]
        return LoadedEncoder(network, latent_avg, "untrained")

    def _warn_on_other_generator(self, loaded: LoadedEncoder, generator: Generator) -> None:
        if loaded.fingerprint is None:
            return
        actual = generator_fingerprint(generator)
        if actual != loaded.fingerprint:
            log.warning(
                "encoder %s was trained for generator %s, not this one (%s): expect poor codes",
                loaded.source,
                loaded.fingerprint,
                actual,
            )
            loaded.fingerprint = None  # warn once


def _unavailable(context: PluginContext) -> str | None:
    if _is_true(context.options.get("untrained", False)):
        architecture = str(context.options.get("architecture", UNTRAINED_ARCHITECTURE))
        return None if architecture in ARCHITECTURES else f"unknown encoder architecture {architecture!r}"
    explicit = context.options.get("encoder")
    if explicit:
        path = Path(str(explicit)).expanduser()
        return None if path.is_file() else f"the encoder file {path} (option 'encoder') does not exist"
    if candidate_files(context):
        return None
    manager = WeightsManager.from_context(context)
    reasons = [manager.missing_reason(name) for name in (EMBEDDED_ENCODER, OFFICIAL_ENCODER)]
    return "no encoder weights: " + "; ".join(reason for reason in reasons if reason)


def _create(context: PluginContext) -> E4EEncoder:
    return E4EEncoder(context)


@hookimpl
def fluidsrv_encoders() -> list[PluginFactory[Encoder]]:
    """Register the e4e encoder."""
    return [
        PluginFactory(
            "e4e",
            "Encoder4Editing: one forward pass to w+ (our 128² encoder, or the official e4e for FFHQ-1024)",
            create=_create,
            unavailable=_unavailable,
        )
    ]
