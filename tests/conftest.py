"""Shared test fixtures: the one way tests reach ``../shared``, the committed fixtures, and shared model fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fluidsrv.models.stylegan2 import Generator
from tests.backend_servers import api_server, local_backend, ray_backend  # noqa: F401  (fixtures: both backends)
from tests.model_support import FACE_SHARD, TINY_GENERATOR, build_golden_generator, generator_with_w_avg
from tests.real_servers import postgres_url, s3_server  # noqa: F401  (fixtures: PostgreSQL, S3)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _shared_root() -> Path:
    return Path(os.environ.get("FLUIDSRV_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` folder; skips when absent, fails instead when FLUIDSRV_REQUIRE_SHARED=1."""
    root = _shared_root()
    if not root.is_dir():
        message = f"shared folder {root} is absent"
        if os.environ.get("FLUIDSRV_REQUIRE_SHARED") == "1":
            pytest.fail(message + " and FLUIDSRV_REQUIRE_SHARED=1")
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The committed small fixtures in tests/fixtures."""
    return FIXTURES


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one thread: the tiny models gain nothing from more, and it avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shard_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding one real shard, FACE_SHARD (a link into ../shared/data)."""
    source = shared_dir / "data" / FACE_SHARD
    if not source.is_file():
        pytest.fail(f"{source} is missing from the shared data")
    folder = tmp_path_factory.mktemp("faces")
    (folder / FACE_SHARD).symlink_to(source)
    return folder


@pytest.fixture(scope="module")
def tiny() -> Generator:
    """The TINY_GENERATOR (32², w_dim 32) built after seeding with 0, its w_avg estimated from 500 samples."""
    return generator_with_w_avg(TINY_GENERATOR, num_samples=500)


@pytest.fixture(scope="module")
def problem(tiny: Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A reachable target (rendered from one w) and a pivot (another w): (target [1,3,32,32], pivot ws)."""
    rng = torch.Generator().manual_seed(5)
    with torch.no_grad():
        target = tiny.synthesis(tiny.mapping(torch.randn(1, 32, generator=rng)))  # [1, 3, 32, 32]
        pivot = tiny.mapping(torch.randn(1, 32, generator=rng))  # [1, num_ws, w_dim]
    return target, pivot


@pytest.fixture(scope="module")
def stylegan2_golden(fixtures_dir: Path) -> dict[str, Any]:
    """The small rosinality golden: config, state dict, inputs and reference outputs."""
    data: dict[str, Any] = torch.load(fixtures_dir / "stylegan2_small_golden.pt", weights_only=True)
    return data


@pytest.fixture(scope="module")
def golden_generator(stylegan2_golden: dict[str, Any]) -> Generator:
    """The small golden generator, loaded strictly, in eval mode."""
    return build_golden_generator(stylegan2_golden)
