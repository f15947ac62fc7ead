"""The README's plugin guide runs: one example per stage, built through a catalog, each method called on tiny inputs
and checked against its protocol in fluidsrv/stages.py; imports only from the fluidsrv package; entry points shown."""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fluidsrv import stages
from fluidsrv.plugins import STAGE_HOOKS, StageCatalog, build_plugin_manager
from fluidsrv.runtime import build_random_generator, random_generator_config
from fluidsrv.stages import Direction, Face, Latents, PluginContext, Progress

REPO = Path(__file__).resolve().parent.parent
PROTOCOLS: dict[str, type] = {
    "detector": stages.Detector,
    "encoder": stages.Encoder,
    "directions": stages.DirectionSource,
    "segmenter": stages.Segmenter,
    "inpainter": stages.Inpainter,
    "previewer": stages.Previewer,
    "scorer": stages.Scorer,
}


def guide() -> str:
    """The README's plugin-guide section (up to the next second-level heading)."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Plugin guide\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def blocks(language: str) -> list[str]:
    """The fenced code blocks of ``language`` in the plugin guide."""
    return re.findall(rf"^```{language}\n(.*?)^```", guide(), flags=re.MULTILINE | re.DOTALL)


def example_modules() -> list[types.ModuleType]:
    """Every Python block of the guide, executed as its own module."""
    modules = []
    for index, source in enumerate(blocks("python")):
        module = types.ModuleType(f"readme_plugin_{index}")
        exec(compile(source, f"README.md python block {index}", "exec"), module.__dict__)
        modules.append(module)
    return modules


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> StageCatalog:
    """A catalog of the built-ins and the README's examples."""
    pm = build_plugin_manager(load_entry_points=False)
    for module in example_modules():
        pm.register(module, name=module.__name__)
    folder = tmp_path_factory.mktemp("guide")
    return StageCatalog(pm, PluginContext(torch.device("cpu"), folder, folder))


def example_names(catalog: StageCatalog) -> dict[str, str]:
    """Stage -> the name of the README's example of it (exactly one per stage)."""
    found: dict[str, list[str]] = {stage: [] for stage in STAGE_HOOKS}
    for info in catalog.describe():
        if info.plugin.startswith("readme_plugin_"):
            found[info.stage].append(info.name)
    assert all(len(names) == 1 for names in found.values()), f"want one example per stage, have {found}"
    return {stage: names[0] for stage, names in found.items()}


def drain(job: Iterator[Progress]) -> Any:
    """Run a step job to its end; return its result."""
    while True:
        try:
            assert isinstance(next(job), Progress)
        except StopIteration as done:
            return done.value


def no_edits(generator: Any) -> torch.Tensor:
    """An empty edit bank [0, num_ws, w_dim] for a previewer's fit."""
    return torch.zeros(0, generator.num_ws, generator.w_dim)


def public_methods(cls: type) -> dict[str, Any]:
    """The public methods a class defines itself."""
    return {name: value for name, value in vars(cls).items() if inspect.isfunction(value) and not name.startswith("_")}


def built_examples(catalog: StageCatalog) -> list[tuple[object, type]]:
    """Every example object with the protocol it should follow (the previewer's renderer too)."""
    generator = build_random_generator(random_generator_config(16))
    names = example_names(catalog)
    made = [(catalog.create(stage, name), PROTOCOLS[stage]) for stage, name in names.items()]
    previewer = catalog.create("previewer", names["previewer"])
    renderer = drain(previewer.fit(generator, generator.mapping(torch.zeros(1, generator.w_dim)), no_edits(generator)))
    return [*made, (renderer, stages.PreviewRenderer)]


def test_every_example_runs(catalog: StageCatalog) -> None:
    names = example_names(catalog)
    assert all(catalog.unavailable_reason(stage, name) is None for stage, name in names.items())
    generator = build_random_generator(random_generator_config(16))
    photo = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)

    (face,) = catalog.create("detector", names["detector"]).detect(photo)
    assert isinstance(face, Face) and face.landmarks5.shape == (5, 2) and face.area > 0

    latents = drain(catalog.create("encoder", names["encoder"]).encode(torch.zeros(1, 3, 16, 16), generator))
    assert isinstance(latents, Latents) and latents.ws.shape == (1, generator.num_ws, generator.w_dim)

    directions = catalog.create("directions", names["directions"]).directions(generator)
    assert directions and all(isinstance(d, Direction) and d.vector.shape == (1, generator.w_dim) for d in directions)
    assert "brightness" in directions[0].label  # measured with the scorer example, found through the context

    masks = catalog.create("segmenter", names["segmenter"]).parse(photo)
    for part in ("face", "hair"):
        assert masks[part].shape == photo.shape[:2] and masks[part].dtype == np.float32
        assert 0.0 <= masks[part].min() and masks[part].max() <= 1.0

    hole = np.zeros(photo.shape[:2], dtype=bool)
    hole[10:20, 10:20] = True
    filled = catalog.create("inpainter", names["inpainter"]).inpaint(photo, hole)
    assert filled.shape == photo.shape and filled.dtype == np.uint8 and np.array_equal(filled[~hole], photo[~hole])

    previewer = catalog.create("previewer", names["previewer"])
    ws = latents.ws
    renderer = drain(previewer.fit(generator, ws, no_edits(generator)))
    with torch.inference_mode():
        frame = renderer.render(ws)
        again = previewer.restore(generator, renderer.state_dict()).render(ws)
    assert frame.shape[:2] == (1, 3) and torch.equal(frame, again)

    scorer = catalog.create("scorer", names["scorer"])
    scores = scorer.score(torch.zeros(2, 3, 16, 16))
    assert set(scores) == set(scorer.attributes) and all(value.shape == (2,) for value in scores.values())


def test_the_examples_follow_the_protocols(catalog: StageCatalog) -> None:
    shown: dict[type, set[str]] = {}
    for instance, protocol in built_examples(catalog):
        wanted = public_methods(protocol)
        for name, method in public_methods(type(instance)).items():
            assert name in wanted, f"{type(instance).__name__}.{name} is not a method of {protocol.__name__}"
            have, want = inspect.signature(method).parameters, inspect.signature(wanted[name]).parameters
            assert [(p.name, p.kind) for p in have.values()] == [(p.name, p.kind) for p in want.values()], (
                f"{type(instance).__name__}.{name}{inspect.signature(method)} differs from "
                f"{protocol.__name__}.{name}{inspect.signature(wanted[name])}"
            )
        for attribute in getattr(protocol, "__annotations__", {}):
            assert hasattr(instance, attribute), f"{type(instance).__name__} lacks {protocol.__name__}.{attribute}"
        shown.setdefault(protocol, set()).update(public_methods(type(instance)))
    for protocol in [*PROTOCOLS.values(), stages.PreviewRenderer]:
        missing = set(public_methods(protocol)) - shown.get(protocol, set())
        assert not missing, f"the README shows no {protocol.__name__} method {sorted(missing)}"


def test_the_examples_import_only_from_the_fluidsrv_package() -> None:
    sources = blocks("python")
    assert len(sources) == len(STAGE_HOOKS)
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fluidsrv"):
                assert node.module == "fluidsrv", f"the README imports from {node.module}: use `from fluidsrv import`"
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("fluidsrv") for alias in node.names)


def test_the_entry_point_registration_is_shown() -> None:
    (toml,) = blocks("toml")
    entry_points = tomllib.loads(toml)["project"]["entry-points"]["fluidsrv"]
    assert entry_points and all(isinstance(target, str) for target in entry_points.values())
