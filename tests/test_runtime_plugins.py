"""The runtime's plugins for a generator they were not made for: it starts, and says why a source gives no sliders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluidsrv import PluginFactory, hookimpl
from fluidsrv.plugins import build_plugin_manager, catalog_for
from fluidsrv.runtime import Runtime, build_random_generator, load_base_generator, random_generator_config
from fluidsrv.settings import Settings
from fluidsrv.stages import Direction


def foreign_settings(tmp_path: Path) -> Settings:
    """The default settings (every stage, the default direction sources plus attributes) on a random 64² generator."""
    directions = f"{Settings().directions},attributes"
    return Settings(
        generator="random:64", device="cpu", data_dir=tmp_path, cache_dir=tmp_path / "cache", directions=directions
    )


def write_attribute_file(cache_dir: Path, name: str, content: bytes | None = None) -> None:
    """Put an attribute direction file into the cache: a real one of a 32² generator, or ``content`` as it is."""
    from fluidsrv.direction_files import attribute_cache_path, save_directions
    from fluidsrv.fingerprint import generator_sha256

    other = build_random_generator(random_generator_config(32), seed=5)
    path = attribute_cache_path(cache_dir, other, "classifier")
    path = path.with_name(name) if name else path
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        path.write_bytes(content)
        return
    direction = Direction("attr:age", "Age", torch.randn(1, other.w_dim))
    save_directions(path, [direction], {"generator_sha256": generator_sha256(other), "scorer": "classifier"})


@pytest.mark.parametrize("damaged", [False, True], ids=["foreign-file", "damaged-file-for-this-generator"])
def test_a_foreign_generator_starts_and_says_why_attributes_and_named_give_no_sliders(
    tmp_path: Path, damaged: bool
) -> None:
    from fluidsrv.direction_files import attribute_cache_path

    settings = foreign_settings(tmp_path)
    write_attribute_file(settings.cache_dir, "")
    if damaged:  # a file under this generator's name that is no safetensors file: it used to stop the startup
        generator, _ = load_base_generator(settings.generator, settings.weights_dir)
        name = attribute_cache_path(settings.cache_dir, generator, "classifier").name
        write_attribute_file(settings.cache_dir, name, b"not a safetensors file")
    assert catalog_for(settings).unavailable_reason("directions", "attributes") is None  # a file exists...

    runtime = Runtime.build(settings)  # ... but none for this generator: it starts all the same

    problems = runtime.direction_status()
    assert {"named", "attributes"} <= set(problems)
    assert "this generator" in problems["named"]
    expected = "cannot read" if damaged else "not computed yet (1 file(s) there are for other generators)"
    assert expected in problems["attributes"]
    assert "sefa" in runtime.direction_sources and runtime.directions


class RaisingSource:
    """A direction source with a bug."""

    def directions(self, generator: object) -> list[Direction]:
        raise RuntimeError("boom")


class RaisingPlugin:
    """Registers the buggy direction source."""

    @hookimpl
    def fluidsrv_directions(self) -> list:
        return [PluginFactory("raising", "always raises", lambda context: RaisingSource())]


def test_a_source_that_raises_anything_is_skipped_with_its_reason(tmp_path: Path) -> None:
    from fluidsrv.plugins import StageCatalog

    settings = foreign_settings(tmp_path)
    pm = build_plugin_manager(load_entry_points=False)
    pm.register(RaisingPlugin(), name="raising")
    catalog = StageCatalog(pm, catalog_for(settings).context)
    generator, source = load_base_generator(settings.generator, settings.weights_dir)
    runtime = Runtime(settings, generator, source, catalog)
    runtime.load_directions(["raising", "sefa", "nope"])
    assert runtime.direction_sources == ["sefa"]
    assert runtime.direction_status() == {"raising": "failed: RuntimeError: boom", "nope": "not installed"}


def test_an_encoder_without_weights_for_the_generator_is_skipped_for_the_next_one_and_said_so(
    tmp_path: Path,
) -> None:
    from starlette.testclient import TestClient

    from fluidsrv.web import create_app

    # the embedded encoder-128 (weights/) makes e4e available, but it predicts no codes of a 64² generator
    settings = Settings(generator="random:64", device="cpu", data_dir=tmp_path, cache_dir=tmp_path / "cache",
                        directions="sefa", admin_token="admin")
    assert settings.encoder == "e4e,project"
    assert catalog_for(settings).unavailable_reason("encoder", "e4e") is None
    runtime = Runtime.build(settings)
    assert runtime.active_stages()["encoder"] == "project"
    reason = runtime.skipped_stages()["encoder"]["e4e"]
    assert "no e4e encoder matches this generator (64²" in reason and "encoder-128.safetensors" in reason

    with TestClient(create_app(settings, runtime=runtime)) as client:
        config = client.get("/api/config").json()
        assert config["active"]["encoder"] == "project"
        assert "no e4e encoder matches this generator" in config["skipped"]["encoder"]["e4e"]
        assert str(settings.weights_dir) not in config["skipped"]["encoder"]["e4e"]  # no server path shown
        switched = client.post("/api/config/stages", json={"stage": "encoder", "name": "e4e"},
                               headers={"Authorization": "Bearer admin"})
        assert switched.status_code == 422 and "no e4e encoder matches" in switched.text
        assert client.get("/api/config").json()["active"]["encoder"] == "project"  # the old one stays
