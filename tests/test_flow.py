"""The conditional normalizing flow (``flow`` sliders): invertibility, conditioning, training, the shipped flow."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fluidsrv_plugins.directions_flow import FlowDirections, flow_cache_path
from fluidsrv_plugins.score_classifier import WEIGHTS_FILE, ClassifierScorer

from fluidsrv.direction_files import DirectionsUnavailableError
from fluidsrv.latents import apply_sliders, slider_basis
from fluidsrv.models.flow import ConditionalFlow, FlowConfig, load_flow, save_flow
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR
from fluidsrv.stages import Direction, PluginContext
from fluidsrv.training.flow import FlowFitConfig, fit_flow, train_flow
from fluidsrv.training.named_directions import NamedAttribute
from fluidsrv.weights import load_generator
from tests.model_support import TINY_GENERATOR, drain, generator_with_w_avg

SHIPPED_FLOW = EMBEDDED_WEIGHTS_DIR / "flow-128.safetensors"
SHIPPED_GENERATOR = EMBEDDED_WEIGHTS_DIR / "generator-128.safetensors"
needs_shipped = pytest.mark.skipif(
    not (SHIPPED_FLOW.is_file() and SHIPPED_GENERATOR.is_file()), reason="no shipped flow"
)


def random_flow(w_dim: int = 8, conditions: int = 2, seed: int = 0) -> ConditionalFlow:
    """A small flow with every weight random (no identity couplings), whitened on random data."""
    torch.manual_seed(seed)
    flow = ConditionalFlow(FlowConfig(w_dim=w_dim, attributes=tuple(f"a{i}" for i in range(conditions)),
                                      blocks=3, hidden=16))
    w, c = torch.randn(200, w_dim) * torch.linspace(0.2, 2.0, w_dim), torch.randn(200, conditions) * 3 + 1
    flow.fit_statistics(w, c)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return flow.eval()


def test_forward_then_inverse_returns_w_and_the_log_determinant_is_the_jacobians() -> None:
    flow = random_flow()
    w, c = torch.randn(32, 8), torch.randn(32, 2)
    z, log_det = flow(w, c)
    assert not torch.allclose(z, (w - flow.w_mean) @ flow.whiten, atol=1e-2)  # the couplings do something
    assert torch.allclose(flow.inverse(z, c), w, atol=1e-4)

    def couplings(x: torch.Tensor) -> torch.Tensor:  # whitened x -> z for the first sample
        w_one = x[None] @ flow.unwhiten + flow.w_mean
        return flow(w_one, c[:1])[0][0]

    x0 = ((w[:1] - flow.w_mean) @ flow.whiten)[0]
    jacobian = torch.autograd.functional.jacobian(couplings, x0)  # [8, 8]
    assert math.isclose(float(torch.linalg.slogdet(jacobian)[1]), float(log_det[0].detach()), abs_tol=1e-3)


def test_the_conditions_change_the_map_and_a_zero_edit_is_exact() -> None:
    flow = random_flow()
    w, c = torch.randn(16, 8), torch.randn(16, 2)
    z_here, _ = flow(w, c)
    z_there, _ = flow(w, c + torch.tensor([2.0, 0.0]))
    assert (z_here - z_there).norm(dim=1).min() > 0.1
    assert flow.edit(w, c, torch.zeros_like(c)) is w
    moved = flow.edit(w, c, torch.tensor([[1.0, 0.0]]).expand(16, 2))
    assert (moved - w).norm(dim=1).min() > 1e-3


def synthetic(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [count, 6] bent nonlinearly by two attributes, with attribute-dependent noise."""
    rng = torch.Generator().manual_seed(seed)
    c = torch.randn(count, 2, generator=rng)
    noise = torch.randn(count, 6, generator=rng) * (0.1 + 0.2 * c[:, :1].sigmoid())
    bend = torch.stack([c[:, 0], c[:, 0] ** 2, torch.sin(2 * c[:, 1]), c[:, 0] * c[:, 1], c[:, 1], -c[:, 1] ** 2], 1)
    return bend + noise, c


def test_training_on_a_nonlinear_problem_beats_the_linear_start_and_edits_land_near_the_truth(one_thread: None) -> None:
    torch.manual_seed(0)
    w, c = synthetic(2_000, seed=0)
    config = FlowConfig(w_dim=6, attributes=("a", "b"), blocks=4, hidden=48)
    fit = FlowFitConfig(steps=600, batch_size=256, learning_rate=3e-3, evaluate_every=50)
    _, (flow, likelihood) = drain(train_flow(w, c, config, fit))
    assert likelihood["held_out_nll"] < likelihood["held_out_nll_linear"] - 0.1

    # an edit of the first attribute from c to c + 1 lands near the noise-free bend at c + 1
    w_test, c_test = synthetic(400, seed=1)
    change = torch.tensor([[1.0, 0.0]]).expand(400, 2)
    with torch.no_grad():
        moved = flow.edit(w_test, c_test, change)
        linear = ConditionalFlow(config)
        linear.fit_statistics(w, c)
        moved_linear = linear.edit(w_test, c_test, change)
    target, _ = synthetic(400, seed=1)
    target = target + (synthetic_bend(c_test + change) - synthetic_bend(c_test))
    assert (moved - target).norm(dim=1).mean() < 0.6 * (moved_linear - target).norm(dim=1).mean()


def synthetic_bend(c: torch.Tensor) -> torch.Tensor:
    """The noise-free part of :func:`synthetic` at attributes c [N, 2]."""
    return torch.stack([c[:, 0], c[:, 0] ** 2, torch.sin(2 * c[:, 1]), c[:, 0] * c[:, 1], c[:, 1], -c[:, 1] ** 2], 1)


