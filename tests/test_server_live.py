"""Real uvicorn on loopback, driven by many websocket clients at once (fluidsrv.client)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fluidsrv.client import AsyncClient, AsyncSession
from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from tests.server_support import ADMIN_TOKEN, SMALL_PHOTO, LiveServer, small_settings

CLIENTS = 20
MESSAGES = 50
SESSIONS = 4


async def slider_client(session: AsyncSession, names: list[str], client_index: int) -> list[int]:
    """Send MESSAGES slider states as fast as possible; return the seqs of their frames.

    The iteration ends once the last state is answered: by its frame, or by ``superseded`` when another socket of
    the session sent a newer state; any other error event is raised.
    """
    states = [{names[seq % len(names)]: ((seq + client_index) % 7 - 3) * 0.5} for seq in range(MESSAGES)]
    async with session.connect() as live:
        return [frame.seq async for frame in live.sliders(states)]


def test_twenty_clients_fifty_rapid_messages_each(tmp_path: Path, shared_dir: Path) -> None:
    settings = small_settings(tmp_path, max_sockets_per_session=CLIENTS // SESSIONS)
    app = create_app(settings, runtime=Runtime.build(settings))
    photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()

    async def scenario(host: str) -> list[list[int]]:
        async with AsyncClient(f"http://{host}", admin_token=ADMIN_TOKEN, timeout=120) as client:
            sessions = [await client.create_session(photo) for _ in range(SESSIONS)]
            for session in sessions:
                await session.prepare(0)
            names = [direction.name for direction in await client.directions()]
            results = await asyncio.gather(
                *(slider_client(sessions[index % SESSIONS], names, index) for index in range(CLIENTS))
            )
            assert (await client.health())["status"] == "ok"  # the server stayed up
            stats = (await client.stats())["executor"]
            assert stats["previews_coalesced"] > 0  # rapid messages were coalesced, not all rendered
            return results

    with LiveServer(app) as host:
        results = asyncio.run(scenario(host))
    assert len(results) == CLIENTS
    for seqs in results:
        assert seqs == sorted(set(seqs)) and set(seqs) <= set(range(1, MESSAGES + 1)), "frames out of order"
