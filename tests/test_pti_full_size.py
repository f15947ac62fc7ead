"""PTI as the server runs it: the perceptual distance prepare passes (built once per runtime), the early stop on
that distance, the time budget that picks the step count, PTI's fixed-radius locality points, and the settings."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fluidsrv import pipeline, pti
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.perceptual import LPIPS_CHANNELS, ImageDistance, LaplacianPyramidDistance, LpipsVgg, VggFeatures
from fluidsrv.perceptual import finetune_distance as build_finetune_distance
from fluidsrv.pti import PTIConfig, default_locality_radius, finetune, locality_points, pti_config
from fluidsrv.runtime import Runtime
from fluidsrv.settings import Settings, SettingsError
from fluidsrv.stages import Face, Latents, Progress, StepJob
from fluidsrv.step_budget import StepBudget
from plugins.preview_generator import GeneratorPreviewer
from tests.model_support import drain
from tests.server_support import small_settings

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingDistance(ImageDistance):
    """The pyramid distance, counting its calls."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.inner = LaplacianPyramidDistance()
        self.calls = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        result: torch.Tensor = self.inner(a, b)
        return result


# ------------------------------------------------------------------------------------------------ the distance


class PivotEncoder:
    """An encoder that returns the mapped w of a fixed z (no optimisation)."""

    def encode(self, target: torch.Tensor, generator: Any) -> StepJob[Latents]:
        with torch.no_grad():
            ws = generator.mapping(torch.randn(1, generator.w_dim, generator=torch.Generator().manual_seed(2)))
        yield Progress("encode", 1, 1, "encoded")
        return Latents(ws[:, 0], ws)


class BlankSegmenter:
    """A segmenter that finds a head everywhere."""

    def parse(self, image: np.ndarray) -> dict[str, np.ndarray]:
        ones = np.ones(image.shape[:2], np.float32)
        return {"face": ones, "hair": ones * 0}


def upright_face(centre: tuple[float, float], eye_distance: float) -> Face:
    """A face with plausible five landmarks around ``centre``."""
    cx, cy = centre
    half = eye_distance / 2
    points = np.array([[cx - half, cy - 0.4 * half], [cx + half, cy - 0.4 * half], [cx, cy + 0.3 * half],
                       [cx - 0.7 * half, cy + half], [cx + 0.7 * half, cy + half]])
    return Face(box=(cx - 2 * half, cy - 2 * half, cx + 2 * half, cy + 2 * half), score=0.9, landmarks5=points)


