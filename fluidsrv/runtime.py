"""What the server loads once and shares between sessions: the base generator, the active stage plugins,
the edit directions, and a small cache of per-session tuned models.

Everything here that touches the device is called on the executor's worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import torch

from fluidsrv import latents
from fluidsrv.direction_files import DirectionsUnavailableError
from fluidsrv.models.stylegan2 import Generator, GeneratorConfig
from fluidsrv.perceptual import ImageDistance, finetune_distance
from fluidsrv.pipeline import StageBundle
from fluidsrv.plugins import PluginError, StageCatalog, catalog_for
from fluidsrv.session.model import EditState, Prepared
from fluidsrv.settings import AUTO_PREVIEWERS, Settings
from fluidsrv.stages import Detector, Direction, Encoder, Inpainter, Previewer, PreviewRenderer, Segmenter
from fluidsrv.weights import load_generator

log = logging.getLogger(__name__)

EMBEDDED_GENERATOR_FILE = "generator-128.safetensors"
TEXT_SOURCE = "clip"
SINGLE_STAGES = ("detector", "encoder", "segmenter", "inpainter", "previewer")
"""Stages with exactly one active implementation (directions may come from several sources)."""


@dataclass(frozen=True)
class GeneratorSource:
    """Where the base generator came from, for ``/api/config`` and the logs."""

    description: str
    trained: bool


def random_generator_config(resolution: int) -> GeneratorConfig:
    """Return a small config of the real architecture, for development and tests (``generator="random:RES"``)."""
    channels = {2**i: (64 if 2**i <= 16 else 32) for i in range(2, resolution.bit_length())}
    return GeneratorConfig(resolution=resolution, w_dim=64, n_mapping=2, channels=channels)


def build_random_generator(config: GeneratorConfig, seed: int = 0) -> Generator:
    """Return a randomly initialised generator (reproducible for ``seed``) with its w_avg estimated."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(config)
    generator.estimate_w_avg(num_samples=2_000)
    return generator


def load_base_generator(spec: str, weights_dir: Path) -> tuple[Generator, GeneratorSource]:
    """Return the generator named by ``spec``: "embedded", "random:RES" or a checkpoint path (on CPU)."""
    if spec.startswith("random:"):
        resolution = int(spec.split(":", 1)[1])
        generator = build_random_generator(random_generator_config(resolution))
        return generator, GeneratorSource(f"random {resolution}px generator (untrained)", trained=False)
    if spec == "embedded":
        path = weights_dir / EMBEDDED_GENERATOR_FILE
        if not path.is_file():
            from fluidsrv.training.configs import get_config

            log.warning("%s is missing: serving an UNTRAINED generator of the embedded architecture", path)
            generator = build_random_generator(get_config("embedded-128").generator)
            return generator, GeneratorSource(f"untrained embedded-128 ({path.name} is missing)", trained=False)
    else:
        path = Path(spec).expanduser()
    generator, _ = load_generator(path)
    return generator, GeneratorSource(str(path), trained=True)


