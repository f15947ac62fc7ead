"""Build the plugin manager and pick stage implementations by name.

The manager is built inside ``create_app`` / the CLI, never at import. Built-in plugins are the
modules in :data:`DEFAULT_PLUGINS`; third-party plugins come from the ``fluidsrv`` entry-point group
(optionally restricted by an allow-list of entry-point names).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pluggy

from fluidsrv import hookspecs
from fluidsrv.stages import PluginContext, PluginFactory

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
    "fluidsrv_plugins.directions_sefa",
    "fluidsrv_plugins.directions_ganspace",
    "fluidsrv_plugins.directions_attributes",
    "fluidsrv_plugins.directions_named",
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


class PluginError(RuntimeError):
    """A stage plugin is unknown, unavailable or failed to build."""


def build_plugin_manager(
    allow: Collection[str] | None = None, *, load_entry_points: bool = True
) -> pluggy.PluginManager:
    """Return a plugin manager with the built-ins and the allowed entry-point plugins registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allow is not None and entry_point.name not in allow:
                log.info("plugin %s is not in the allow-list; skipped", entry_point.name)
                continue
            if pm.get_plugin(entry_point.name) is not None:
                continue
            try:
                plugin = entry_point.load()
            except Exception as error:  # a broken third-party plugin must not stop the server
                log.error("plugin %s failed to load: %s", entry_point.name, error)
                continue
            pm.register(plugin, name=entry_point.name)
    return pm


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
        self.context = context
        self._options = dict(options or {})  # "stage.name" -> that plugin's options
        self._factories: dict[str, dict[str, tuple[str, PluginFactory[Any]]]] = {}
        self._active: dict[str, tuple[str, Any]] = {}
        self._lock = threading.Lock()
        for stage, hook_name in STAGE_HOOKS.items():
            found: dict[str, tuple[str, PluginFactory[Any]]] = {}
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                for factory in impl.function() or []:
                    if factory.name in found:
                        log.warning("%s %r from %s shadows an earlier one", stage, factory.name, impl.plugin_name)
                    found[factory.name] = (impl.plugin_name, factory)
            self._factories[stage] = found

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
        """Return every stage implementation with its availability and the reason when unavailable."""
        infos = []
        for stage, found in self._factories.items():
            for name, (plugin_name, factory) in found.items():
                reason = self.unavailable_reason(stage, name)
                infos.append(PluginInfo(stage, name, factory.description, plugin_name, reason is None, reason))
        return infos

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

    def activate(self, stage: str, name: str) -> Any:
        """Make ``name`` the active ``stage`` implementation; on failure the previous one stays active."""
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