def test_prepare_passes_the_bundles_distance_built_once(tiny: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    distance = CountingDistance()
    built: list[ImageDistance] = []
    seen: list[tuple[ImageDistance | None, PTIConfig]] = []
    real = pti.finetune

    def provide() -> ImageDistance:
        built.append(distance)
        return distance

    def spy(generator: Generator, target: torch.Tensor, ws: torch.Tensor, config: PTIConfig,
            perceptual: ImageDistance | None = None, **kwargs: Any) -> Iterator[Progress]:
        seen.append((perceptual, config))
        return (yield from real(generator, target, ws, config, perceptual, **kwargs))

    monkeypatch.setattr(pti, "finetune", spy)
    stages = pipeline.StageBundle(
        generator=tiny, detector=None, encoder=PivotEncoder(), segmenter=BlankSegmenter(),  # type: ignore[arg-type]
        inpainter=None, previewer=GeneratorPreviewer(), device=torch.device("cpu"),  # type: ignore[arg-type]
        finetune="lowrank", finetune_steps=2, finetune_distance=provide)
    pixels = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    steps, made = drain(pipeline.prepare(stages, pixels, (upright_face((48.0, 44.0), 20.0),), 0))
    assert seen and seen[0][0] is distance and distance.calls >= 2  # the pivot's term at least, each step
    assert seen[0][1].steps == 2 and seen[0][1].early_stop_distance is None  # no known threshold for "counting"
    assert built == [distance]
    assert pti.delta_mode(made.prepared.generator_delta) == "lowrank"
    finetune_steps = [p for p in steps if p.stage == "finetune"]
    assert [p.total for p in finetune_steps] == [2, 2] and "bytes" in finetune_steps[-1].message


def _write_fake_lpips(folder: Path) -> None:
    torch.manual_seed(1)
    vgg = {f"features.{key}": value for key, value in VggFeatures().features.state_dict().items()}
    lins = {f"lin{i}.model.1.weight": torch.rand(1, channels, 1, 1) for i, channels in enumerate(LPIPS_CHANNELS)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save(lins, folder / "vgg.pth")


def test_the_finetune_distance_is_lpips_when_cached_else_offline(tmp_path: Path) -> None:
    assert isinstance(build_finetune_distance(tmp_path / "empty"), LaplacianPyramidDistance)
    (tmp_path / "broken").mkdir()
    for name in ("vgg16-397923af.pth", "vgg.pth"):
        (tmp_path / "broken" / name).write_bytes(b"")
    assert isinstance(build_finetune_distance(tmp_path / "broken"), LaplacianPyramidDistance)  # logged, not fatal
    _write_fake_lpips(tmp_path / "cache")
    lpips = build_finetune_distance(tmp_path / "cache")
    assert isinstance(lpips, LpipsVgg) and lpips.name == "lpips-vgg"
    assert not any(parameter.requires_grad for parameter in lpips.parameters())
    assert pti_config(1024, "full", distance_name=lpips.name).early_stop_distance == 0.06  # PTI's threshold


def test_the_runtime_builds_the_distance_once_and_bundles_it(tmp_path: Path) -> None:
    runtime = Runtime.build(small_settings(tmp_path, prepare_seconds=12.5, finetune="full", finetune_steps=0,
                                           inference_precision="fp32"))
    figures = runtime.finetune_figures()
    assert figures["distance"] is None and figures["steps"] == 100 and figures["prepare_seconds"] == 12.5
    sizes = figures["delta_bytes_per_session"]
    assert 0 < sizes["lowrank"] < sizes["full"] == pti.delta_nbytes(pti.synthesis_parameters(runtime.generator))
    stages = runtime.stages()
    assert stages.finetune_seconds == 12.5 and stages.finetune_steps == 0 and stages.inference_precision == "fp32"
    assert stages.finetune_distance is not None
    first, again = stages.finetune_distance(), runtime.stages().finetune_distance
    assert isinstance(first, LaplacianPyramidDistance) and again is not None and again() is first
    assert runtime.finetune_figures()["distance"] == "laplacian"
    assert runtime.stage("previewer").precision == "fp32"  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ early stop


def test_early_stop_on_the_perceptual_distance(tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor]) -> None:
    target, pivot = problem
    with torch.no_grad():
        start = float(LaplacianPyramidDistance()(tiny.synthesis(pivot), target))
    config = PTIConfig(mode="full", steps=40, early_stop_distance=start * 1.01, frame_every=0)
    steps, delta = drain(finetune(tiny, target, pivot, config))
    assert len(steps) == 1 and steps[0].total == 1 and "early-stop" in steps[0].message
    assert all(float(value.abs().max()) == 0.0 for value in delta.values())

    config = PTIConfig(mode="full", steps=60, lr=1e-3, early_stop_distance=start * 0.8, locality_weight=0.0,
                       frame_every=0)
    steps, delta = drain(finetune(tiny, target, pivot, config))
    assert 1 < len(steps) < 60 and steps[-1].step == steps[-1].total and "early-stop" in steps[-1].message
    with torch.no_grad():
        reached = float(LaplacianPyramidDistance()(pti.apply_delta(tiny, delta).synthesis(pivot), target))
    assert reached <= start * 0.8


# ------------------------------------------------------------------------------------------------ time budget


def test_step_budget_picks_the_count_from_the_first_steps() -> None:
    unbounded = StepBudget(50, None)
    for step in range(1, 6):
        unbounded.record(step, 3.0)
    assert unbounded.total == 50 and unbounded.decided

    budget = StepBudget(100, 10.0)  # step 1 pays 5 s of warm-up, then 1 s a step
    budget.record(1, 5.0)
    assert budget.total == 100 and not budget.decided
    for step in (2, 3):
        budget.record(step, 1.0)
        assert budget.total == 100
    budget.record(4, 1.0)  # elapsed 8 s, 1 s a step: two more fit
    assert budget.decided and budget.total == 6 and not budget.done(5) and budget.done(6)

    capped = StepBudget(5, 100.0)
    for step in range(1, 5):
        capped.record(step, 0.01)
    assert capped.total == 5  # never more than the step limit

    slow = StepBudget(100, 2.0)
    slow.record(1, 2.5)  # the first step alone is over the budget: stop now
    assert slow.total == 1 and slow.done(1)
    with pytest.raises(ValueError):
        StepBudget(10, 0.0)


def test_finetune_fits_its_budget_and_reports_the_chosen_total(
    tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor]
) -> None:
    target, pivot = problem
    ticks = iter(range(10_000))

    def clock() -> float:  # every step's own time is 0.5 s (a step reads the clock at its start and its end)
        return next(ticks) * 0.5

    config = PTIConfig(mode="lowrank", steps=100, seconds=5.0, locality_weight=0.0, frame_every=4)
    steps, delta = drain(finetune(tiny, target, pivot, config, clock=clock))
    # steps 2-4 set the estimate: 2 s used after step 4, 0.5 s a step -> 6 more
    assert [p.step for p in steps] == list(range(1, 11))
    assert [p.total for p in steps] == [100] * 3 + [10] * 7
    assert [p.step for p in steps if p.frame is not None] == [4, 8, 10]
    assert "bytes" in steps[-1].message and pti.delta_mode(delta) == "lowrank"

    bundle = pti_config(128, "lowrank", seconds=0.0)
    assert bundle.seconds is None and bundle.steps == 100 and bundle.learning_rate == 1e-2
    assert pti_config(1024, "full").steps == 350 and pti_config(1024, "full").learning_rate == 3e-4
    assert pti_config(128, "full", steps=7, seconds=3.0).steps == 7


