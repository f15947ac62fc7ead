"""The REST API and the websocket through Starlette's TestClient, on a tiny random generator: the wire itself (status
codes, JSON shapes, raw websocket messages). The whole edit flow through the typed client is tests/test_client.py."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from fluidsrv.protocol import Frame
from fluidsrv.runtime import Runtime
from fluidsrv.settings import Settings
from fluidsrv.web import create_app
from tests.server_support import ADMIN, SMALL_PHOTO, gradient_image, png_bytes, receive_until, small_settings


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    return Runtime.build(small_settings(tmp_path_factory.mktemp("runtime")))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return small_settings(tmp_path)


@pytest.fixture
def client(settings: Settings, runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(settings, runtime=runtime)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


def upload(client: TestClient, data: bytes, filename: str = "photo.jpg") -> dict:
    response = client.post("/api/sessions", files={"file": (filename, data, "image/jpeg")})
    assert response.status_code == 201, response.text
    return response.json()


def auth(created: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {created['token']}"}


def prepare(client: TestClient, created: dict) -> None:
    """Pick face 0 and wait on the websocket until it is ready."""
    response = client.post(f"/api/sessions/{created['session_id']}/face", json={"index": 0}, headers=auth(created))
    assert response.status_code == 202, response.text
    with client.websocket_connect(f"/api/sessions/{created['session_id']}/ws?token={created['token']}") as socket:
        state = json.loads(socket.receive_text())
        if state["status"] != "ready":
            receive_until(socket, "ready")


def test_health_and_config_list_plugins_with_reasons(client: TestClient) -> None:
    assert client.get("/api/health").json()["status"] == "ok"
    config = client.get("/api/config").json()
    assert config["generator"]["trained"] is False and config["generator"]["resolution"] == 32
    plugins = {(info["stage"], info["name"]): info for info in config["plugins"]}
    assert plugins[("detector", "dlib")]["available"] is True
    unavailable = [info for info in config["plugins"] if not info["available"]]
    assert unavailable and all(info["reason"] for info in unavailable)
    assert config["active"]["detector"] == "dlib" and config["active"]["directions"] == ["sefa"]
    assert config["limits"]["max_sessions"] == 8


def test_upload_returns_faces_with_thumbnails_and_a_token(client: TestClient, photo: bytes) -> None:
    created = upload(client, photo, "portrait.jpg")
    assert len(created["token"]) >= 40 and created["status"] == "uploaded"
    assert created["faces"] and created["faces"][0]["thumbnail"].startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(photo)) as image:
        assert (created["width"], created["height"]) == image.size
    state = client.get(f"/api/sessions/{created['session_id']}", headers=auth(created)).json()
    assert state["filename"] == "portrait.jpg" and "token" not in state
    # the raw body works as well as multipart
    raw = client.post("/api/sessions?filename=raw.jpg", content=photo, headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 201 and raw.json()["filename"] == "raw.jpg"


def test_faces_are_numbered_left_to_right(client: TestClient, shared_dir: Path) -> None:
    created = upload(client, (shared_dir / "photos" / "couple.jpg").read_bytes(), "couple.jpg")
    lefts = [face["box"][0] for face in created["faces"]]
    assert len(lefts) == 2 and lefts == sorted(lefts)
    assert [face["index"] for face in created["faces"]] == [0, 1]


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"this is not an image at all", 415, "unsupported_type"),
        (b"", 400, "empty_upload"),
        (png_bytes(gradient_image()), 422, "no_face"),
    ],
)
def test_bad_uploads_get_clear_errors_and_create_nothing(
    client: TestClient, data: bytes, status: int, code: str
) -> None:
    response = client.post("/api/sessions", files={"file": ("x.png", data, "image/png")})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert client.get("/api/stats", headers=ADMIN).json()["sessions"]["in_memory"] == 0


def test_too_large_uploads_are_refused(settings: Settings, runtime: Runtime, photo: bytes) -> None:
    limited = Settings(**{**vars(settings), "max_upload_bytes": 10_000, "max_pixels": 100_000})
    with TestClient(create_app(limited, runtime=runtime)) as client:
        response = client.post("/api/sessions", files={"file": ("big.jpg", photo + b"\0" * 20_000, "image/jpeg")})
        assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"
        big_pixels = png_bytes(np.zeros((400, 400, 3), np.uint8))
        response = client.post("/api/sessions", content=big_pixels, headers={"Content-Type": "image/png"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"


def test_unknown_session_and_bad_token(client: TestClient, photo: bytes) -> None:
    created = upload(client, photo)
    missing = client.get("/api/sessions/" + "0" * 32, headers=auth(created))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_session"
    # a wrong or missing token is answered exactly like an unknown id: nobody learns which ids exist
    wrong = client.get(f"/api/sessions/{created['session_id']}", headers={"Authorization": "Bearer nope"})
    no_token = client.get(f"/api/sessions/{created['session_id']}")
    assert wrong.status_code == no_token.status_code == 404
    assert wrong.json() == no_token.json() == missing.json()
    for session_id in (created["session_id"], "0" * 32):
        with client.websocket_connect(f"/api/sessions/{session_id}/ws?token=wrong") as socket:
            assert json.loads(socket.receive_text()) == {"type": "error", "code": "unknown_session",
                                                         "message": "no such session"}


def test_too_many_sessions(settings: Settings, runtime: Runtime, photo: bytes) -> None:
    limited = Settings(**{**vars(settings), "max_sessions": 1})
    with TestClient(create_app(limited, runtime=runtime)) as client:
        upload(client, photo)
        response = client.post("/api/sessions", files={"file": ("a.jpg", photo, "image/jpeg")})
        assert response.status_code == 429 and response.json()["error"]["code"]


def test_bad_face_index_and_not_ready(client: TestClient, photo: bytes) -> None:
    created = upload(client, photo)
    base = f"/api/sessions/{created['session_id']}"
    assert client.post(f"{base}/face", json={"index": 99}, headers=auth(created)).status_code == 422
    assert client.post(f"{base}/face", content=b"{not json", headers=auth(created)).status_code == 422
    assert client.post(f"{base}/finalize", headers=auth(created)).status_code == 409
    assert client.get(f"{base}/result", headers=auth(created)).status_code == 404


def test_broken_websocket_messages_get_error_events(client: TestClient, photo: bytes) -> None:
    created = upload(client, photo)
    prepare(client, created)
    url = f"/api/sessions/{created['session_id']}/ws?token={created['token']}"
    with client.websocket_connect(url) as socket:
        receive_until(socket, "state")
        for bad in ["{not json", "[1, 2]", '{"seq": -1, "values": {}}', '{"seq": 1, "values": {"x": "big"}}',
                    '{"seq": 1, "values": {"nope": 1.0}}', '{"type": "explode"}', '{"seq": 1, "values": {"a": 1e999}}']:
            socket.send_text(bad)
            error, _ = receive_until(socket, "error")
            assert error["code"] and error["message"]
        socket.send_bytes(b"\x00\x01")
        assert receive_until(socket, "error")[0]["code"] == "malformed_message"
        socket.send_text("x" * 100_000)
        assert receive_until(socket, "error")[0]["code"] == "message_too_large"
        socket.send_text(json.dumps({"type": "ping"}))
        receive_until(socket, "pong")  # still alive


def test_delete_removes_the_session(client: TestClient, photo: bytes) -> None:
    created = upload(client, photo)
    base = f"/api/sessions/{created['session_id']}"
    assert client.delete(base, headers=auth(created)).status_code == 204
    assert client.get(base, headers=auth(created)).status_code == 404
    assert client.get("/api/stats", headers=ADMIN).json()["sessions"]["in_memory"] == 0


def test_switching_a_stage_needs_the_admin_token(settings: Settings, runtime: Runtime, client: TestClient) -> None:
    body = {"stage": "inpainter", "name": "navier-stokes"}
    refused = client.post("/api/config/stages", json=body)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "bad_admin_token"
    assert client.get("/api/config").json()["active"]["inpainter"] == "telea"
    without_admin = Settings(**{**vars(settings), "admin_token": ""})
    with TestClient(create_app(without_admin, runtime=runtime)) as disabled:
        refused = disabled.post("/api/config/stages", json=body, headers=ADMIN)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_disabled"


def test_switching_a_stage_rolls_back_on_failure(settings: Settings, runtime: Runtime, photo: bytes) -> None:
    admin = Settings(**{**vars(settings), "admin_token": "let-me-in"})
    with TestClient(create_app(admin, runtime=runtime)) as client:
        headers = {"Authorization": "Bearer let-me-in"}
        wrong = client.post("/api/config/stages", json={"stage": "detector", "name": "dlib"},
                            headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 401
        failed = client.post("/api/config/stages", json={"stage": "detector", "name": "insightface"}, headers=headers)
        assert failed.status_code == 422 and "insightface" in failed.json()["error"]["message"]
        assert client.get("/api/config").json()["active"]["detector"] == "dlib"
        unknown = client.post("/api/config/stages", json={"stage": "detector", "name": "no-such"}, headers=headers)
        assert unknown.status_code == 422
        switched = client.post("/api/config/stages", json={"stage": "inpainter", "name": "navier-stokes"},
                               headers=headers)
        assert switched.status_code == 200 and switched.json()["active"]["inpainter"] == "navier-stokes"

        # a session edited with SeFa sliders still finalizes after the direction source changes
        created = upload(client, photo)
        prepare(client, created)
        sefa_name = client.get("/api/directions").json()["directions"][0]["name"]
        url = f"/api/sessions/{created['session_id']}/ws?token={created['token']}"
        with client.websocket_connect(url) as socket:
            receive_until(socket, "state")
            socket.send_text(json.dumps({"seq": 1, "values": {sefa_name: 2.0}, "commit": True}))
            next_preview(socket)
        moved = client.post("/api/config/stages", json={"stage": "directions", "name": "ganspace"}, headers=headers)
        assert moved.status_code == 200 and moved.json()["active"]["directions"] == ["ganspace"]
        assert sefa_name not in {item["name"] for item in client.get("/api/directions").json()["directions"]}
        finalized = client.post(f"/api/sessions/{created['session_id']}/finalize", headers=auth(created))
        assert finalized.status_code == 200, finalized.text
        runtime.load_directions(["sefa"])  # the runtime is shared by the other tests of this module


def test_websocket_limits_and_unknown_sessions(settings: Settings, runtime: Runtime, photo: bytes) -> None:
    limited = Settings(**{**vars(settings), "max_ws_messages_per_second": 5.0})
    with TestClient(create_app(limited, runtime=runtime)) as client:
        with client.websocket_connect("/api/sessions/" + "a" * 32 + "/ws?token=x") as socket:
            error = json.loads(socket.receive_text())
            assert error["type"] == "error" and error["code"] == "unknown_session"
        created = upload(client, photo)
        with client.websocket_connect(f"/api/sessions/{created['session_id']}/ws?token={created['token']}") as socket:
            receive_until(socket, "state")
            for _ in range(12):
                socket.send_text(json.dumps({"type": "ping"}))
            codes = []
            for _ in range(12):
                data = json.loads(socket.receive_text())
                codes.append(data.get("code") or data["type"])
            assert codes.count("pong") <= 6 and "rate_limited" in codes  # a burst of 5, then refusals


def test_uploads_are_rate_limited_per_client(settings: Settings, runtime: Runtime, photo: bytes) -> None:
    limited = Settings(**{**vars(settings), "max_uploads_per_minute": 2})
    with TestClient(create_app(limited, runtime=runtime)) as client:
        upload(client, photo)
        upload(client, photo)
        third = client.post("/api/sessions", files={"file": ("c.jpg", photo, "image/jpeg")})
        assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limited"


def test_a_full_server_makes_room_by_deleting_abandoned_uploads(
    settings: Settings, runtime: Runtime, photo: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fluidsrv.service

    full = Settings(**{**vars(settings), "max_sessions": 1})
    with TestClient(create_app(full, runtime=runtime)) as client:
        first = upload(client, photo)
        monkeypatch.setattr(fluidsrv.service, "ABANDONED_UPLOAD_SECONDS", 3600.0)
        assert client.post("/api/sessions", files={"file": ("b.jpg", photo, "image/jpeg")}).status_code == 429
        monkeypatch.setattr(fluidsrv.service, "ABANDONED_UPLOAD_SECONDS", -1.0)  # every upload counts as abandoned
        second = upload(client, photo)
        assert client.get(f"/api/sessions/{first['session_id']}", headers=auth(first)).status_code == 404
        assert client.get(f"/api/sessions/{second['session_id']}", headers=auth(second)).status_code == 200


def test_request_bodies_are_bounded(client: TestClient, photo: bytes) -> None:
    created = upload(client, photo)
    huge = client.post(f"/api/sessions/{created['session_id']}/face", content=b"[" + b"0," * 60_000 + b"0]",
                       headers={**auth(created), "Content-Type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    chunked = client.post("/api/sessions", content=iter([b"--x\r\n", b"junk"]),
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 411 and chunked.json()["error"]["code"] == "length_required"


def test_a_restarted_server_restores_sessions(settings: Settings, runtime: Runtime, photo: bytes) -> None:
    with TestClient(create_app(settings, runtime=runtime)) as client:
        created = upload(client, photo)
        prepare(client, created)
    with TestClient(create_app(settings, runtime=runtime)) as client:
        state = client.get(f"/api/sessions/{created['session_id']}", headers=auth(created)).json()
        assert state["status"] == "ready" and state["faces"]
        url = f"/api/sessions/{created['session_id']}/ws?token={created['token']}"
        with client.websocket_connect(url) as socket:
            receive_until(socket, "state")
            name = client.get("/api/directions").json()["directions"][0]["name"]
            socket.send_text(json.dumps({"seq": 7, "values": {name: 1.0}}))
            assert next_preview(socket).seq == 7


def next_preview(socket: object) -> Frame:
    for _ in range(200):
        message = socket.receive()  # type: ignore[attr-defined]
        if message.get("bytes") is not None:
            from fluidsrv.protocol import decode_frame

            frame = decode_frame(message["bytes"])
            if frame.kind == "preview":
                return frame
        elif message.get("text") is not None:
            data = json.loads(message["text"])
            assert data["type"] != "error", data
    raise AssertionError("no preview frame arrived")

