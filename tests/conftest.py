"""Shared test fixtures: the one way tests reach ``../shared``, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