# ------------------------------------------------------------------------------------------------ locality


def test_locality_points_lie_at_the_radius_towards_truncated_random_ws(
    tiny: Generator, problem: tuple[torch.Tensor, torch.Tensor]
) -> None:
    _, pivot = problem
    assert default_locality_radius(18, 512) == pytest.approx(30.0)
    assert default_locality_radius(12, 256) == pytest.approx(30.0 * math.sqrt(12 * 256 / (18 * 512)))  # 17.3
    config = PTIConfig(locality_samples=5)
    assert config.radius_for(tiny) == pytest.approx(default_locality_radius(tiny.num_ws, tiny.w_dim))
    with torch.no_grad():
        points = locality_points(tiny, pivot, config, torch.Generator().manual_seed(4))  # [5, L, D]
        z = torch.randn(5, tiny.w_dim, generator=torch.Generator().manual_seed(4))
        random_ws = tiny.mapping(z, truncation_psi=0.5)
    offsets = (points - pivot).flatten(1)  # [5, L·D]
    torch.testing.assert_close(offsets.norm(dim=1), torch.full((5,), config.radius_for(tiny)))
    towards = (random_ws - pivot).flatten(1)
    cosine = torch.nn.functional.cosine_similarity(offsets, towards, dim=1)
    torch.testing.assert_close(cosine, torch.ones(5))

    fixed = PTIConfig(locality_samples=2, locality_radius=0.5)
    near = locality_points(tiny, pivot, fixed, torch.Generator().manual_seed(4))
    torch.testing.assert_close((near - pivot).flatten(1).norm(dim=1), torch.full((2,), 0.5))
    with pytest.raises(ValueError):
        PTIConfig(locality_radius=0.0)


# ------------------------------------------------------------------------------------------------ settings


def test_prepare_seconds_and_precision_settings() -> None:
    settings = Settings.from_env({"FLUIDSRV_PREPARE_SECONDS": "45", "FLUIDSRV_INFERENCE_PRECISION": "fp32"})
    assert settings.prepare_seconds == 45.0 and settings.inference_precision == "fp32"
    assert Settings().prepare_seconds == 0.0 and Settings().finetune_steps == 0
    assert Settings().inference_precision == "auto"
    for bad in ({"prepare_seconds": -1.0}, {"inference_precision": "half"}, {"finetune_steps": -2}):
        with pytest.raises(SettingsError):
            Settings(**bad)  # type: ignore[arg-type]
