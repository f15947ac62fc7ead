"""Run ``fluidsrv serve`` in a subprocess for the benchmarks that talk to a live server over loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fluidsrv.settings import REPO_ROOT

SERVER_START_SECONDS = 300.0


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def serve(generator: str, device: str, env: Mapping[str, str], log_path: Path) -> Iterator[str]:
    """Run ``fluidsrv serve`` with ``env``, logging to ``log_path``; yield its base URL once /api/health answers."""
    port = free_port()
    command = [sys.executable, "-c", "import sys; from fluidsrv.cli import main; sys.exit(main())",
               "serve", "--port", str(port), "--generator", generator, "--device", device]  # fmt: skip
    log = log_path.open("wb")
    server = subprocess.Popen(command, env=dict(env), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if server.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"fluidsrv serve exited with status {server.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("fluidsrv serve did not start in time") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
