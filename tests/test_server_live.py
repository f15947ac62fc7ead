"""Real uvicorn on loopback, driven by real websocket clients."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import websockets

from fluidsrv.protocol import decode_frame
from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from tests.server_support import ADMIN, SMALL_PHOTO, LiveServer, small_settings

CLIENTS = 20
MESSAGES = 50
SESSIONS = 4


async def prepared_session(http: httpx.AsyncClient, host: str, photo: bytes) -> dict:
    created = (await http.post("/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")})).json()
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert (await http.post(f"/api/sessions/{created['session_id']}/face", json={"index": 0},
                            headers=headers)).status_code == 202
    url = f"ws://{host}/api/sessions/{created['session_id']}/ws?token={created['token']}"
    async with websockets.connect(url) as ws:
        status = json.loads(await ws.recv())["status"]
        while status != "ready":
            message = await ws.recv()
            if isinstance(message, str):
                data = json.loads(message)
                assert data["type"] != "error", data
                status = "ready" if data["type"] == "ready" else status
    return created


async def slider_client(host: str, session: dict, names: list[str], client_index: int) -> tuple[int, int, list]:
    """Send MESSAGES slider states as fast as possible; return (last seq sent, last frame seq, errors)."""
    url = f"ws://{host}/api/sessions/{session['session_id']}/ws?token={session['token']}"
    errors: list = []
    last_frame = -1
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "state"
        for seq in range(MESSAGES):
            value = ((seq + client_index) % 7 - 3) * 0.5
            await ws.send(json.dumps({"seq": seq, "values": {names[seq % len(names)]: value}}))
        last_seq = MESSAGES - 1
        while last_frame != last_seq:
            message = await asyncio.wait_for(ws.recv(), timeout=120)
            if isinstance(message, bytes):
                frame = decode_frame(message)
                if frame.kind == "preview":
                    assert frame.seq > last_frame, "frames arrived out of order"
                    last_frame = frame.seq
            elif (event := json.loads(message))["type"] == "error":
                if event["code"] == "superseded":  # another socket of the session sent a newer state: answered
                    last_frame = max(last_frame, event["seq"])
                else:
                    errors.append(event)
    return last_seq, last_frame, errors


def test_twenty_clients_fifty_rapid_messages_each(tmp_path: Path, shared_dir: Path) -> None:
    settings = small_settings(tmp_path, max_sockets_per_session=CLIENTS // SESSIONS)
    app = create_app(settings, runtime=Runtime.build(settings))
    photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()

    async def scenario(host: str) -> list[tuple[int, int, list]]:
        async with httpx.AsyncClient(base_url=f"http://{host}", timeout=120) as http:
            sessions = [await prepared_session(http, host, photo) for _ in range(SESSIONS)]
            names = [item["name"] for item in (await http.get("/api/directions")).json()["directions"]]
            results = await asyncio.gather(
                *(slider_client(host, sessions[index % SESSIONS], names, index) for index in range(CLIENTS))
            )
            assert (await http.get("/api/health")).status_code == 200  # the server stayed up
            stats = (await http.get("/api/stats", headers=ADMIN)).json()["executor"]
            assert stats["previews_coalesced"] > 0  # rapid messages were coalesced, not all rendered
            return results

    with LiveServer(app) as host:
        results = asyncio.run(scenario(host))
    assert len(results) == CLIENTS
    for last_seq, last_frame, errors in results:
        assert errors == []
        assert last_frame == last_seq
