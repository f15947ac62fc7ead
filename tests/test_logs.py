"""Token redaction in the server's logs: uvicorn's real logging config, its access formatter, every route."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import websockets.sync.client
from starlette.routing import Mount, Route, WebSocketRoute

from fluidsrv.logs import RedactingFormatter, RedactTokens, redact_args
from fluidsrv.web import create_app
from tests.server_support import SMALL_PHOTO, free_port, small_settings, wait_until_up

ACCESS_FORMAT = '%s - "%s %s HTTP/%s" %d'  # what uvicorn.protocols.http logs, with exactly these five args

# uvicorn's own logging config, then the redaction as `fluidsrv serve` installs it, then log calls shaped as
# uvicorn's: an access line, a websocket line, a fluidsrv warning with the token as an argument, a traceback
UVICORN_LOGGING_SCRIPT = f"""
import logging, uvicorn, uvicorn.config
from fluidsrv.logs import install_redaction

async def app(scope, receive, send):
    pass

uvicorn.Config(app, log_config=uvicorn.config.LOGGING_CONFIG)
install_redaction()
logging.getLogger("uvicorn.access").info({ACCESS_FORMAT!r}, "127.0.0.1:5", "GET", "/a?token=SECRET&x=1", "1.1", 200)
logging.getLogger("uvicorn.error").info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/ws?token=SECRET")
logging.getLogger("fluidsrv.web.app").warning("opened with token=%s", "SECRET")
try:
    raise RuntimeError("failed on /b?token=SECRET")
except RuntimeError:
    logging.getLogger("uvicorn.error").exception("boom")
"""


def test_uvicorn_access_lines_keep_their_shape_and_lose_the_token() -> None:
    done = subprocess.run([sys.executable, "-c", UVICORN_LOGGING_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '127.0.0.1:5 - "GET /a?token=…&x=1 HTTP/1.1" 200' in done.stdout  # the access line is still written
    assert '"WebSocket /ws?token=…" [accepted]' in done.stderr
    assert "opened with token=…" in done.stderr and "RuntimeError: failed on /b?token=…" in done.stderr
    assert "SECRET" not in done.stdout + done.stderr
    assert "Logging error" not in done.stderr


def test_the_filter_keeps_the_args_shape() -> None:
    assert redact_args(("a", "/x?token=s", 5)) == ("a", "/x?token=…", 5)
    assert redact_args({"path": "/x?TOKEN=s", "n": 1}) == {"path": "/x?TOKEN=…", "n": 1}
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, ACCESS_FORMAT,
                               ("c", "GET", "/p?token=s", "1.1", 200), None)
    assert RedactTokens().filter(record) and record.msg == ACCESS_FORMAT and len(record.args or ()) == 5
    assert record.getMessage() == 'c - "GET /p?token=… HTTP/1.1" 200'


def test_the_formatter_redacts_the_finished_line() -> None:
    class Url:  # a non-string argument whose text holds a token
        def __str__(self) -> str:
            return "/p?token=s3cr3t"

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(logging.Formatter("%(levelname)s %(message)s")))
    logger = logging.getLogger("tests.test_logs.formatter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("at %s", Url())
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "WARNING at /p?token=…\n"


class PathValues(dict[str, str]):
    """A route's path parameters: the session's id, and a plain word for any other (e.g. a preset's name)."""

    def __missing__(self, key: str) -> str:
        return "older"


def _requests(tmp_path: Path, session_id: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(method, path) of every HTTP route of the app, DELETE last, and the websocket paths."""
    http: list[tuple[str, str]] = []
    sockets: list[str] = []
    for route in create_app(small_settings(tmp_path)).routes:
        if isinstance(route, Route):
            path = route.path_format.format_map(PathValues(session_id=session_id))
            http += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
        elif isinstance(route, WebSocketRoute):
            sockets.append(route.path_format.format_map(PathValues(session_id=session_id)))
        elif isinstance(route, Mount):
            http += [("GET", route.path + "/"), ("GET", route.path + "/no-such-file.js")]
    return sorted(http, key=lambda item: item[0] == "DELETE"), sockets


def test_serve_logs_every_route_without_its_token(tmp_path: Path, shared_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLUIDSRV_GENERATOR": "random:32", "FLUIDSRV_DATA_DIR": str(tmp_path),
           "FLUIDSRV_ENCODER": "project", "FLUIDSRV_FINETUNE": "none", "FLUIDSRV_DEVICE": "cpu",
           "FLUIDSRV_PLUGIN_OPTIONS": json.dumps({"encoder.project": {"steps": 3}})}
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out_path, "wb") as out_file, open(err_path, "wb") as err_file:
        process = subprocess.Popen([sys.executable, "-m", "fluidsrv", "serve", "--port", str(port)], env=env,
                                   stdout=out_file, stderr=err_file)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, process, err_path)
        photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()
        created = httpx.post(f"{base}/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}).json()
        token = created["token"]  # the real token: the session routes answer as they would for its owner
        http, sockets = _requests(tmp_path / "routes", created["session_id"])
        for path in sockets:
            with websockets.sync.client.connect(f"ws://127.0.0.1:{port}{path}?token={token}") as connection:
                assert json.loads(connection.recv())["type"] == "state"
        for method, path in http:
            httpx.request(method, f"{base}{path}?token={token}", json={} if method == "POST" else None, timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=60)
    out, err = out_path.read_text(), err_path.read_text()
    assert token not in out + err
    assert "Traceback" not in err and "Logging error" not in err, err
    for method, path in http:
        assert re.search(rf'"{method} {re.escape(path)}\?token=… HTTP/1\.1" \d{{3}}', out), (method, path, out)
    for path in sockets:
        assert f'"WebSocket {path}?token=…" [accepted]' in err, err