class TunedModels:
    """A small LRU cache of per-session tuned generators and preview renderers, rebuilt on demand."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[int, Generator, PreviewRenderer]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str, version: int) -> tuple[Generator, PreviewRenderer] | None:
        """Return the cached models of ``session_id`` if they are of ``version``."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None or entry[0] != version:
                return None
            self._entries.move_to_end(session_id)
            return entry[1], entry[2]

    def put(self, session_id: str, version: int, generator: Generator, renderer: PreviewRenderer) -> None:
        """Cache the models of ``session_id``, dropping the least recently used beyond capacity."""
        with self._lock:
            self._entries[session_id] = (version, generator, renderer)
            self._entries.move_to_end(session_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def forget(self, session_id: str) -> None:
        """Drop the cached models of ``session_id``."""
        with self._lock:
            self._entries.pop(session_id, None)

    def clear(self) -> int:
        """Drop every cached model; return how many sessions had one."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count


class Runtime:
    """The loaded models and plugins of a running server."""

    def __init__(
        self,
        settings: Settings,
        generator: Generator,
        source: GeneratorSource,
        catalog: StageCatalog,
        *,
        tuned_capacity: int = 8,
    ) -> None:
        self.settings = settings
        self.device = torch.device(settings.resolved_device())
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.source = source
        self.catalog = catalog
        self.tuned = TunedModels(tuned_capacity)
        self.directions: dict[str, Direction] = {}
        self.direction_sources: list[str] = []
        self.direction_problems: dict[str, str] = {}  # source name -> why it gave no directions
        self.spread = latents.latent_spread(self.generator)
        self._text_source: Any = None
        self._session_directions: dict[str, tuple[tuple[int, int], dict[str, Direction]]] = {}
        self._directions_generation = 0  # bumped whenever the shared directions change
        self._finetune_distance: ImageDistance | None = None  # built on first use, on the worker
        self._distance_lock = threading.Lock()
        self._slider_edits: tuple[int, torch.Tensor] | None = None  # (directions generation, edits)
        self.skipped: dict[str, dict[str, str]] = {}  # stage -> {plugin skipped when choosing: why}
        self._active: dict[str, tuple[str, Any]] = {}  # stage -> (name, instance) of this runtime's plugins
        self._lock = threading.Lock()

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Load the generator and the plugins named in ``settings`` (slow: call off the event loop)."""
        generator, source = load_base_generator(settings.generator, settings.weights_dir)
        catalog = catalog_for(settings)  # the process's one catalog for these settings, shared with the CLI
        runtime = cls(settings, generator, source, catalog)
        for stage in SINGLE_STAGES:
            name = runtime.activate_suitable(stage, settings.stage_preferences(stage))
            log.info("%s: %s", stage, name)
        runtime.load_directions(settings.stage_preferences("directions"))
        return runtime

    def activate_suitable(self, stage: str, preferences: list[str]) -> str:
        """Activate the first of ``preferences`` that is available and suits the generator; return its name.

        A plugin object may say it cannot work with this generator through an optional ``suits(generator) ->
        str | None`` method (an encoder without weights of its shape, a previewer without a student for it); such
        a plugin is skipped like an unavailable one, and every skip is kept with its reason (``/api/config``).
        """
        skipped: dict[str, str] = {}
        if stage == "previewer" and preferences == ["auto"]:  # an admin switch to "auto"
            preferences = list(AUTO_PREVIEWERS)
        for name in preferences:
            instance, reason = self._suitable(stage, name)
            if reason is None:
                with self._lock:  # this runtime's choice (the catalog is shared by every runtime of the process)
                    self._active[stage] = (name, instance)
                    self.skipped[stage] = skipped
                for other, why in skipped.items():
                    log.info("%s %s skipped: %s", stage, other, why)
                return name
            skipped[name] = reason
        tried = "; ".join(f"{name}: {reason}" for name, reason in skipped.items()) or "none configured"
        raise PluginError(f"no {stage} plugin is available for this generator ({tried})")

    def _suitable(self, stage: str, name: str) -> tuple[Any, str | None]:
        """Build ``stage``/``name`` and check it suits the generator: (instance, None) or (None, why not)."""
        if name not in self.catalog.names(stage):
            return None, "not installed"
        reason = self.catalog.unavailable_reason(stage, name)
        if reason is not None:
            return None, reason
        try:
            instance = self.catalog.create(stage, name)
            suits = getattr(instance, "suits", None)
            reason = suits(self.generator) if callable(suits) else None
        except Exception as error:  # a broken plugin is skipped with its reason, like an unavailable one
            log.exception("%s %s failed its checks for this generator", stage, name)
            return None, f"failed: {type(error).__name__}: {error}"
        return (instance, None) if reason is None else (None, str(reason))

    @overload
    def stage(self, stage: Literal["detector"]) -> Detector: ...
    @overload
    def stage(self, stage: Literal["encoder"]) -> Encoder: ...
    @overload
    def stage(self, stage: Literal["segmenter"]) -> Segmenter: ...
    @overload
    def stage(self, stage: Literal["inpainter"]) -> Inpainter: ...
    @overload
    def stage(self, stage: Literal["previewer"]) -> Previewer: ...

    def stage(self, stage: str) -> Any:
        """Return the active implementation of ``stage`` (one of SINGLE_STAGES), typed by its stage Protocol."""
        with self._lock:
            if stage not in self._active:
                raise PluginError(f"no {stage} plugin is active")
            return self._active[stage][1]

    def active_stages(self) -> dict[str, Any]:
        """Return the active plugin name of every stage (a list of sources for directions)."""
        with self._lock:
            active: dict[str, Any] = {stage: self._active.get(stage, (None,))[0] for stage in SINGLE_STAGES}
        active["directions"] = list(self.direction_sources)
        return active

    def skipped_stages(self) -> dict[str, dict[str, str]]:
        """Per stage, the preferred plugins skipped when it was chosen, each with the reason."""
        with self._lock:
            return {stage: dict(reasons) for stage, reasons in self.skipped.items() if reasons}

    def direction_status(self) -> dict[str, str]:
        """The direction sources that were asked for but give no sliders, each with the reason (for the UI)."""
        with self._lock:
            return dict(self.direction_problems)

    def load_directions(self, sources: list[str]) -> None:
        """Collect the directions of every available source in ``sources``.

        A source that is unavailable, or fails in any way for this generator, is skipped with its reason (see
        :meth:`direction_status`); only when no source gives directions at all is it an error.
        """
        directions: dict[str, Direction] = {}
        used: list[str] = []
        problems: dict[str, str] = {}
        for name in sources:
            reason = self._direction_source_problem(name)
            found: list[Direction] = []
            if reason is None:
                try:
                    found = self.catalog.create("directions", name).directions(self.generator)
                except (DirectionsUnavailableError, PluginError, ValueError) as error:
                    reason = str(error)
                except Exception as error:  # one broken source must not stop the server: record why, go on
                    log.exception("direction source %s failed for this generator", name)
                    reason = f"failed: {type(error).__name__}: {error}"
            if reason is not None:
                log.warning("direction source %s gives no sliders: %s", name, reason)
                problems[name] = reason
                continue
            for direction in found:
                if direction.name in directions:  # two sources used one name: keep both, qualified
                    direction = replace(direction, name=f"{name}:{direction.name}")
                directions[direction.name] = direction
            used.append(name)
        if not directions:
            tried = "; ".join(f"{name}: {reason}" for name, reason in problems.items()) or ", ".join(sources)
            raise PluginError(f"no direction source produced directions ({tried})")
        with self._lock:
            self.directions, self.direction_sources, self.direction_problems = directions, used, problems
            self._directions_generation += 1

    def _direction_source_problem(self, name: str) -> str | None:
        """Why the direction source ``name`` cannot be used at all, or None when it can be tried."""
        if name not in self.catalog.names("directions"):
            return self.catalog.failure_reason(name) or "not installed"
        return self.catalog.unavailable_reason("directions", name)

    def sefa_directions(self, layers: tuple[int, int], k: int) -> list[Direction]:
        """Compute the top-``k`` SeFa directions of a layer range (closed form, milliseconds)."""
        start, stop = layers
        source = self.catalog.create("directions", "sefa", {"layers": f"{start}:{stop}", "k": k})
        found: list[Direction] = source.directions(self.generator)
        return found

    def text_direction(self, prompt: str, layers: tuple[int, int] | None) -> Direction:
        """Find the direction of a text prompt with the CLIP plugin (its table is built once per generator)."""
        with self._lock:
            source = self._text_source
        if source is None:
            source = self.catalog.create("directions", TEXT_SOURCE)
            with self._lock:
                self._text_source = source
        direction: Direction = source.direction_for(self.generator, prompt)
        if layers is not None:
            start, stop = layers
            direction = replace(direction, name=f"{direction.name}@{start}:{stop}", layers=layers)
        return direction

    def directions_for(self, session_id: str, edit: EditState) -> dict[str, Direction]:
        """The sliders of a session: the shared directions and the ones it added (SeFa ranges, prompts).

        The merged mapping is remembered per session and version, so the slider model's cache (keyed by the
        identity of the Direction objects) keeps working across previews.
        """
        if not edit.directions:
            return self.directions
        key = (self._directions_generation, edit.version)
        with self._lock:
            cached = self._session_directions.get(session_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        merged = {**self.directions, **edit.directions}
        with self._lock:
            self._session_directions[session_id] = (key, merged)
            while len(self._session_directions) > 4 * self.tuned.capacity:
                self._session_directions.pop(next(iter(self._session_directions)))
        return merged

    def stages(self) -> StageBundle:
        """The generator, the active stage plugins and the edit settings, as the pipeline takes them."""
        settings = self.settings
        return StageBundle(
            generator=self.generator, detector=self.stage("detector"), encoder=self.stage("encoder"),
            segmenter=self.stage("segmenter"), inpainter=self.stage("inpainter"), previewer=self.stage("previewer"),
            device=self.device, finetune=settings.finetune, finetune_steps=settings.finetune_steps,
            finetune_seconds=settings.prepare_seconds, finetune_distance=self.finetune_distance,
            inference_precision=settings.inference_precision,
            photo_detail=settings.photo_detail, outer_seg=settings.outer_seg, slider_edits=self.slider_edits())

    def slider_edits(self) -> torch.Tensor:
        """Every shared slider's Δws at full strength [K, num_ws, w_dim] (what a learning previewer trains on)."""
        with self._lock:
            generation, directions = self._directions_generation, list(self.directions.values())
            cached = self._slider_edits
        if cached is not None and cached[0] == generation:
            return cached[1]
        edits = latents.slider_extremes(directions, self.generator.num_ws, self.generator.w_dim,
                                        spread=self.spread, device=self.device)
        with self._lock:
            self._slider_edits = (generation, edits)
        return edits

    def finetune_distance(self) -> ImageDistance:
        """The fine-tune's perceptual distance (LPIPS-VGG when cached, else the offline one), built once (device)."""
        with self._distance_lock:
            if self._finetune_distance is None:
                self._finetune_distance = finetune_distance(self.settings.cache_dir, self.device)
            return self._finetune_distance

    def finetune_figures(self) -> dict[str, Any]:
        """The fine-tune's settings and each delta mode's bytes per session (for ``/api/stats``)."""
        from fluidsrv.pti import delta_sizes, pti_defaults

        settings, distance = self.settings, self._finetune_distance
        steps = settings.finetune_steps or pti_defaults(self.generator.resolution).steps
        return {"mode": settings.finetune, "steps": steps, "prepare_seconds": settings.prepare_seconds or None,
                "distance": distance.name if distance is not None else None,
                "delta_bytes_per_session": delta_sizes(self.generator)}

    def text_unavailable(self) -> str | None:
        """Why text-prompt directions cannot be made, or None when they can."""
        if TEXT_SOURCE not in self.catalog.names("directions"):
            return "the CLIP direction plugin is not installed"
        return self.catalog.unavailable_reason("directions", TEXT_SOURCE)

    def switch_stage(self, stage: str, name: str) -> None:
        """Make ``name`` the active ``stage`` plugin; on failure the previous one stays active."""
        if stage == "directions":
            self.load_directions([name])
            return
        if stage not in SINGLE_STAGES:
            raise PluginError(f"unknown stage {stage!r}")
        self.activate_suitable(stage, [name])
        if stage == "previewer":
            self.tuned.clear()

    def session_models(self, session_id: str, prepared: Prepared) -> tuple[Generator, PreviewRenderer]:
        """Return the session's tuned generator and preview renderer, rebuilding them after a restore."""
        cached = self.tuned.get(session_id, prepared.version)
        if cached is not None:
            return cached
        generator, renderer = self.build_session_models(prepared)
        self.tuned.put(session_id, prepared.version, generator, renderer)
        return generator, renderer

    def build_session_models(self, prepared: Prepared) -> tuple[Generator, PreviewRenderer]:
        """Build a prepared face's tuned generator and preview renderer (device work; not cached)."""
        from fluidsrv.pti import apply_delta

        delta = dict(prepared.generator_delta)
        generator = apply_delta(self.generator, delta) if delta else self.generator
        renderer = self.stage("previewer").restore(generator, dict(prepared.student_state))
        return generator, renderer

    def describe(self) -> dict[str, Any]:
        """Return the JSON-ready description of the models for ``/api/config``."""
        generator = self.generator
        return {
            "source": self.source.description,
            "trained": self.source.trained,
            "resolution": generator.resolution,
            "num_ws": generator.num_ws,
            "w_dim": generator.w_dim,
            "device": str(self.device),
        }
