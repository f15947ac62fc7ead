"""Real servers of both backends for the API suite: the in-process app under uvicorn, and the app on Ray Serve.

``ray_backend`` starts a local Ray cluster (``ray.init(num_cpus=2)``) once per test module (and stops it after,
so that it takes no CPU from the rest of the suite), with the application
of :mod:`fluidsrv.cli.serve_ray` storing sessions in the real PostgreSQL and S3 servers of
:mod:`tests.real_servers`; ``api_server`` is parametrised over "local" and "ray".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fluidsrv.settings import Settings
from fluidsrv.web import create_app
from tests.real_servers import S3Server, free_ports, fresh_schema
from tests.server_support import LiveServer, small_settings

PREVIEW_REPLICAS = 2
FAST_STAGES = {"encoder.project": {"steps": 6, "wplus_steps": 4, "frame_every": 3}, "directions.sefa": {"k": 4}}
"""A few projector steps: these tests are about the API and where the stages run, not about inversion quality."""


@dataclass(frozen=True)
class ApiServer:
    """A running server: its backend's name, host:port and settings."""

    backend: str
    host: str
    settings: Settings

    @property
    def base(self) -> str:
        """The server's http:// address."""
        return f"http://{self.host}"


@pytest.fixture(scope="module")
def ray_backend(postgres_url: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory,
                shared_dir: Path) -> Iterator[ApiServer]:
    """The application on Ray Serve (a local 2-CPU cluster), sessions in PostgreSQL + S3."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from fluidsrv.backends.ray_replicas import deployment_options
    from fluidsrv.cli import serve_ray

    (port,) = free_ports(1)
    settings = small_settings(
        tmp_path_factory.mktemp("ray-backend"), backend="ray", port=port, database_url=fresh_schema(postgres_url),
        s3_endpoint=s3_server.endpoint, s3_bucket=s3_server.new_bucket(), s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key, prepare_grace_seconds=0.0, plugin_options=FAST_STAGES)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    options = deployment_options(None)
    options["preview"]["num_replicas"] = PREVIEW_REPLICAS  # two, so that affinity is something to test
    try:
        serve_ray.start(settings, options)
        yield ApiServer("ray", f"127.0.0.1:{port}", settings)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def local_backend(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Iterator[ApiServer]:
    """The in-process application under real uvicorn on loopback, sessions in files."""
    settings = small_settings(tmp_path_factory.mktemp("local-backend"), prepare_grace_seconds=0.0,
                              plugin_options=FAST_STAGES)
    with LiveServer(create_app(settings)) as host:
        yield ApiServer("local", host, settings)


@pytest.fixture(params=["local", "ray"])
def api_server(request: pytest.FixtureRequest) -> Any:
    """Each backend's server in turn: the same API tests run against both."""
    return request.getfixturevalue(f"{request.param}_backend")
