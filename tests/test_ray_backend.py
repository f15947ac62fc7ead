"""The ray backend's own promises: session affinity of previews, failover of a killed replica, versions.

The server is :func:`tests.backend_servers.ray_backend` (a local Ray cluster, two preview replicas, sessions in
real PostgreSQL + S3); the client is the API suite's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.backend_servers import PREVIEW_REPLICAS, ApiServer
from tests.server_support import ADMIN, SMALL_PHOTO
from tests.test_api_backends import Client, run, slider_names

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


async def backend_stats(client: Client) -> dict[str, Any]:
    stats: dict[str, Any] = (await client.http.get("/api/stats", headers=ADMIN)).json()["backend"]
    return stats


def preview_replicas() -> list[Any]:
    """The live preview replicas' actors."""
    import ray

    names = [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
             if "#preview#" in entry["name"]]
    return [ray.get_actor(name, namespace="serve") for name in names]


def test_a_session_version_loads_once_and_stays_on_its_replica(ray_backend: ApiServer, photo: bytes) -> None:
    assert len(preview_replicas()) == PREVIEW_REPLICAS

    async def scenario(client: Client) -> None:
        await client.create(photo)
        await client.connect()
        await client.prepare()
        name = (await slider_names(client))[0]
        before = await backend_stats(client)
        for seq in range(12):
            await client.preview(seq, {name: (seq % 5 - 2) * 0.75})
        after = await backend_stats(client)
        assert after["preview_model_loads"] - before["preview_model_loads"] == 1  # one load, on one replica
        assert after["preview_session_versions"] - before["preview_session_versions"] == 1
        assert after.get("retries", 0) == before.get("retries", 0)

    run(ray_backend, scenario)


def test_a_killed_preview_replica_costs_the_client_nothing(ray_backend: ApiServer, photo: bytes) -> None:
    import ray

    async def scenario(client: Client) -> None:
        await client.create(photo)
        await client.connect()
        await client.prepare()
        names = await slider_names(client)
        await client.preview(1, {names[0]: 1.0}, commit=True)
        await client.event("saved")
        await client.preview(2, {names[0]: 1.0, names[1]: -1.0}, commit=True)
        await client.event("saved")
        before = await backend_stats(client)
        for actor in preview_replicas():
            ray.kill(actor, no_restart=True)  # every replica: the next preview cannot avoid the failure

        frame = await client.preview(3, {names[0]: 2.0}, commit=True)  # same websocket: no error, a frame
        assert frame.image
        await client.event("saved")
        assert (await client.session())["sliders"] == {names[0]: 2.0}
        undone = await client.http.post(f"/api/sessions/{client.session_id}/undo", headers=client.auth)
        assert undone.status_code == 200  # the history from before the failure is intact
        assert (await client.session())["sliders"] == {names[0]: 1.0, names[1]: -1.0}
        after = await backend_stats(client)
        assert after["preview_model_loads"] > before["preview_model_loads"]  # reloaded from storage

    run(ray_backend, scenario)
