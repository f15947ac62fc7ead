"""The plugin catalog: every stage implementation by stage and name, built once per process.

:func:`catalog_for` builds the catalog of a :class:`~fluidsrv.settings.Settings` on first use (never at import)
and hands the same one to the server's runtime and to the CLI: built-in plugins are the modules in
:data:`DEFAULT_PLUGINS`; third-party plugins come from the ``fluidsrv`` entry-point group, restricted by the
settings' allow-list (``plugin_allow``). An entry point that fails to import is logged and kept as a
:class:`PluginFailure`, which :meth:`StageCatalog.describe` (``/api/config``) lists as unavailable.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import threading
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
import torch

from fluidsrv import hookspecs
from fluidsrv.stages import PluginContext, PluginError, PluginFactory

if TYPE_CHECKING:
    from fluidsrv.settings import Settings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fluidsrv"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "fluidsrv_plugins.detect_dlib",
    "fluidsrv_plugins.detect_mediapipe",
    "fluidsrv_plugins.detect_yunet",
    "fluidsrv_plugins.detect_insightface",
    "fluidsrv_plugins.segment_landmarks",
    "fluidsrv_plugins.segment_bisenet",
    "fluidsrv_plugins.inpaint_opencv",
    "fluidsrv_plugins.inpaint_lama",
    "fluidsrv_plugins.encode_project",
    "fluidsrv_plugins.encode_e4e",
    "fluidsrv_plugins.preview_generator",
    "fluidsrv_plugins.preview_student",
    "fluidsrv_plugins.directions_sefa",
    "fluidsrv_plugins.directions_ganspace",
    "fluidsrv_plugins.directions_attributes",
    "fluidsrv_plugins.directions_named",
    "fluidsrv_plugins.directions_flow",
    "fluidsrv_plugins.directions_files",
    "fluidsrv_plugins.directions_clip",
    "fluidsrv_plugins.score_classifier",
    "fluidsrv_plugins.score_age_gender",
    "fluidsrv_plugins.score_geometry",
)
"""Modules of the built-in plugins, registered in this order."""

STAGE_HOOKS: dict[str, str] = {
    "detector": "fluidsrv_detectors",
    "encoder": "fluidsrv_encoders",
    "directions": "fluidsrv_directions",
    "segmenter": "fluidsrv_segmenters",
    "inpainter": "fluidsrv_inpainters",
    "previewer": "fluidsrv_previewers",
    "scorer": "fluidsrv_scorers",
}
"""Stage name -> the hook that lists its factories."""

UNKNOWN_STAGE = "unknown"
"""The stage of a plugin that failed before saying which hooks it implements."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used: its entry point failed to import or register, or a hook of it raised."""

    plugin: str  # the entry-point (or module) name
    stage: str  # the stage whose hook failed, or UNKNOWN_STAGE when it failed before any hook ran
    reason: str  # "import failed: ...", "registration failed: ..." or "hook ... failed: ..."
    source: str = ""  # what the entry point points at, e.g. "my_package.my_module"


