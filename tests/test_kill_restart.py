"""A crash loses no committed edit: `fluidsrv serve` is killed with SIGKILL mid-session and restarted on its data.

The server runs as a real subprocess (the `fluidsrv serve` command a user runs), so nothing of the first process
survives but what it wrote to its data directory before it acknowledged each edit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from fluidsrv.protocol import decode_frame
from tests.server_support import SMALL_PHOTO, free_port, small_settings, wait_until_up

pytestmark = pytest.mark.timeout(600)
STARTUP_SECONDS = 120.0


def server_env(data_dir: Path, port: int) -> dict[str, str]:
    """The environment of a small `fluidsrv serve`: the test settings as FLUIDSRV_* variables."""
    settings = small_settings(data_dir)
    names = ("generator", "device", "detector", "encoder", "directions", "segmenter", "inpainter", "previewer",
             "finetune", "finetune_steps", "max_sessions", "max_uploads_per_minute")
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLUIDSRV_")}
    env.update({f"FLUIDSRV_{name.upper()}": str(getattr(settings, name)) for name in names})
    env.update(FLUIDSRV_DATA_DIR=str(data_dir), FLUIDSRV_CACHE=str(data_dir / "cache"), FLUIDSRV_PORT=str(port),
               FLUIDSRV_PLUGIN_OPTIONS=json.dumps(settings.plugin_options))
    return env


@contextmanager
def fluidsrv_serve(data_dir: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `fluidsrv serve` until /api/health answers; kill it (if still alive) on exit."""
    with log.open("ab") as output:
        server = subprocess.Popen([sys.executable, "-m", "fluidsrv", "serve"], env=server_env(data_dir, port),
                                  stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server, log, STARTUP_SECONDS)
        yield server
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=30)


def receive_event(ws: ClientConnection, wanted: str, timeout: float = 120.0) -> dict[str, Any]:
    """Read until a JSON event of type ``wanted`` (binary frames are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(message, str):
            data: dict[str, Any] = json.loads(message)
            assert data.get("type") != "error" or wanted == "error", data
            if data.get("type") == wanted:
                return data


def receive_frame(ws: ClientConnection, seq: int, timeout: float = 60.0) -> bytes:
    """Read until the preview frame answering ``seq``."""
    deadline = time.monotonic() + timeout
    while True:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(message, bytes) and decode_frame(message).seq == seq:
            return message
        if isinstance(message, str):
            assert json.loads(message).get("type") != "error", message


def test_sigkill_loses_no_committed_edit(tmp_path: Path, shared_dir: Path) -> None:
    data_dir, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()
    base = f"http://127.0.0.1:{port}"
    with fluidsrv_serve(data_dir, port, log) as server:
        created = httpx.post(f"{base}/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}, timeout=60).json()
        sid, token = created["session_id"], created["token"]
        headers = {"Authorization": f"Bearer {token}"}
        ws_url = f"ws://127.0.0.1:{port}/api/sessions/{sid}/ws?token={token}"
        names = [item["name"] for item in httpx.get(f"{base}/api/directions").json()["directions"]]
        with connect(ws_url, max_size=None) as ws:
            receive_event(ws, "state")
            assert httpx.post(f"{base}/api/sessions/{sid}/face", json={"index": 0}, headers=headers).status_code == 202
            receive_event(ws, "ready")
            for seq, values in enumerate([{names[0]: 1.5}, {names[0]: 1.5, names[1]: -2.0}, {names[1]: 3.0}], 1):
                ws.send(json.dumps({"seq": seq, "values": values, "commit": True}))
                assert receive_event(ws, "saved")["seq"] == seq
            ws.send(json.dumps({"type": "undo", "seq": 4}))
            assert receive_event(ws, "sliders")["changed"]
        added = httpx.post(f"{base}/api/sessions/{sid}/directions/sefa", json={"layers": [0, 2], "k": 2},
                           headers=headers, timeout=60)
        assert added.status_code == 200, added.text
        custom = added.json()["directions"][0]["name"]
        with connect(ws_url, max_size=None) as ws:
            receive_event(ws, "state")
            ws.send(json.dumps({"seq": 5, "values": {names[0]: 1.5, names[1]: -2.0, custom: 1.0}, "commit": True}))
            receive_event(ws, "saved")
            ws.send(json.dumps({"seq": 6, "values": {names[0]: -3.0}, "commit": False}))  # a drag, never released
            receive_frame(ws, 6)
            before = httpx.get(f"{base}/api/sessions/{sid}", headers=headers).json()
            server.send_signal(signal.SIGKILL)  # no shutdown hook runs: only what was already on disk survives
            server.wait(timeout=30)

    with fluidsrv_serve(data_dir, port, log):
        after = httpx.get(f"{base}/api/sessions/{sid}", headers=headers).json()
        assert after["status"] == "ready"
        assert after["sliders"] == {names[0]: 1.5, names[1]: -2.0, custom: 1.0}  # the last committed state
        assert before["sliders"] == {names[0]: -3.0}  # (the uncommitted drag was never acknowledged as saved)
        assert after["can_undo"] and not after["can_redo"]
        assert after["custom_directions"] == before["custom_directions"]
        # the undo history is the one from before the crash: back to the state before the added direction
        undone = httpx.post(f"{base}/api/sessions/{sid}/undo", headers=headers).json()
        assert undone["changed"] and undone["sliders"] == {names[0]: 1.5, names[1]: -2.0}
        with connect(ws_url, max_size=None) as ws:
            receive_event(ws, "state")
            ws.send(json.dumps({"seq": 1, "values": {custom: 2.0}}))
            assert decode_frame(receive_frame(ws, 1)).image  # the restored session renders a preview
