"""``fluidsrv serve`` as a user runs it: a real process, real uvicorn, and logs without session tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import websockets.sync.client

from fluidsrv.logs import redact
from tests.server_support import SMALL_PHOTO, free_port, wait_until_up


def test_redact_hides_token_values() -> None:
    line = '127.0.0.1:5 - "GET /api/sessions/ab/ws?token=s3cr3t-T0k&x=1 HTTP/1.1" 101'
    assert "s3cr3t" not in redact(line) and "token=…&x=1" in redact(line)


def test_serve_runs_the_app_and_never_logs_tokens(tmp_path: Path, shared_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "FLUIDSRV_GENERATOR": "random:32", "FLUIDSRV_DATA_DIR": str(tmp_path),
           "FLUIDSRV_ENCODER": "project", "FLUIDSRV_FINETUNE": "none", "FLUIDSRV_DEVICE": "cpu",
           "FLUIDSRV_PLUGIN_OPTIONS": json.dumps({"encoder.project": {"steps": 3}})}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "fluidsrv", "serve", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, process, log_path)
        assert "fluidsrv" in httpx.get(base + "/").text  # the browser app is served
        photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()
        created = httpx.post(f"{base}/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}).json()
        token = created["token"]
        assert httpx.get(f"{base}/api/sessions/{created['session_id']}?token={token}").status_code == 200
        url = f"ws://127.0.0.1:{port}/api/sessions/{created['session_id']}/ws?token={token}"
        with websockets.sync.client.connect(url) as connection:
            assert json.loads(connection.recv())["type"] == "state"
            connection.send("x" * 300_000)  # over the socket's size limit: the server closes it
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                connection.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    finally:
        process.terminate()
        process.wait(timeout=60)
    logged = log_path.read_text()
    assert "/api/sessions/" in logged and "token=…" in logged  # requests were logged ...
    assert token not in logged  # ... without the token


def test_serve_refuses_a_bad_setting_with_one_clear_line() -> None:
    env = {**os.environ, "FLUIDSRV_PHOTO_DETAIL": "sharpen"}
    done = subprocess.run([sys.executable, "-m", "fluidsrv", "serve", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    expected = "fluidsrv: error: FLUIDSRV_PHOTO_DETAIL must be one of transfer, replace, not 'sharpen'"
    assert done.stderr.strip() == expected
