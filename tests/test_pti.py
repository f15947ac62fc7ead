"""Pivotal tuning: both delta modes reduce the reconstruction loss, leave the shared generator alone, stop early,
close cleanly mid-way, and the low-rank delta is a small fraction of the full one at the embedded config."""

from __future__ import annotations

import pytest
import torch

from fluidsrv.models.stylegan2 import Generator
from fluidsrv.pti import (
    LORA_DOWN,
    LORA_UP,
    PTIConfig,
    apply_delta,
    delta_mode,
    delta_nbytes,
    delta_sizes,
    finetune,
    lowrank_targets,
    synthesize_with,
)
from fluidsrv.training.configs import EMBEDDED_128
from tests.model_support import drain

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(generator: Generator) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in generator.state_dict().items()}


def assert_untouched(generator: Generator, before: dict[str, torch.Tensor]) -> None:
    for key, value in generator.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert all(parameter.grad is None for parameter in generator.parameters())
    assert all(parameter.requires_grad for parameter in generator.parameters())


def render_mse(generator: Generator, ws: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((generator.synthesis(ws) - target).square().mean())


@pytest.mark.parametrize("mode", ["full", "lowrank"])
def test_finetune_reduces_the_loss_and_never_touches_the_base(
    tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor], mode: str
) -> None:
    target, pivot = problem
    before = snapshot(tiny)
    base_mse = render_mse(tiny, pivot, target)
    lr = {"full": 1e-3, "lowrank": 1e-2}[mode]  # faster than the defaults: a random generator starts far off
    config = PTIConfig(mode=mode, steps=25, lr=lr, frame_every=10)  # type: ignore[arg-type]
    steps, delta = drain(finetune(tiny, target, pivot, config))

    assert [p.step for p in steps] == list(range(1, 26)) and all(p.total == 25 for p in steps)
    assert [p.step for p in steps if p.frame is not None] == [10, 20, 25]
    assert steps[0].frame is None and steps[9].frame is not None and steps[9].frame.shape == (32, 32, 3)
    assert delta_mode(delta) == mode
    assert all(not tensor.requires_grad for tensor in delta.values())
    assert_untouched(tiny, before)

    tuned = apply_delta(tiny, delta)
    tuned_mse = render_mse(tuned, pivot, target)
    assert tuned_mse < 0.3 * base_mse, (tuned_mse, base_mse)
    assert tuned is not tiny and not any(parameter.requires_grad for parameter in tuned.parameters())
    assert torch.equal(tuned.w_avg, tiny.w_avg)
    assert_untouched(tiny, before)


def test_apply_delta_shares_untouched_tensors_and_matches_the_training_render(
    tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor]
) -> None:
    target, pivot = problem
    _, delta = drain(finetune(tiny, target, pivot, PTIConfig(mode="lowrank", steps=3, locality_weight=0.0)))
    tuned = apply_delta(tiny, delta)
    base_state, tuned_state = tiny.state_dict(), tuned.state_dict()
    touched = {key.rsplit(".lora_", 1)[0] for key in delta}
    assert touched == set(lowrank_targets(tiny))
    for key, value in tuned_state.items():
        shares = value.data_ptr() == base_state[key].data_ptr()
        assert shares == (key not in touched), key
    # the same tuned weights rendered through synthesize_with (what training does) give the same image
    parameters = dict(tiny.named_parameters())
    with torch.no_grad():
        substituted = {name: tuned_state[name] for name in touched}
        via_overrides = synthesize_with(tiny, pivot, substituted)
        torch.testing.assert_close(via_overrides, tuned.synthesis(pivot))
    assert all(parameters[name] is dict(tiny.named_parameters())[name] for name in touched)