class ChannelScorer:
    """Scores the mean red and blue of an image: two attributes any generator has."""

    attributes: tuple[str, ...] = ("red", "blue")

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"red": images[:, 0].mean(dim=(1, 2)), "blue": images[:, 2].mean(dim=(1, 2))}


def test_a_fitted_flow_is_cached_and_served_only_for_its_generator(tmp_path: Path, one_thread: None) -> None:
    generator = generator_with_w_avg(TINY_GENERATOR)
    attributes = (NamedAttribute("red", "red", "Red", "Colour", "mean red", 0.05),)
    fit = FlowFitConfig(samples=400, probes=16, steps=100, regressor_steps=100, blocks=2, hidden=32)
    _, (flow, regressor, metadata) = drain(fit_flow(generator, [ChannelScorer()], fit, attributes))
    assert metadata["kind"] == "flow" and "held_out_nll" in metadata["likelihood"]

    context = PluginContext(torch.device("cpu"), tmp_path / "weights", tmp_path / "cache")
    source = FlowDirections(context)
    with pytest.raises(DirectionsUnavailableError, match="--source flow"):
        source.directions(generator)
    save_flow(flow_cache_path(context.cache_dir, generator), flow, regressor, metadata)
    (direction,) = source.directions(generator)
    assert direction.name == "flow:red" and direction.unit == "mean red" and direction.warp is not None
    reloaded, _, _ = load_flow(flow_cache_path(context.cache_dir, generator))
    w = torch.randn(4, TINY_GENERATOR.w_dim)
    c = torch.randn(4, flow.config.conditions)
    assert torch.allclose(reloaded(w, c)[0], flow(w, c)[0], atol=1e-5)
    torch.manual_seed(1)
    with pytest.raises(DirectionsUnavailableError):
        source.directions(Generator(TINY_GENERATOR).eval())  # other weights: another fingerprint


def test_a_direction_with_a_unit_is_not_rescaled_by_the_spread_and_keeps_its_unit_in_files() -> None:
    vector = torch.zeros(1, 4)
    vector[0, 0] = 0.5
    plain, in_years = Direction("a", "A", vector), Direction("b", "B", vector, unit="years")
    basis = slider_basis([plain, in_years], 2, 4, spread=torch.tensor(3.0))
    assert torch.allclose(basis.deltas[1], vector.expand(2, 4).reshape(-1))  # Δw per year, as given
    assert torch.allclose(basis.deltas[0], 3.0 * basis.deltas[1] / 0.5)  # one std of w
    assert Direction.from_description(in_years.describe(), vector).unit == "years"
    assert "unit" not in plain.describe()


@pytest.fixture(scope="module")
def shipped() -> tuple[Generator, dict[str, Direction]]:
    generator, _ = load_generator(SHIPPED_GENERATOR)
    context = PluginContext(torch.device("cpu"), EMBEDDED_WEIGHTS_DIR, Path("/nonexistent-fluidsrv-cache"))
    return generator, {direction.name: direction for direction in FlowDirections(context).directions(generator)}


@needs_shipped
def test_the_shipped_flow_lists_its_sliders_in_attribute_units(shipped: tuple[Generator, dict[str, Direction]]) -> None:
    _, directions = shipped
    assert {"flow:age", "flow:gender", "flow:yaw", "flow:smile"} <= set(directions)
    age = directions["flow:age"]
    assert age.unit == "years" and age.slider_range[0] < -5 and age.slider_range[1] >= 10 and age.label == "Age (years)"
    assert all(direction.warp is age.warp and direction.vector.shape == (1, 256) for direction in directions.values())


@needs_shipped
@torch.no_grad()
def test_a_flow_edit_moves_the_scorers_age_the_way_and_about_as_far_as_asked(
    shipped: tuple[Generator, dict[str, Direction]], one_thread: None
) -> None:
    generator, directions = shipped
    z = torch.randn(8, generator.w_dim, generator=torch.Generator().manual_seed(123))
    ws = generator.mapping(z, truncation_psi=0.7)  # [8, num_ws, w_dim]
    assert torch.equal(apply_sliders(ws, directions, {"flow:age": 0.0}), ws)
    scorer = ClassifierScorer(EMBEDDED_WEIGHTS_DIR / WEIGHTS_FILE)
    ages = {
        amount: scorer.score(generator.synthesis(apply_sliders(ws, directions, {"flow:age": amount})).clamp(-1, 1))[
            "age"
        ]
        for amount in (-10.0, 10.0)
    }
    change = ages[10.0] - ages[-10.0]  # asked: +20 years
    assert int((change > 0).sum()) >= 7, change
    assert 8.0 < float(change.mean()) < 40.0, change


def test_a_slider_inverts_its_calibration_curve_and_keeps_a_plateau_flat() -> None:
    from fluidsrv.models.flow import FlowSlider

    curve = ((-20.0, -6.0), (-10.0, -5.0), (10.0, 5.0), (20.0, 8.0), (40.0, 7.0))  # saturates, then falls back
    slider = FlowSlider("flow:age", "age", "Age", "Face", "years", -5.0, 8.0, 0.5, curve)
    assert math.isclose(slider.condition_change(2.5), 5.0)
    assert math.isclose(slider.condition_change(6.5), 15.0)
    assert math.isclose(slider.condition_change(-5.5), -15.0)
    assert slider.condition_change(8.0) == 20.0  # the plateau: never the falling point beyond it
    assert [change for _, change in slider.monotone_curve()] == [-6.0, -5.0, 0.0, 5.0, 8.0, 8.0]
