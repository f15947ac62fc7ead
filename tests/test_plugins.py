"""The plugin catalog: built-ins, out-of-tree plugins through entry points, the allow-list, one catalog per
process, plugins reaching other stages through their context, failures listed, the docs."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fluidsrv
from fluidsrv import PluginContext, PluginFactory, hookimpl, hookspecs
from fluidsrv.plugins import (
    DEFAULT_PLUGINS,
    STAGE_HOOKS,
    UNKNOWN_STAGE,
    PluginError,
    StageCatalog,
    build_plugin_manager,
    catalog_for,
    forget_catalogs,
)
from fluidsrv.settings import Settings

REPO = Path(__file__).resolve().parent.parent

PLUGIN_SOURCE = '''
import numpy as np
from fluidsrv import Face, PluginFactory, hookimpl


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
    forget_catalogs()  # the process's catalogs were built without this entry point
    try:
        yield "corner"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)
        importlib.invalidate_caches()
        forget_catalogs()


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


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    values: dict = {"device": "cpu", "data_dir": tmp_path, "cache_dir": tmp_path / "cache", **overrides}
    return Settings(**values)


def test_one_catalog_per_process_and_settings(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, plugin_options={"encoder.project": {"steps": 3}})
    catalog = catalog_for(settings)
    assert catalog_for(settings_for(tmp_path, plugin_options={"encoder.project": {"steps": 3}})) is catalog
    assert catalog_for(settings, device="cpu") is catalog
    assert catalog.configured_options("encoder", "project") == {"steps": 3}
    assert catalog.context.device == torch.device("cpu") and catalog.context.catalog is catalog
    other = catalog_for(settings_for(tmp_path, plugin_options={"encoder.project": {"steps": 4}}))
    assert other is not catalog and other.configured_options("encoder", "project") == {"steps": 4}
    assert catalog_for(settings_for(tmp_path, plugin_allow=("nothing",))) is not catalog


def test_the_runtime_and_the_cli_share_the_catalog(tmp_path: Path) -> None:
    from fluidsrv.cli.project import build_stage
    from fluidsrv.runtime import Runtime

    settings = settings_for(
        tmp_path, generator="random:16", detector="dlib", encoder="project", directions="sefa",
        segmenter="landmarks", inpainter="telea",
    )  # fmt: skip
    runtime = Runtime.build(settings)
    assert runtime.catalog is catalog_for(settings)
    projector = build_stage(settings, torch.device("cpu"), "encoder", "project", {"steps": 2})
    assert type(projector) is type(runtime.stage("encoder"))


def test_the_catalog_keeps_to_the_allow_list(distribution: str, tmp_path: Path) -> None:
    assert "corner" in catalog_for(settings_for(tmp_path)).names("detector")
    assert "corner" in catalog_for(settings_for(tmp_path, plugin_allow=("corner",))).names("detector")
    closed = catalog_for(settings_for(tmp_path, plugin_allow=()))
    assert "corner" not in closed.names("detector")
    assert not closed.failures  # "broken" is not allowed either, so it was never imported


def test_an_entry_point_that_fails_to_import_is_listed(distribution: str, tmp_path: Path) -> None:
    catalog = catalog_for(settings_for(tmp_path))
    (broken,) = [info for info in catalog.describe() if info.name == "broken"]
    assert broken.stage == UNKNOWN_STAGE and broken.plugin == "broken" and not broken.available
    assert (broken.reason or "").startswith("import failed: ") and "_missing" in (broken.reason or "")
    assert broken.as_dict()["available"] is False
    assert catalog.failure_reason("broken") == broken.reason and catalog.failure_reason("corner") is None


class RaisingHooks:
    """A plugin whose scorer hook raises and whose segmenter hook works."""

    @hookimpl
    def fluidsrv_scorers(self) -> list:
        raise RuntimeError("scorer hook exploded")

    @hookimpl
    def fluidsrv_segmenters(self) -> list:
        return [PluginFactory("flat", "everything is face", lambda context: SimpleNamespace())]


def test_a_hook_that_raises_is_listed_with_its_stage(tmp_path: Path) -> None:
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(RaisingHooks(), name="raising")
    catalog = catalog_of(pm, tmp_path)
    assert "flat" in catalog.names("segmenter")
    (row,) = [info for info in catalog.describe() if info.plugin == "raising" and not info.available]
    assert row.stage == "scorer" and "scorer hook exploded" in (row.reason or "")


class BrightScorer:
    """A stand-in scorer: "age" = mean brightness, "gender" = red minus blue."""

    attributes: tuple[str, ...] = ("age", "gender")

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"age": images.mean(dim=(1, 2, 3)), "gender": (images[:, 0] - images[:, 2]).mean(dim=(1, 2))}


class BrightPlugin:
    """Registers the stand-in scorer."""

    @hookimpl
    def fluidsrv_scorers(self) -> list:
        return [PluginFactory("bright", "brightness as age", lambda context: BrightScorer())]


def test_a_plugin_builds_another_stage_through_its_context(tmp_path: Path) -> None:
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(BrightPlugin(), name="bright")
    catalog = catalog_of(pm, tmp_path, {"directions.attributes": {"scorer": "bright", "samples": 40}})
    context = catalog.context_for("directions", "attributes")
    assert context.catalog is catalog
    assert isinstance(context.stage("scorer", "bright"), BrightScorer)
    assert context.stage_unavailable("scorer", "bright") is None
    assert "unknown scorer plugin" in (context.stage_unavailable("scorer", "nope") or "")
    with pytest.raises(PluginError, match="unknown scorer plugin"):
        context.stage("scorer", "nope")
    bare = PluginContext(torch.device("cpu"), tmp_path, tmp_path)
    with pytest.raises(PluginError, match="no plugin catalog"):
        bare.stage("scorer", "bright")
    assert bare.stage_unavailable("scorer", "bright") == "this plugin context has no plugin catalog"


def test_attribute_directions_are_honest_about_the_generator(tmp_path: Path) -> None:
    from fluidsrv_plugins.directions_attributes import AttributeDirections

    from fluidsrv.runtime import build_random_generator, random_generator_config

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(BrightPlugin(), name="bright")
    catalog = catalog_of(pm, tmp_path, {"directions.attributes": {"scorer": "bright", "samples": 40}})
    assert "scorer bright" in (catalog.unavailable_reason("directions", "attributes") or "")
    generator = build_random_generator(random_generator_config(16))
    source = AttributeDirections(catalog.context_for("directions", "attributes"), scorer="bright", samples=40)
    job = source.compute(generator)  # the scorer comes from the catalog through the context
    try:
        while True:
            next(job)
    except StopIteration as done:
        fitted = done.value
    assert catalog.unavailable_reason("directions", "attributes") is None
    created = catalog.create("directions", "attributes")
    assert [d.name for d in created.directions(generator)] == [d.name for d in fitted]
    foreign = build_random_generator(random_generator_config(32), seed=1)
    with pytest.raises(Exception, match="for other generators"):
        source.directions(foreign)
    other_scorer = catalog_of(pm, tmp_path, {"directions.attributes": {"scorer": "classifier"}})
    assert "scorer classifier" in (other_scorer.unavailable_reason("directions", "attributes") or "")


def test_serving_plugins_do_not_import_the_training_package() -> None:
    code = (
        "import importlib, sys\n"
        "from fluidsrv.plugins import DEFAULT_PLUGINS\n"
        "for name in DEFAULT_PLUGINS: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('fluidsrv.training')))\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert found.stdout.strip() == "[]"


def test_the_plugin_api_is_importable_from_the_package() -> None:
    names = ["hookimpl", "PluginFactory", "PluginContext", "Face", "Latents", "Direction", "Progress", "StepJob"]
    protocols = ["Detector", "Encoder", "DirectionSource", "Segmenter", "Inpainter", "Previewer", "PreviewRenderer"]
    for name in [*names, *protocols, "Scorer"]:
        assert name in fluidsrv.__all__ and getattr(fluidsrv, name) is not None
    for module in ("fluidsrv.stages", "fluidsrv.plugins", "fluidsrv.hookspecs", "fluidsrv"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=REPO)


def test_api_config_lists_the_entry_point_that_failed_to_import(distribution: str, tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from fluidsrv.runtime import Runtime
    from fluidsrv.web import create_app
    from tests.server_support import small_settings

    settings = small_settings(tmp_path, directions="sefa,attributes")
    with TestClient(create_app(settings, runtime=Runtime.build(settings))) as client:
        config = client.get("/api/config").json()
    rows = {(row["stage"], row["name"]): row for row in config["plugins"]}
    broken = rows[(UNKNOWN_STAGE, "broken")]
    assert broken["available"] is False and broken["reason"].startswith("import failed: ")
    assert rows[("detector", "corner")]["available"] is True
    assert "computed yet" in config["directions_unavailable"]["attributes"]
