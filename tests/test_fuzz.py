"""Fuzz the upload route and the websocket: no 500s, no crash, no leaked session."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from tests.server_support import SMALL_PHOTO, receive_until, small_settings

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    config = small_settings(tmp_path_factory.mktemp("fuzz"))
    with TestClient(create_app(config, runtime=Runtime.build(config))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def ready_session(client: TestClient, shared_dir: Path) -> dict:
    photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()
    created = client.post("/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}).json()
    client.post(f"/api/sessions/{created['session_id']}/face", json={"index": 0},
                headers={"Authorization": f"Bearer {created['token']}"})
    with client.websocket_connect(f"/api/sessions/{created['session_id']}/ws?token={created['token']}") as socket:
        if json.loads(socket.receive_text())["status"] != "ready":
            receive_until(socket, "ready")
    return created


JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


@FUZZ
@given(body=st.one_of(st.binary(max_size=4096), st.binary(max_size=2048).map(lambda b: JPEG_HEAD + b),
                      st.binary(max_size=2048).map(lambda b: PNG_HEAD + b)),
       multipart=st.booleans(), content_type=st.sampled_from(["image/jpeg", "image/png", "text/plain", ""]))
def test_upload_fuzz_never_500s_or_leaks(client: TestClient, body: bytes, multipart: bool, content_type: str) -> None:
    before = client.get("/api/stats").json()["sessions"]["in_memory"]
    if multipart:
        response = client.post("/api/sessions", files={"file": ("f", body, content_type or "application/octet-stream")})
    else:
        response = client.post("/api/sessions", content=body, headers={"Content-Type": content_type})
    assert response.status_code in (400, 413, 415, 422), response.text
    assert response.json()["error"]["code"]
    assert client.get("/api/stats").json()["sessions"]["in_memory"] == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(message=st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.fixed_dictionaries({"seq": st.integers(-5, 2**40), "values": st.dictionaries(
        st.text(max_size=8), st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                                       st.text(max_size=4)), max_size=5)}).map(json.dumps),
))
def test_websocket_fuzz_gets_errors_not_crashes(client: TestClient, ready_session: dict, message: str) -> None:
    url = f"/api/sessions/{ready_session['session_id']}/ws?token={ready_session['token']}"
    with client.websocket_connect(url) as socket:
        receive_until(socket, "state")
        socket.send_text(message)
        socket.send_text(json.dumps({"type": "ping"}))
        _, before = receive_until(socket, "pong")  # the connection survived whatever came before
        for item in before:
            if isinstance(item, dict):
                assert item["type"] in ("error", "sliders"), item
    assert client.get("/api/health").status_code == 200
