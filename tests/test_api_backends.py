"""The API of the product, over real HTTP and websockets, against both backends: in-process and Ray Serve.

Each API test runs twice (``api_server`` is parametrised over "local" and "ray"): the ray run goes through Ray
Serve's HTTP proxy to the ingress replica, whose stages run on their own deployments with sessions in PostgreSQL +
S3. The last tests are the ray backend's own promises: session affinity of previews (two preview replicas) and
failover of killed replicas. One Ray cluster serves the whole module.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from PIL import Image

from fluidsrv.protocol import decode_frame
from tests.backend_servers import PREVIEW_REPLICAS, ApiServer
from tests.server_support import ADMIN, SMALL_PHOTO, gradient_image, png_bytes

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


class Client:
    """A client of one session: REST on httpx, events and previews on one websocket."""

    def __init__(self, server: ApiServer, http: httpx.AsyncClient) -> None:
        self.server, self.http = server, http
        self.session_id = self.token = ""
        self.socket: Any = None
        self.backlog: list[dict[str, Any]] = []  # JSON events read while waiting for a frame

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def create(self, photo: bytes) -> dict[str, Any]:
        response = await self.http.post("/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        self.session_id, self.token = created["session_id"], created["token"]
        return created

    async def connect(self) -> dict[str, Any]:
        url = f"ws://{self.server.host}/api/sessions/{self.session_id}/ws?token={self.token}"
        self.socket = await websockets.connect(url, max_size=2**24)
        return await self.event("state")

    async def event(self, wanted: str, seen: list[Any] | None = None) -> dict[str, Any]:
        """Read messages until a JSON event of type ``wanted`` (an error event fails the test)."""
        while self.backlog:
            data = self.backlog.pop(0)
            if data["type"] == wanted:
                return data
        while True:
            message = await asyncio.wait_for(self.socket.recv(), timeout=240)
            if isinstance(message, bytes):
                if seen is not None:
                    seen.append(decode_frame(message))
                continue
            data: dict[str, Any] = json.loads(message)
            if data["type"] == wanted:
                return data
            assert data["type"] != "error", data
            if seen is not None:
                seen.append(data)

    async def prepare(self, index: int = 0) -> list[Any]:
        """Pick a face and wait until it is ready; return the events on the way."""
        response = await self.http.post(f"/api/sessions/{self.session_id}/face", json={"index": index},
                                        headers=self.auth)
        assert response.status_code == 202, response.text
        seen: list[Any] = []
        await self.event("ready", seen)
        return seen

    async def preview(self, seq: int, values: dict[str, float], *, commit: bool = False) -> Any:
        """Send a slider state and return the preview frame showing it."""
        await self.socket.send(json.dumps({"type": "sliders", "seq": seq, "values": values, "commit": commit}))
        while True:
            message = await asyncio.wait_for(self.socket.recv(), timeout=240)
            if isinstance(message, bytes):
                frame = decode_frame(message)
                if frame.kind == "preview" and frame.seq == seq:
                    return frame
                continue
            data = json.loads(message)
            assert data["type"] != "error", data
            self.backlog.append(data)

    async def session(self) -> dict[str, Any]:
        response = await self.http.get(f"/api/sessions/{self.session_id}", headers=self.auth)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()


def run(server: ApiServer, scenario: Any) -> Any:
    """Run ``scenario(client)`` with a fresh client of ``server``."""
    async def main() -> Any:
        async with httpx.AsyncClient(base_url=server.base, timeout=240) as http:
            client = Client(server, http)
            try:
                return await scenario(client)
            finally:
                await client.close()

    return asyncio.run(main())


async def slider_names(client: Client) -> list[str]:
    response = await client.http.get("/api/directions")
    assert response.status_code == 200
    return [direction["name"] for direction in response.json()["directions"]]


def test_health_config_and_stats_name_the_backend(api_server: ApiServer) -> None:
    async def scenario(client: Client) -> None:
        assert (await client.http.get("/api/health")).json()["status"] == "ok"
        config = (await client.http.get("/api/config")).json()
        assert config["generator"]["resolution"] == 32 and config["active"]["encoder"] == "project"
        assert (await client.http.get("/api/stats")).status_code in (401, 403)
        stats = (await client.http.get("/api/stats", headers=ADMIN)).json()
        assert stats["backend"]["name"] == api_server.backend
        if api_server.backend == "ray":  # every replica runs its own plugins: no run-time switch, a clear answer
            switch = await client.http.post("/api/config/stages", json={"stage": "inpainter", "name": "telea"},
                                            headers=ADMIN)
            assert switch.status_code == 409 and switch.json()["error"]["code"] == "switch_unsupported"

    run(api_server, scenario)


def test_bad_requests_get_clear_errors(api_server: ApiServer, photo: bytes) -> None:
    async def scenario(client: Client) -> None:
        no_face = await client.http.post("/api/sessions",
                                         files={"file": ("g.png", png_bytes(gradient_image()), "image/png")})
        assert no_face.status_code == 422 and no_face.json()["error"]["code"] == "no_face"
        garbage = await client.http.post("/api/sessions", files={"file": ("x.jpg", b"not an image", "image/jpeg")})
        assert 400 <= garbage.status_code < 500, garbage.text
        await client.create(photo)
        wrong = await client.http.get(f"/api/sessions/{client.session_id}",
                                      headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "unknown_session"
        bad_index = await client.http.post(f"/api/sessions/{client.session_id}/face", json={"index": 7},
                                           headers=client.auth)
        assert bad_index.status_code == 422 and bad_index.json()["error"]["code"] == "bad_face_index"
        early = await client.http.post(f"/api/sessions/{client.session_id}/finalize", headers=client.auth)
        assert 400 <= early.status_code < 500, early.text

    run(api_server, scenario)


def test_upload_prepare_slide_undo_finalize_delete(api_server: ApiServer, photo: bytes) -> None:
    async def scenario(client: Client) -> None:
        created = await client.create(photo)
        assert created["status"] == "uploaded" and len(created["faces"]) >= 1
        original = await client.http.get(f"/api/sessions/{client.session_id}/original", headers=client.auth)
        assert original.status_code == 200 and original.content == photo
        assert (await client.connect())["status"] == "uploaded"

        events = await client.prepare()
        progress = [event for event in events if isinstance(event, dict) and event.get("type") == "progress"]
        stages = {event["stage"] for event in progress}
        assert len(progress) >= 3 and {"finetune"} <= stages, stages  # progress streams while preparing

        name = (await slider_names(client))[0]
        frame = await client.preview(1, {name: 2.0})
        image = Image.open(io.BytesIO(frame.image))
        assert image.size[0] == image.size[1] > 0
        await client.preview(2, {name: 2.0}, commit=True)
        await client.event("saved")
        assert (await client.session())["sliders"] == {name: 2.0}
        undone = await client.http.post(f"/api/sessions/{client.session_id}/undo", headers=client.auth)
        assert undone.status_code == 200, undone.text
        assert (await client.session())["sliders"] == {}
        redone = await client.http.post(f"/api/sessions/{client.session_id}/redo", headers=client.auth)
        assert redone.status_code == 200 and (await client.session())["sliders"] == {name: 2.0}

        finalized = await client.http.post(f"/api/sessions/{client.session_id}/finalize", headers=client.auth)
        assert finalized.status_code == 200, finalized.text
        result = await client.http.get(f"/api/sessions/{client.session_id}/result", headers=client.auth)
        assert result.status_code == 200 and result.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(result.content)).size == Image.open(io.BytesIO(photo)).size

        deleted = await client.http.delete(f"/api/sessions/{client.session_id}", headers=client.auth)
        assert deleted.status_code in (200, 204), deleted.text
        gone = await client.http.get(f"/api/sessions/{client.session_id}", headers=client.auth)
        assert gone.status_code == 404

    run(api_server, scenario)


def test_preparing_again_makes_a_new_version_that_previews(api_server: ApiServer, photo: bytes) -> None:
    async def scenario(client: Client) -> None:
        await client.create(photo)
        await client.connect()
        await client.prepare()
        name = (await slider_names(client))[0]
        first = await client.preview(1, {name: 1.5})
        await client.prepare()  # the same face again: a new version of the tuned models
        assert (await client.session())["sliders"] == {}
        second = await client.preview(2, {name: 1.5})
        assert first.image and second.image
        if api_server.backend == "ray":
            stats = (await client.http.get("/api/stats", headers=ADMIN)).json()["backend"]
            assert stats["preview_session_versions"] >= 2

    run(api_server, scenario)


# ---- the ray backend's own promises -------------------------------------------------------------------------


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
