"""Helpers shared by the server tests: small real settings, a shared runtime, test images."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fluidsrv.protocol import decode_frame
from fluidsrv.settings import Settings

SMALL_PHOTO = "deepface_img12.jpg"


ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
"""The admin token of :func:`small_settings` servers, and the header that sends it (``/api/stats`` needs it)."""


def small_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for tests: a tiny random generator of the real architecture and fast stage options."""
    values: dict[str, Any] = {
        "generator": "random:32",
        "device": "cpu",
        "data_dir": data_dir,
        "cache_dir": data_dir / "cache",
        "detector": "dlib",
        "encoder": "project",
        "directions": "sefa",
        "segmenter": "landmarks",
        "inpainter": "telea",
        "previewer": "generator",
        "finetune": "lowrank",
        "finetune_steps": 3,
        "plugin_options": {"encoder.project": {"steps": 6, "frame_every": 3}, "directions.sefa": {"k": 4}},
        "max_sessions": 8,
        "max_uploads_per_minute": 100_000,
        "admin_token": ADMIN_TOKEN,
        "identity_meter": "off",  # its worker process costs CPU; the tests of the meter turn it on
    }
    values.update(overrides)
    return Settings(**values)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 RGB array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def gradient_image(height: int = 96, width: int = 128) -> np.ndarray:
    """A smooth picture without any face."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 90)], axis=-1).astype(np.uint8)


def receive_until(socket: Any, wanted: str, limit: int = 500) -> tuple[dict[str, Any], list[Any]]:
    """Read websocket messages until a JSON event of type ``wanted``; return it and everything before."""
    seen: list[Any] = []
    for _ in range(limit):
        message = socket.receive()
        if message.get("text") is not None:
            data = json.loads(message["text"])
            if data.get("type") == wanted:
                return data, seen
            seen.append(data)
        elif message.get("bytes") is not None:
            seen.append(decode_frame(message["bytes"]))
        else:
            raise AssertionError(f"socket closed while waiting for {wanted!r}: {message}")
    raise AssertionError(f"no {wanted!r} event in {limit} messages")


def free_port() -> int:
    """A loopback port free right now (for a server started as a subprocess)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(base: str, process: Any, log_path: Path, timeout: float = 120.0) -> None:
    """Wait until the server subprocess at ``base`` answers /api/health; fail with its log if it exits or stalls."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the server exited: {log_path.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


class LiveServer:
    """A real uvicorn server on a loopback port, running in a background thread.

    Give it an app (served with test defaults: no forwarded header believed) or a whole ``config`` (e.g. the one
    ``fluidsrv serve`` builds, with ``port=0``).
    """

    def __init__(self, app: Any = None, *, config: Any = None) -> None:
        import threading

        import uvicorn

        if config is None:
            config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", proxy_headers=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> str:
        import time

        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