class FluidsrvPluginManager(pluggy.PluginManager):
    """A pluggy manager of the fluidsrv hooks that also keeps the plugins that failed to load."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.load_failures: list[PluginFailure] = []


def build_plugin_manager(
    allow: Collection[str] | None = None, *, load_entry_points: bool = True
) -> FluidsrvPluginManager:
    """Return a new plugin manager with the built-ins and the allowed entry-point plugins registered.

    Servers and commands use :func:`catalog_for` (which builds one per process); this is for isolated tests.
    """
    pm = FluidsrvPluginManager()
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allow is not None and entry_point.name not in allow:
                log.info("plugin %s is not in the allow-list; skipped", entry_point.name)
                continue
            if pm.get_plugin(entry_point.name) is not None:
                continue
            _register_entry_point(pm, entry_point)
    return pm


def _register_entry_point(pm: FluidsrvPluginManager, entry_point: importlib.metadata.EntryPoint) -> None:
    """Import and register one entry-point plugin; a failure is logged and kept, never raised."""
    try:
        plugin = entry_point.load()
    except Exception as error:  # a broken third-party plugin must not stop the server
        log.error("plugin %s failed to load: %s", entry_point.name, error)
        reason = f"import failed: {error}"
        pm.load_failures.append(PluginFailure(entry_point.name, UNKNOWN_STAGE, reason, entry_point.value))
        return
    try:
        pm.register(plugin, name=entry_point.name)
    except Exception as error:  # e.g. a hook pluggy does not know, or a wrong hook signature
        log.error("plugin %s failed to register: %s", entry_point.name, error)
        reason = f"registration failed: {error}"
        pm.load_failures.append(PluginFailure(entry_point.name, UNKNOWN_STAGE, reason, entry_point.value))


@dataclass(frozen=True)
class PluginInfo:
    """What ``/api/config`` says about one stage implementation."""

    stage: str
    name: str
    description: str
    plugin: str
    available: bool
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return {
            "stage": self.stage,
            "name": self.name,
            "description": self.description,
            "plugin": self.plugin,
            "available": self.available,
            "reason": self.reason,
        }


class StageCatalog:
    """All factories of all stages, by stage and name, with the active choice per stage."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        context: PluginContext,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.context = replace(context, catalog=self)  # plugins reach other stages through context.stage()
        self._options = dict(options or {})  # "stage.name" -> that plugin's options
        self._factories: dict[str, dict[str, tuple[str, PluginFactory[Any]]]] = {}
        self._failures: list[PluginFailure] = list(getattr(pm, "load_failures", ()))
        self._active: dict[str, tuple[str, Any]] = {}
        self._lock = threading.Lock()
        for stage, hook_name in STAGE_HOOKS.items():
            found: dict[str, tuple[str, PluginFactory[Any]]] = {}
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                try:
                    factories = list(impl.function() or [])
                except Exception as error:  # a broken plugin hook must not stop the server
                    log.error("plugin %s: %s() failed: %s", impl.plugin_name, hook_name, error)
                    self._failures.append(PluginFailure(impl.plugin_name, stage, f"{hook_name}() failed: {error}"))
                    continue
                for factory in factories:
                    if factory.name in found:
                        log.warning("%s %r from %s shadows an earlier one", stage, factory.name, impl.plugin_name)
                    found[factory.name] = (impl.plugin_name, factory)
            self._factories[stage] = found

    @property
    def failures(self) -> tuple[PluginFailure, ...]:
        """The plugins that failed to import, register or list their factories."""
        return tuple(self._failures)

    def names(self, stage: str) -> list[str]:
        """Return the factory names registered for ``stage``."""
        return list(self._stage(stage))

    def context_for(self, stage: str, name: str, options: Mapping[str, Any] | None = None) -> PluginContext:
        """Return the plugin context of ``stage``/``name``: the catalog context's options, then the plugin's
        configured options (or ``options`` instead of those) on top."""
        chosen = options if options is not None else self._options.get(f"{stage}.{name}", {})
        return replace(self.context, options={**self.context.options, **chosen})

    def unavailable_reason(self, stage: str, name: str, options: Mapping[str, Any] | None = None) -> str | None:
        """Return why ``stage``/``name`` (with ``options``, default the configured ones) cannot be built, or None."""
        _, factory = self._lookup(stage, name)
        try:
            return factory.unavailable(self.context_for(stage, name, options))
        except Exception as error:
            return f"availability check failed: {error}"

    def configured_options(self, stage: str, name: str) -> dict[str, Any]:
        """Return the options the settings give ``stage``/``name``."""
        return dict(self._options.get(f"{stage}.{name}", {}))

    def describe(self) -> list[PluginInfo]:
        """Return every stage implementation with its availability and the reason when unavailable, then one
        unavailable row per plugin that failed to load (its stage "unknown" unless a hook of it failed)."""
        infos = []
        for stage, found in self._factories.items():
            for name, (plugin_name, factory) in found.items():
                reason = self.unavailable_reason(stage, name)
                infos.append(PluginInfo(stage, name, factory.description, plugin_name, reason is None, reason))
        for failure in self._failures:
            description = f"entry point {failure.source}" if failure.source else f"plugin {failure.plugin}"
            infos.append(PluginInfo(failure.stage, failure.plugin, description, failure.plugin, False, failure.reason))
        return infos

    def failure_reason(self, name: str) -> str | None:
        """Why the plugin (entry point) ``name`` failed to load, or None when it did not fail."""
        return next((failure.reason for failure in self._failures if failure.plugin == name), None)

    def create(self, stage: str, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """Build a new instance of ``stage``/``name`` (``options`` replace the configured ones).

        Raises PluginError when it is unavailable or fails to build.
        """
        _, factory = self._lookup(stage, name)
        reason = self.unavailable_reason(stage, name, options)
        if reason is not None:
            raise PluginError(f"{stage} plugin {name!r} is unavailable: {reason}")
        try:
            return factory.create(self.context_for(stage, name, options))
        except Exception as error:
            raise PluginError(f"{stage} plugin {name!r} failed to start: {error}") from error

    def first_available(self, stage: str, preferences: list[str]) -> str:
        """Return the first name of ``preferences`` that is registered and available for ``stage``."""
        reasons = []
        for name in preferences:
            if name not in self._stage(stage):
                reasons.append(f"{name}: not installed")
                continue
            reason = self.unavailable_reason(stage, name)
            if reason is None:
                return name
            reasons.append(f"{name}: {reason}")
        raise PluginError(f"no {stage} plugin is available ({'; '.join(reasons) or 'none configured'})")

    def activate(self, stage: str, name: str, instance: Any = None) -> Any:
        """Make ``name`` the active ``stage`` implementation (``instance`` when already built by :meth:`create`);
        on failure the previous one stays active."""
        if instance is None:
            instance = self.create(stage, name)
        with self._lock:
            self._active[stage] = (name, instance)
        return instance

    def active(self, stage: str) -> tuple[str, Any]:
        """Return (name, instance) of the active implementation of ``stage``."""
        with self._lock:
            if stage not in self._active:
                raise PluginError(f"no {stage} plugin is active")
            return self._active[stage]

    def active_name(self, stage: str) -> str | None:
        """Return the name of the active implementation of ``stage``, or None."""
        with self._lock:
            entry = self._active.get(stage)
        return entry[0] if entry else None

    def _stage(self, stage: str) -> dict[str, tuple[str, PluginFactory[Any]]]:
        if stage not in self._factories:
            raise PluginError(f"unknown stage {stage!r}; stages: {', '.join(self._factories)}")
        return self._factories[stage]

    def _lookup(self, stage: str, name: str) -> tuple[str, PluginFactory[Any]]:
        found = self._stage(stage)
        if name not in found:
            known = ", ".join(sorted(found)) or "none"
            raise PluginError(f"unknown {stage} plugin {name!r}; known: {known}")
        return found[name]


# ---------------------------------------------------------------------------------------------- one per process

_CatalogKey = tuple[tuple[str, ...] | None, str, str, Path, Path, str]
_managers: dict[tuple[str, ...] | None, FluidsrvPluginManager] = {}  # plugins are imported once per allow-list
# a catalog lives while its runtime or command holds it: the active stage objects it keeps go with it
_catalogs: weakref.WeakValueDictionary[_CatalogKey, StageCatalog] = weakref.WeakValueDictionary()
_catalogs_lock = threading.Lock()


def plugin_manager_for(allow: Collection[str] | None) -> FluidsrvPluginManager:
    """Return this process's plugin manager for the allow-list ``allow`` (None = every entry point), built once."""
    key = None if allow is None else tuple(sorted(allow))
    with _catalogs_lock:
        if key not in _managers:
            _managers[key] = build_plugin_manager(key)
        return _managers[key]


def catalog_for(settings: Settings, device: torch.device | str | None = None) -> StageCatalog:
    """Return this process's plugin catalog for ``settings`` (its allow-list, plugin options, directories) on
    ``device`` (default: the settings' device), building it on first use; later calls share it while it is held."""
    resolved = torch.device(device if device is not None else settings.resolved_device())
    options = json.dumps(settings.plugin_options, sort_keys=True, default=str)
    allow = None if settings.plugin_allow is None else tuple(sorted(settings.plugin_allow))
    key: _CatalogKey = (allow, options, str(resolved), Path(settings.weights_dir), Path(settings.cache_dir),
                        settings.inference_precision)
    pm = plugin_manager_for(allow)
    with _catalogs_lock:
        catalog = _catalogs.get(key)
        if catalog is None:
            context = PluginContext(device=resolved, weights_dir=settings.weights_dir, cache_dir=settings.cache_dir,
                                    inference_precision=settings.inference_precision)
            catalog = _catalogs[key] = StageCatalog(pm, context, settings.plugin_options)
        return catalog


def forget_catalogs() -> None:
    """Drop this process's plugin managers and catalogs (tests that install an entry point call this)."""
    with _catalogs_lock:
        _managers.clear()
        _catalogs.clear()
