"""The plugin manager: built-ins, out-of-tree plugins through entry points, the allow-list, the docs."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fluidsrv import hookspecs
from fluidsrv.plugins import DEFAULT_PLUGINS, STAGE_HOOKS, PluginError, StageCatalog, build_plugin_manager
from fluidsrv.stages import PluginContext

REPO = Path(__file__).resolve().parent.parent

PLUGIN_SOURCE = '''
import numpy as np
from fluidsrv import hookimpl
from fluidsrv.stages import Face, PluginFactory


class CornerDetector:
    def detect(self, image):
        return [Face(box=(0.0, 0.0, 10.0, 10.0), score=1.0, landmarks5=np.zeros((5, 2)))]


@hookimpl
def fluidsrv_detectors():
    return [
        PluginFactory("corner", "finds a face in the corner, always", lambda context: CornerDetector()),
        PluginFactory("needs-key", "needs an option", lambda context: CornerDetector(),
                      unavailable=lambda context: None if context.options.get("key") else "no key option"),
    ]
'''


@pytest.fixture
def distribution(tmp_path: Path) -> Iterator[str]:
    """Install a temporary out-of-tree plugin distribution (a module + dist-info with an entry point)."""
    module = "fluidsrv_test_corner_plugin"
    (tmp_path / f"{module}.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "fluidsrv_test_corner_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fluidsrv-test-corner-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fluidsrv]\ncorner = {module}\nbroken = {module}_missing\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield "corner"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)
        importlib.invalidate_caches()


def catalog_of(pm: object, tmp_path: Path, options: dict | None = None) -> StageCatalog:
    context = PluginContext(device=torch.device("cpu"), weights_dir=tmp_path, cache_dir=tmp_path)
    return StageCatalog(pm, context, options)  # type: ignore[arg-type]


def test_builtins_register_and_every_stage_has_a_plugin(tmp_path: Path) -> None:
    pm = build_plugin_manager(load_entry_points=False)
    assert [name for name, _ in pm.list_name_plugin()] == list(DEFAULT_PLUGINS)
    catalog = catalog_of(pm, tmp_path)
    for stage in STAGE_HOOKS:
        assert catalog.names(stage), f"no built-in {stage} plugin"
    infos = catalog.describe()
    assert all(info.available or info.reason for info in infos)


def test_an_entry_point_plugin_is_found_and_usable(distribution: str, tmp_path: Path) -> None:
    pm = build_plugin_manager()
    assert pm.get_plugin(distribution) is not None
    catalog = catalog_of(pm, tmp_path, {"detector.needs-key": {"key": "yes"}})
    assert "corner" in catalog.names("detector")
    detector = catalog.activate("detector", "corner")
    assert detector.detect(None)[0].box == (0.0, 0.0, 10.0, 10.0)
    described = {info.name: info for info in catalog.describe() if info.stage == "detector"}
    assert described["corner"].plugin == "corner" and described["corner"].available
    assert described["needs-key"].available  # its option came from the settings
    without = catalog_of(pm, tmp_path)
    assert without.unavailable_reason("detector", "needs-key") == "no key option"
    with pytest.raises(PluginError, match="no key option"):
        without.create("detector", "needs-key")


def test_the_allow_list_keeps_other_entry_points_out(distribution: str) -> None:
    assert build_plugin_manager(allow=()).get_plugin(distribution) is None
    assert build_plugin_manager(allow=("corner",)).get_plugin(distribution) is not None


def test_a_failed_switch_keeps_the_active_plugin(distribution: str, tmp_path: Path) -> None:
    catalog = catalog_of(build_plugin_manager(), tmp_path)
    catalog.activate("detector", "corner")
    with pytest.raises(PluginError, match="unavailable"):
        catalog.activate("detector", "needs-key")
    with pytest.raises(PluginError, match="unknown detector plugin"):
        catalog.activate("detector", "nope")
    assert catalog.active_name("detector") == "corner"
    assert catalog.first_available("detector", ["nope", "needs-key", "corner"]) == "corner"


def test_every_hook_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    hooks = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("fluidsrv_")]
    assert set(hooks) == set(STAGE_HOOKS.values())
    for hook in hooks:
        assert f"`{hook}()`" in readme, f"README.md does not document the hook {hook}"
        assert inspect.getdoc(getattr(hookspecs, hook)), f"{hook} has no docstring"