def test_delta_layouts(tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor]) -> None:
    target, pivot = problem
    _, full = drain(finetune(tiny, target, pivot, PTIConfig(mode="full", steps=1, locality_weight=0.0)))
    _, lowrank = drain(finetune(tiny, target, pivot, PTIConfig(mode="lowrank", steps=1, rank=3, locality_weight=0.0)))
    synthesis = {name for name, _ in tiny.named_parameters() if not name.startswith("style.")}
    assert set(full) == synthesis
    targets = lowrank_targets(tiny)
    assert {name for name in targets if name.endswith(".conv.weight")} == {
        name for name in synthesis if name.endswith(".conv.weight") and not name.startswith("to_rgb")}
    assert {name for name in targets if name.endswith("modulation.weight")} == {
        name for name in synthesis if name.endswith("modulation.weight")}  # every style affine, ToRGBs' too
    for name in targets:
        weight = dict(tiny.named_parameters())[name]  # [1, O, I, 3, 3] or an affine [I, w_dim]
        fan_in = weight[0, 0].numel() if weight.ndim == 5 else weight.shape[1]
        out_channels = weight.shape[1] if weight.ndim == 5 else weight.shape[0]
        assert lowrank[name + LORA_DOWN].shape == (3, fan_in)
        assert lowrank[name + LORA_UP].shape == (out_channels, 3)
    assert len(lowrank) == 2 * len(targets)
    assert delta_sizes(tiny, rank=3) == {"lowrank": delta_nbytes(lowrank), "full": delta_nbytes(full)}
    with pytest.raises(KeyError, match="not a synthesis parameter"):
        apply_delta(tiny, {"style.1.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match="mixes"):
        delta_mode({**full, **lowrank})


def test_early_stop_on_the_reconstruction_threshold(
    tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor]
) -> None:
    target, pivot = problem
    start = render_mse(tiny, pivot, target)
    steps, delta = drain(finetune(tiny, target, pivot, PTIConfig(mode="full", steps=50, early_stop_mse=start * 2)))
    assert len(steps) == 1 and steps[0].total == 1 and "early-stop" in steps[0].message
    assert all(float(value.abs().max()) == 0.0 for value in delta.values())  # stopped before any update

    threshold = start * 0.5
    config = PTIConfig(mode="full", steps=60, lr=1e-3, early_stop_mse=threshold, locality_weight=0.0, frame_every=0)
    steps, delta = drain(finetune(tiny, target, pivot, config))
    assert 1 < len(steps) < 60 and steps[-1].step == steps[-1].total
    assert render_mse(apply_delta(tiny, delta), pivot, target) < threshold


def test_closing_mid_way_leaves_no_state(tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor]) -> None:
    target, pivot = problem
    before = snapshot(tiny)
    for mode in ("full", "lowrank"):
        job = finetune(tiny, target, pivot, PTIConfig(mode=mode, steps=100))
        for _ in range(3):
            next(job)
        job.close()
        with pytest.raises(StopIteration):
            next(job)
        assert_untouched(tiny, before)


def test_locality_keeps_random_neighbours_close(tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor]) -> None:
    target, pivot = problem
    rng = torch.Generator().manual_seed(9)
    with torch.no_grad():
        neighbours = torch.lerp(pivot.expand(4, -1, -1), tiny.mapping(torch.randn(4, 32, generator=rng)), 0.5)
        reference = tiny.synthesis(neighbours)

    def drift(weight: float) -> float:
        config = PTIConfig(mode="full", steps=20, lr=2e-3, locality_weight=weight, locality_samples=2, frame_every=0)
        _, delta = drain(finetune(tiny, target, pivot, config))
        with torch.no_grad():
            return float((apply_delta(tiny, delta).synthesis(neighbours) - reference).square().mean())

    assert drift(5.0) < 0.7 * drift(0.0)


def test_lowrank_delta_is_at_most_a_tenth_of_the_full_delta_at_the_embedded_config() -> None:
    torch.manual_seed(0)
    generator = Generator(EMBEDDED_128.generator).eval()
    target = torch.zeros(1, 3, 128, 128)
    pivot = generator.mapping(torch.randn(1, generator.w_dim)).detach()
    sizes = {}
    for mode in ("full", "lowrank"):
        config = PTIConfig(mode=mode, steps=1, locality_weight=0.0, frame_every=0)
        _, delta = drain(finetune(generator, target, pivot, config))
        sizes[mode] = delta_nbytes(delta)
    synthesis_floats = sum(p.numel() for n, p in generator.named_parameters() if not n.startswith("style."))
    assert sizes["full"] == 4 * synthesis_floats
    assert sizes["lowrank"] <= 0.10 * sizes["full"], sizes
    print(f"bytes per session at embedded-128: full {sizes['full']:,}, lowrank (rank 8) {sizes['lowrank']:,}")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PTIConfig(mode="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PTIConfig(steps=0)
    assert PTIConfig(mode="full").learning_rate == 3e-4 and PTIConfig(lr=0.1).learning_rate == 0.1
