"""What an attacker found: spoofed X-Forwarded-For, missing security headers, stats and server paths in the open."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from starlette.routing import Route
from starlette.testclient import TestClient

from fluidsrv.cli import main
from fluidsrv.cli.serve import build_config, trusted_proxies
from fluidsrv.runtime import GeneratorSource, Runtime
from fluidsrv.settings import REPO_ROOT, Settings, SettingsError
from fluidsrv.stages import Direction
from fluidsrv.web import create_app
from fluidsrv.web.app import hide_paths, path_labels
from fluidsrv.web.headers import content_security_policy
from tests.server_support import SMALL_PHOTO, LiveServer, small_settings

ADMIN = "admin-secret-for-tests"
CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self' ws://testserver wss://testserver; "
       "frame-ancestors 'none'; base-uri 'none'; object-src 'none'; form-action 'self'")
FIXED = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}
ABSOLUTE = re.compile(r"(?<![\w.~:/<>-])/[^\s'\"`;:,()<>]+")
NO_SESSION = "0" * 32


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    return Runtime.build(small_settings(tmp_path_factory.mktemp("runtime")))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return small_settings(tmp_path, admin_token=ADMIN)


@pytest.fixture
def client(settings: Settings, runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(settings, runtime=runtime), raise_server_exceptions=False) as test_client:
        yield test_client


def assert_secured(response: Any) -> None:
    """The response carries the policy and every fixed security header."""
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    assert response.headers.get("content-security-policy") == CSP, where
    for name, value in FIXED.items():
        assert response.headers.get(name) == value, f"{where}: {name}"


# --- security headers ------------------------------------------------------------------------------------------

def test_every_route_answers_with_the_security_headers(client: TestClient) -> None:
    routes = [route for route in client.app.routes if isinstance(route, Route)]  # type: ignore[attr-defined]
    assert len(routes) > 15
    for route in routes:
        path = route.path.replace("{session_id:str}", NO_SESSION)
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            assert_secured(client.request(method, path))  # 200, 401, 403, 404, 422...


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/", 200),
    ("GET", "/index.html", 200),
    ("GET", "/app.css", 200),
    ("GET", "/js/main.js", 200),
    ("HEAD", "/js/main.js", 200),
    ("GET", "/no-such-file.js", 404),
    ("GET", "/api/no-such-route", 404),
    ("GET", "/api/sessions", 404),
    ("POST", "/api/health", 405),
    ("PUT", "/app.css", 405),
    ("GET", "/api/stats", 401),
])
def test_static_files_and_errors_carry_the_headers(client: TestClient, method: str, path: str, status: int) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert_secured(response)


def test_static_files_are_streamed_whole_with_their_types(client: TestClient) -> None:
    response = client.get("/js/main.js")
    assert response.content == (REPO_ROOT / "static" / "js" / "main.js").read_bytes()
    assert "javascript" in response.headers["content-type"]  # nosniff: module scripts need their real type
    assert client.get("/app.css").headers["content-type"].startswith("text/css")


def test_bad_json_and_an_unhandled_error_carry_the_headers(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                          shared_dir: Path) -> None:
    created = client.post("/api/sessions", files={"file": ("p.jpg", (shared_dir / "photos" / SMALL_PHOTO).read_bytes(),
                                                           "image/jpeg")}).json()
    bad_json = client.post(f"/api/sessions/{created['session_id']}/face", content=b"{nope",
                           headers={"Authorization": f"Bearer {created['token']}"})
    assert bad_json.status_code == 422
    assert_secured(bad_json)

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(client.app.state.service, "directions", broken)  # type: ignore[attr-defined]
    failed = client.get("/api/directions")
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
    assert_secured(failed)


def test_the_websocket_still_works_behind_the_middleware(client: TestClient, shared_dir: Path) -> None:
    photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()
    created = client.post("/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}).json()
    with client.websocket_connect(f"/api/sessions/{created['session_id']}/ws?token={created['token']}") as socket:
        assert json.loads(socket.receive_text())["type"] == "state"
        socket.send_text(json.dumps({"type": "ping"}))
        assert json.loads(socket.receive_text())["type"] == "pong"


def test_the_policy_names_only_a_well_formed_host() -> None:
    assert b"connect-src 'self' ws://127.0.0.1:8000 wss://127.0.0.1:8000;" in content_security_policy(
        b"127.0.0.1:8000")
    assert b"ws://[::1]:8000 " in content_security_policy(b"[::1]:8000")
    for odd in (None, b"", b"evil.example; script-src *", b"a b", b"host\r\nx: y", b"h:99999999"):
        policy = content_security_policy(odd)
        assert b"connect-src 'self'; frame-ancestors 'none'" in policy, odd
        assert b"ws:" not in policy and b"*" not in policy


# --- forwarded headers: only from the configured proxies --------------------------------------------------------

def upload_statuses(tmp_path: Path, runtime: Runtime, forwarded_allow_ips: str, spoofed: list[str]) -> list[int]:
    """Upload statuses (one upload a minute allowed) from loopback, each claiming ``X-Forwarded-For: spoofed[i]``."""
    settings = small_settings(tmp_path, port=0, max_uploads_per_minute=1, forwarded_allow_ips=forwarded_allow_ips)
    config = build_config(settings, create_app(settings, runtime=runtime))
    with LiveServer(config=config) as host:
        return [httpx.post(f"http://{host}/api/sessions", content=b"not an image", headers={"X-Forwarded-For": address},
                           timeout=60).status_code for address in spoofed]


def test_a_spoofed_forwarded_for_from_loopback_does_not_reset_the_rate_limit(
    tmp_path: Path, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")  # uvicorn's own setting must not count either
    first, second = upload_statuses(tmp_path, runtime, "", ["203.0.113.7", "198.51.100.9"])
    assert first != 429 and second == 429  # both counted against 127.0.0.1


def test_a_configured_proxy_is_believed(tmp_path: Path, runtime: Runtime) -> None:
    statuses = upload_statuses(tmp_path, runtime, "127.0.0.1", ["203.0.113.7", "198.51.100.9", "203.0.113.7"])
    assert statuses[0] != 429 and statuses[1] != 429  # two clients behind the proxy, one upload each
    assert statuses[2] == 429  # the first one again: its own limit


def test_forwarded_allow_ips_is_checked_and_passed_to_uvicorn(runtime: Runtime, tmp_path: Path) -> None:
    default = build_config(Settings(), app=object())
    assert default.proxy_headers is False
    trusted = build_config(Settings(forwarded_allow_ips=" 10.0.0.0/8, 127.0.0.1 ,::1"), app=object())
    assert trusted.proxy_headers is True and trusted.forwarded_allow_ips == "10.0.0.0/8,127.0.0.1,::1"
    assert trusted_proxies(Settings(forwarded_allow_ips="10.0.0.1, *")) == ["*"]
    # uvicorn parses networks strictly: a host address with a prefix is passed on as its network
    assert trusted_proxies(Settings(forwarded_allow_ips="10.0.0.1/8,2001:db8::1/64")) == ["10.0.0.0/8", "2001:db8::/64"]
    with pytest.raises(SettingsError, match=r"FLUIDSRV_FORWARDED_ALLOW_IPS: 'proxy\.local'"):
        trusted_proxies(Settings(forwarded_allow_ips="10.0.0.1,proxy.local"))


def test_serve_refuses_a_bad_forwarded_allow_ips(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FLUIDSRV_FORWARDED_ALLOW_IPS", "10.0.0.300")
    assert main(["serve", "--port", "0"]) == 2
    assert "FLUIDSRV_FORWARDED_ALLOW_IPS: '10.0.0.300' is not an IP address" in capsys.readouterr().err


# --- exposure: stats behind the admin token, no server paths in the config --------------------------------------

def test_stats_need_the_admin_token(client: TestClient, runtime: Runtime, tmp_path: Path) -> None:
    assert client.get("/api/stats").status_code == 401
    assert client.get("/api/stats", headers={"Authorization": "Bearer wrong"}).status_code == 401
    allowed = client.get("/api/stats", headers={"Authorization": f"Bearer {ADMIN}"})
    assert allowed.status_code == 200 and "executor" in allowed.json() and "sessions" in allowed.json()
    without_admin = small_settings(tmp_path / "no-admin", admin_token="")
    with TestClient(create_app(without_admin, runtime=runtime)) as other:
        assert other.get("/api/stats", headers={"Authorization": "Bearer anything"}).status_code == 403


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def test_config_shows_no_absolute_server_path(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "source", GeneratorSource("/srv/models/stylegan2-ffhq-config-f.pt", trained=True))
    settings = runtime.settings  # the plugins' reasons name the directories the runtime was built with
    with TestClient(create_app(settings, runtime=runtime)) as client:
        response = client.get("/api/config")
    text = response.text
    for secret in (str(settings.cache_dir), str(settings.data_dir), str(REPO_ROOT), str(Path.home())):
        assert secret not in text
    leaks = [found for value in strings(response.json()) for found in ABSOLUTE.findall(value)]
    assert leaks == [], leaks
    config = response.json()
    assert config["generator"]["source"] == "stylegan2-ffhq-config-f.pt"
    reasons = {info["name"]: info["reason"] for info in config["plugins"]}
    assert reasons["bisenet"].startswith("79999_iter.pth is not in <cache>; run")  # the advice is still there
    assert "<cache>/directions/files does not exist" in reasons["files"]


def test_directions_show_no_absolute_server_path(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    provenance = "InterFaceGAN boundary from /srv/b/smile.npy"
    direction = Direction("files:0", "Smile", torch.zeros(1, 64), provenance=provenance)
    service = client.app.state.service  # type: ignore[attr-defined]
    monkeypatch.setattr(service, "directions", lambda: {"files:0": direction})
    listed = client.get("/api/directions").json()["directions"]
    assert listed[0]["provenance"] == "InterFaceGAN boundary from smile.npy"


def test_hide_paths_keeps_everything_but_the_paths(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", weights_dir=tmp_path / "weights", data_dir=tmp_path)
    labels = path_labels(settings)
    same = ["see https://example.com/a/b.pt and ./rel/x.pt", "pip install \".[insightface]\"", "w / w+ and a/b",
            "0-7 / 8 layers", "~/.cache/fluidsrv"]
    assert hide_paths(same, labels) == same
    assert hide_paths(f"{tmp_path}/cache/lama/big-lama.pt is missing", labels) == "<cache>/lama/big-lama.pt is missing"
    assert hide_paths(f"in {tmp_path}/weights.", labels) == "in <weights>."
    assert hide_paths(f"spilled to {tmp_path}/sessions", labels) == "spilled to <data>/sessions"
    assert hide_paths(f"{tmp_path}/cache2/x", labels) == "<data>/cache2/x"  # a sibling is no part of the cache
    assert hide_paths("load '/opt/m/g.pt' (C:\\Users\\me\\w.pt).", labels) == "load 'g.pt' (w.pt)."
    assert hide_paths({"a": [1, None, "/x/y/z.onnx"]}, labels) == {"a": [1, None, "z.onnx"]}


def test_error_messages_show_no_absolute_server_path(runtime: Runtime) -> None:
    settings = Settings(**{**vars(runtime.settings), "admin_token": ADMIN})
    with TestClient(create_app(settings, runtime=runtime)) as client:
        refused = client.post("/api/config/stages", json={"stage": "inpainter", "name": "lama"},
                              headers={"Authorization": f"Bearer {ADMIN}"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "plugin_unavailable"
    message = refused.json()["error"]["message"]
    assert "big-lama.pt" in message and "<cache>" in message and not ABSOLUTE.findall(message), message
    assert_secured(refused)


def test_progress_shows_no_absolute_server_path() -> None:
    from fluidsrv.web.views import progress_view

    view = progress_view("encode", 1, 1, "e4e (/home/me/.cache/fluidsrv/e4e_ffhq_encode.pt)")
    assert view["message"] == "e4e (e4e_ffhq_encode.pt)"
    assert progress_view("finetune", 3, 350, "pti lowrank 3/350 mse 0.1")["message"] == "pti lowrank 3/350 mse 0.1"
