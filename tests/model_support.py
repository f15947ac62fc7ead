"""Helpers the model tests share: tiny generator configs and builders, the conformance weight recipe, the small
golden generator, and draining a stage job."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from fluidsrv.models.stylegan2 import Generator, GeneratorConfig
from fluidsrv.stages import Progress, StepJob

T = TypeVar("T")

FACE_SHARD = "faces128-04.zip"
"""The smallest face shard (3,849 faces, ids 41,816-45,664): it holds ids on both sides of the held-out boundary."""

TINY_GENERATOR = GeneratorConfig(resolution=32, w_dim=32, n_mapping=2, channels={4: 32, 8: 32, 16: 16, 32: 16})
"""A 32² generator with w_dim 32: big enough for inversion to converge, small enough for a shared CPU."""

TINY_GENERATOR_W16 = GeneratorConfig(resolution=32, w_dim=16, n_mapping=2, channels={4: 16, 8: 16, 16: 8, 32: 8})
"""A narrower 32² generator (w_dim 16, num_ws 8) for the encoder and weight-file tests."""


def tiny_generator(*, resolution: int = 16, seed: int = 0) -> Generator:
    """An untrained generator of 8 channels a level and w_dim 16, seeded by ``seed``, in eval mode."""
    torch.manual_seed(seed)
    config = GeneratorConfig(resolution=resolution, w_dim=16, n_mapping=2, channels={r: 8 for r in (4, 8, 16, 32)})
    return Generator(config).eval()


def generator_with_w_avg(config: GeneratorConfig, num_samples: int = 500) -> Generator:
    """An untrained generator built after seeding torch with 0, in eval mode, its w_avg estimated from samples."""
    torch.manual_seed(0)
    generator = Generator(config).eval()
    generator.estimate_w_avg(num_samples=num_samples)
    return generator


def golden_generator_config(golden: Mapping[str, Any]) -> GeneratorConfig:
    """The generator config of the small rosinality golden (``tests/fixtures/stylegan2_small_golden.pt``)."""
    config = golden["config"]
    return GeneratorConfig(
        resolution=config["size"],
        w_dim=config["style_dim"],
        n_mapping=config["n_mlp"],
        channels=config["channels"],
        lr_mlp=config["lr_mlp"],
        blur_kernel=tuple(config["blur_kernel"]),
    )


def build_golden_generator(golden: Mapping[str, Any]) -> Generator:
    """The small golden generator with its weights loaded strictly, in eval mode."""
    generator = Generator(golden_generator_config(golden)).eval()
    generator.load_state_dict(golden["state_dict"], strict=True)
    return generator


def recipe_weights(manifest: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Deterministic weights for a key manifest, by the recipe in shared/conformance/README.md."""
    weights: dict[str, torch.Tensor] = {}
    for index, (key, shape) in enumerate(manifest.items()):
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_mean"):
            weights[key] = torch.zeros(shape)
        elif key.endswith("running_var"):
            weights[key] = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=torch.Generator().manual_seed(index))
            if len(shape) >= 2:
                weights[key] = t / math.sqrt(math.prod(shape[1:]))
            elif key.endswith("weight"):
                weights[key] = 1 + 0.1 * t
            else:
                weights[key] = 0.1 * t
    return weights


def randomize_batchnorm_statistics(module: torch.nn.Module) -> None:
    """Give every BatchNorm2d non-trivial running statistics, so that a lost buffer would show."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            assert layer.running_mean is not None and layer.running_var is not None
            torch.nn.init.uniform_(layer.running_mean, -0.1, 0.1)
            torch.nn.init.uniform_(layer.running_var, 0.5, 1.5)


def drain(job: StepJob[T]) -> tuple[list[Progress], T]:
    """Run a stage job to its end: the progress it yielded, and the value it returned."""
    steps: list[Progress] = []
    while True:
        try:
            steps.append(next(job))
        except StopIteration as stop:
            return steps, stop.value
