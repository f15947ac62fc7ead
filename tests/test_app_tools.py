"""On-demand directions (SeFa by layer range, text) and the latent tools (mix, morph, loop) over REST."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from tests.server_support import SMALL_PHOTO, receive_until, small_settings


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = small_settings(tmp_path_factory.mktemp("tools"))
    with TestClient(create_app(settings, runtime=Runtime.build(settings))) as test_client:
        yield test_client


def make_face(client: TestClient, photo: bytes, prepare: bool = True) -> dict[str, str]:
    created = client.post("/api/sessions", files={"file": ("p.jpg", photo, "image/jpeg")}).json()
    reference = {"session_id": created["session_id"], "token": created["token"]}
    if prepare:
        headers = {"Authorization": f"Bearer {created['token']}"}
        assert client.post(f"/api/sessions/{created['session_id']}/face", json={"index": 0},
                           headers=headers).status_code == 202
        with client.websocket_connect(f"/api/sessions/{created['session_id']}/ws?token={created['token']}") as ws:
            if json.loads(ws.receive_text())["status"] != "ready":
                receive_until(ws, "ready")
    return reference


@pytest.fixture(scope="module")
def faces(client: TestClient, shared_dir: Path) -> list[dict[str, str]]:
    photos = shared_dir / "photos"
    return [make_face(client, (photos / name).read_bytes()) for name in (SMALL_PHOTO, "deepface_img16.jpg")]


def test_config_reports_the_optional_features(client: TestClient) -> None:
    features = client.get("/api/config").json()["features"]
    assert features["sefa"] is True and features["tools"] is True
    assert features["text"] is False and features["text_reason"]  # no CLIP weights here
    assert client.get("/api/tools").json() == {"mix": True, "morph": True, "loop": True}


def test_sefa_by_layer_range_adds_sliders_to_that_session_only(
    client: TestClient, faces: list[dict[str, str]]
) -> None:
    base = f"/api/sessions/{faces[0]['session_id']}"
    headers = {"Authorization": f"Bearer {faces[0]['token']}"}
    assert client.post(f"{base}/directions/sefa", json={"layers": [1, 6], "k": 3}).status_code == 404
    response = client.post(f"{base}/directions/sefa", json={"layers": [1, 6], "k": 3}, headers=headers)
    assert response.status_code == 200, response.text
    found = response.json()["directions"]
    assert len(found) == 3 and all(item["layers"] == [1, 6] for item in found)
    names = {item["name"] for item in found}
    own = {item["name"] for item in client.get(f"{base}/directions", headers=headers).json()["directions"]}
    assert names <= own
    assert not names & {item["name"] for item in client.get("/api/directions").json()["directions"]}
    state = client.get(base, headers=headers).json()
    assert {item["name"] for item in state["custom_directions"]} == names
    other = f"/api/sessions/{faces[1]['session_id']}/directions"
    assert not names & {item["name"] for item in client.get(
        other, headers={"Authorization": f"Bearer {faces[1]['token']}"}).json()["directions"]}
    url = f"/api/sessions/{faces[0]['session_id']}/ws?token={faces[0]['token']}"
    with client.websocket_connect(url) as socket:
        receive_until(socket, "state")
        socket.send_text(json.dumps({"seq": 5, "values": {found[0]["name"]: 2.0}}))
        while True:
            message = socket.receive()
            if message.get("bytes"):
                break
            assert json.loads(message["text"])["type"] != "error"
    assert client.post(f"{base}/directions/sefa", json={"layers": "middle", "k": 2}, headers=headers).status_code == 200
    for bad in ({"layers": [5, 2]}, {"layers": [0, 99]}, {"layers": "sideways"}, {"layers": [0, 3], "k": 0}, [1]):
        assert client.post(f"{base}/directions/sefa", json=bad, headers=headers).status_code == 422


def test_text_prompts_need_the_clip_plugin(client: TestClient, faces: list[dict[str, str]]) -> None:
    response = client.post(f"/api/sessions/{faces[0]['session_id']}/directions/text", json={"prompt": "a smile"},
                           headers={"Authorization": f"Bearer {faces[0]['token']}"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "feature_unavailable"


def test_mix_returns_a_rendered_face(client: TestClient, faces: list[dict[str, str]]) -> None:
    coarse = client.post("/api/tools/mix", json={"faces": faces, "layers": "coarse"})
    fine = client.post("/api/tools/mix", json={"faces": faces, "layers": [5, 8]})
    more_like = client.post("/api/tools/mix", json={"faces": faces, "percent": 50})
    images = []
    for response in (coarse, fine, more_like):
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.size == (32, 32)
            images.append(np.asarray(image.convert("RGB")).astype(int))
    assert np.abs(images[0] - images[1]).mean() > 0.5  # different layer ranges give different faces


def test_morph_and_loop_videos_have_the_right_frame_counts(client: TestClient, faces: list[dict[str, str]]) -> None:
    morph = client.post("/api/tools/morph", json={"faces": faces, "frames_per_transition": 6, "format": "mp4"})
    assert morph.status_code == 200 and morph.headers["content-type"] == "video/mp4"
    frames = iio.imread(morph.content, index=None, extension=".mp4")
    assert frames.shape[0] == 7  # (2 faces − 1) transitions × 6 + the last face
    loop = client.post("/api/tools/loop", json={"face": faces[0], "frames": 10, "layers": "fine", "format": "gif"})
    assert loop.status_code == 200 and loop.headers["content-type"] == "image/gif"
    with Image.open(io.BytesIO(loop.content)) as gif:
        assert gif.n_frames == 10


def test_tools_refuse_bad_faces(client: TestClient, faces: list[dict[str, str]], shared_dir: Path) -> None:
    bad_token = {"session_id": faces[0]["session_id"], "token": "wrong"}
    assert client.post("/api/tools/mix", json={"faces": [faces[0], bad_token]}).status_code == 404
    assert client.post("/api/tools/mix", json={"faces": [faces[0]]}).status_code == 422
    unprepared = make_face(client, (shared_dir / "photos" / SMALL_PHOTO).read_bytes(), prepare=False)
    assert client.post("/api/tools/loop", json={"face": unprepared}).status_code == 409
    too_long = {"faces": faces * 4, "frames_per_transition": 120, "loop": True}  # 960 frames
    assert client.post("/api/tools/morph", json=too_long).status_code == 422
    assert client.post("/api/tools/morph", json={"faces": faces, "format": "avi"}).status_code == 422
