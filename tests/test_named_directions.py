"""Named sliders: fitted with measured layer and slider ranges, shipped per generator fingerprint, and a
generator without them still serves (the reason is listed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fluidsrv_plugins.directions_named import NamedDirections

from fluidsrv.direction_files import DirectionsUnavailableError, named_cache_path, save_directions
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.runtime import Runtime
from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR
from fluidsrv.stages import PluginContext
from fluidsrv.training.named_directions import (
    MAX_STRENGTH,
    MIN_STRENGTH,
    FitConfig,
    NamedAttribute,
    choose_layers,
    choose_strength,
    fit_named_directions,
    layer_candidates,
)
from fluidsrv.weights import load_generator
from tests.model_support import TINY_GENERATOR, drain, generator_with_w_avg
from tests.server_support import small_settings


class ChannelScorer:
    """Scores the mean of the red and of the blue channel: two attributes any generator has."""

    attributes = ("red", "blue")

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"red": images[:, 0].mean(dim=(1, 2)), "blue": images[:, 2].mean(dim=(1, 2))}


ATTRIBUTES = (
    NamedAttribute("red", "red", "Red", "Colour", "mean red", 0.05),
    NamedAttribute("blue", "blue", "Blue", "Colour", "mean blue", 0.05),
)


def test_layer_candidates_cover_coarse_middle_fine_and_all() -> None:
    candidates = layer_candidates(12)
    assert (0, 12) in candidates and (0, 4) in candidates and (4, 8) in candidates and (4, 12) in candidates
    assert len(set(candidates)) == len(candidates) and all(0 <= a < b <= 12 for a, b in candidates)


def test_choose_layers_prefers_the_range_with_less_leakage_among_strong_ones() -> None:
    stds = {"age": 1.0, "gender": 1.0}
    trials = {
        (0, 12): {"age": 10.0, "gender": 6.0},  # strongest, but it moves gender a lot
        (4, 8): {"age": 8.0, "gender": 0.5},  # 80 % of the effect, little leakage: chosen
        (8, 12): {"age": 2.0, "gender": 0.0},  # clean but too weak
    }
    assert choose_layers(trials, "age", stds) == (4, 8)


def test_choose_strength_interpolates_to_the_target_within_the_limits() -> None:
    assert choose_strength({1.0: 5.0, 2.0: 10.0, 3.0: 15.0}, 12.5) == 2.5
    assert choose_strength({1.0: 1.0, 2.0: 2.0}, 50.0) == MAX_STRENGTH  # never reached: the cap
    assert choose_strength({1.0: 30.0}, 5.0) == MIN_STRENGTH  # reached at once: the floor


def test_fitted_directions_carry_their_measurements_and_load_only_for_their_generator(tmp_path: Path) -> None:
    generator = generator_with_w_avg(TINY_GENERATOR)
    config = FitConfig(samples=300, probes=24)
    _, (directions, metadata) = drain(fit_named_directions(generator, [ChannelScorer()], ATTRIBUTES, config))

    assert [d.name for d in directions] == ["red", "blue"]
    for direction in directions:
        low, high = direction.slider_range
        assert low == -high and MIN_STRENGTH <= high <= MAX_STRENGTH
        assert direction.layers is None or direction.layers in layer_candidates(generator.num_ws)
        assert abs(float(direction.vector.norm()) - 1.0) < 1e-4 and "InterFaceGAN" in direction.provenance
    assert metadata["kind"] == "named" and "trials" in metadata["measured"]

    context = PluginContext(torch.device("cpu"), tmp_path / "weights", tmp_path / "cache")
    source = NamedDirections(context)
    with pytest.raises(DirectionsUnavailableError, match="fluidsrv directions compute --source named"):
        source.directions(generator)
    save_directions(named_cache_path(context.cache_dir, generator), directions, metadata)
    assert [d.name for d in source.directions(generator)] == ["red", "blue"]
    torch.manual_seed(1)
    other = Generator(TINY_GENERATOR).eval()  # other weights: another fingerprint
    with pytest.raises(DirectionsUnavailableError):
        source.directions(other)


def test_a_generator_without_named_sliders_serves_the_others_and_says_why(tmp_path: Path) -> None:
    runtime = Runtime.build(small_settings(tmp_path, directions="named,sefa"))
    assert runtime.direction_sources == ["sefa"]
    assert "fluidsrv directions compute --source named" in runtime.direction_status()["named"]
    assert all(direction.group == "More sliders" for direction in runtime.directions.values())


SHIPPED_DIRECTIONS = EMBEDDED_WEIGHTS_DIR / "directions-128.safetensors"
SHIPPED_GENERATOR = EMBEDDED_WEIGHTS_DIR / "generator-128.safetensors"


@pytest.mark.skipif(not (SHIPPED_DIRECTIONS.is_file() and SHIPPED_GENERATOR.is_file()), reason="no shipped weights")
def test_the_shipped_named_sliders_load_for_the_shipped_generator(tmp_path: Path) -> None:
    generator, _ = load_generator(SHIPPED_GENERATOR)
    context = PluginContext(torch.device("cpu"), EMBEDDED_WEIGHTS_DIR, tmp_path / "cache")
    names = [direction.name for direction in NamedDirections(context).directions(generator)]
    assert names[:3] == ["age", "gender", "smile"]
