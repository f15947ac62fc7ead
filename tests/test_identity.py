"""The identity meter: dlib distances of real faces in the worker process, the embedder choice, and the live meter
over the websocket (rate-bounded, newest state wins) with its reports in the session view and the finalize answer."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from fluidsrv import dlib_faces
from fluidsrv.geometry import align_face
from fluidsrv.identity import (
    ARCFACE_PATTERNS,
    MAX_FAILED_STARTS,
    ArcFaceEmbedder,
    EmbedderChoice,
    IdentityMeter,
    IdentityWorkerError,
    Measurer,
    PhotoCrop,
    Reference,
    choose_embedder,
    decode_face,
    find_arcface_model,
)
from fluidsrv.identity_meter import IdentityMeters
from fluidsrv.image_io import decode_image
from fluidsrv.runtime import Runtime
from fluidsrv.settings import Settings, SettingsError, default_cache_dir
from fluidsrv.web import create_app
from tests.server_support import SMALL_PHOTO, receive_until, small_settings

SIDE = 256


def encoded(image: np.ndarray, image_format: str = "WEBP") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format, quality=90)
    return buffer.getvalue()


def aligned_reference(shared_dir: Path, name: str) -> tuple[np.ndarray, Any, Reference]:
    """A photo, the alignment of its largest face and that face as a meter reference at SIDE pixels."""
    photo = np.ascontiguousarray(decode_image((shared_dir / "photos" / name).read_bytes()).pixels[::3, ::3])
    alignment = align_face(photo, dlib_faces.landmarks(photo, dlib_faces.detect(photo, upsample=0)[0]), size=SIDE)
    return photo, alignment, Reference(name, alignment.inner_image, np.zeros((5, 2)))


def test_the_embedder_choice_follows_the_setting_and_what_is_installed(tmp_path: Path) -> None:
    assert choose_embedder("auto", tmp_path) == EmbedderChoice("dlib", dlib_faces.SAME_PERSON_DISTANCE)
    off = choose_embedder("off", tmp_path)
    assert off.name is None and "off" in off.reason
    missing = choose_embedder("arcface", tmp_path)
    assert missing.name is None and "ArcFace" in missing.reason
    (tmp_path / "buffalo_l").mkdir()
    (tmp_path / "buffalo_l" / "w600k_r50.onnx").write_bytes(b"")  # a user's model, one folder down
    found = choose_embedder("auto", tmp_path)
    assert found.name == "arcface" and found.model_file == tmp_path / "buffalo_l" / "w600k_r50.onnx"
    assert choose_embedder("dlib", tmp_path).name == "dlib"
    with pytest.raises(ValueError, match="identity meter"):
        choose_embedder("facenet", tmp_path)
    with pytest.raises(SettingsError, match="IDENTITY_METER"):
        Settings(identity_meter="facenet")
    with pytest.raises(SettingsError, match="IDENTITY_RATE"):
        Settings(identity_rate=0)


def test_without_dlib_models_the_meter_is_reported_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlib_faces, "models_dir", lambda: tmp_path)  # face-recognition-models without its files
    missing = choose_embedder("auto", tmp_path)
    assert missing.name is None and "is missing" in missing.reason
    meters = IdentityMeters(Settings(cache_dir=tmp_path, data_dir=tmp_path), lambda session_id, event: None)
    assert not meters.meter.available
    meters.warm()  # starts nothing
    assert not meters.meter.started


def test_the_worker_tells_people_apart_in_previews_and_finalized_photos(shared_dir: Path) -> None:
    paul_photo, paul_alignment, paul = aligned_reference(shared_dir, "paul_rudd.jpg")
    _, _, kate = aligned_reference(shared_dir, "kate_siegel.jpg")
    meter = IdentityMeter(choose_embedder("dlib", Path()))

    async def measure() -> tuple[float, float, float, float]:
        same = await meter.distance(paul, encoded(paul.image))  # the preview of an unedited face: WebP of the crop
        other = await meter.distance(paul, encoded(kate.image))
        smaller = await meter.distance(paul, encoded(paul.image[::2, ::2]))  # another size is resized first
        photo = PhotoCrop(encoded(paul_photo, "JPEG"), np.asarray(paul_alignment.inner.quad), SIDE)
        final = await meter.distance(paul, photo)
        await meter.close()
        return same, other, smaller, final

    same, other, smaller, final = asyncio.run(measure())
    assert same < 0.1 and smaller < 0.25 and final < 0.1
    assert other > dlib_faces.SAME_PERSON_DISTANCE


def test_arcface_tells_people_apart_when_the_user_has_its_model(shared_dir: Path) -> None:
    model = find_arcface_model(default_cache_dir())
    if model is None:
        pytest.skip(f"no ArcFace ONNX model ({', '.join(ARCFACE_PATTERNS)}) in {default_cache_dir()}")
    embedder = ArcFaceEmbedder(model)
    measurer = Measurer(embedder)
    faces = {}
    for name in ("paul_rudd.jpg", "kate_siegel.jpg"):
        photo, alignment, _ = aligned_reference(shared_dir, name)
        points = alignment.to_crop_points(dlib_faces.landmarks(photo, dlib_faces.detect(photo, upsample=0)[0]))
        five = np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
        faces[name] = Reference(name, alignment.inner_image, five)
    paul, kate = faces["paul_rudd.jpg"], faces["kate_siegel.jpg"]
    assert measurer.distance(paul, paul.image) < 1e-6
    assert measurer.distance(paul, decode_face(encoded(paul.image))) < embedder.threshold
    assert measurer.distance(paul, kate.image) > embedder.threshold


def test_an_unavailable_meter_refuses_to_measure() -> None:
    meter = IdentityMeter(EmbedderChoice(None, reason="dlib is not installed"))
    assert not meter.available
    with pytest.raises(RuntimeError, match="not installed"):
        asyncio.run(meter.distance(Reference("x", np.zeros((8, 8, 3), np.uint8), np.zeros((5, 2))), b""))


# ---- the live meter over the API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    return Runtime.build(small_settings(tmp_path_factory.mktemp("runtime")))


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


def client_for(settings: Settings, runtime: Runtime) -> TestClient:
    return TestClient(create_app(settings, runtime=runtime))


def ready_session(client: TestClient, photo: bytes) -> tuple[dict[str, Any], dict[str, str], str]:
    created = client.post("/api/sessions", files={"file": ("photo.jpg", photo, "image/jpeg")}).json()
    headers = {"Authorization": f"Bearer {created['token']}"}
    url = f"/api/sessions/{created['session_id']}/ws?token={created['token']}"
    assert client.post(f"/api/sessions/{created['session_id']}/face", json={"index": 0}, headers=headers).is_success
    with client.websocket_connect(url) as socket:
        if json.loads(socket.receive_text())["status"] != "ready":
            receive_until(socket, "ready")
    return created, headers, url


@pytest.fixture
def metered(tmp_path: Path, runtime: Runtime, photo: bytes) -> Iterator[Any]:
    with client_for(small_settings(tmp_path, identity_meter="dlib", identity_rate=2.0), runtime) as client:
        created, headers, url = ready_session(client, photo)
        slider = client.get("/api/directions").json()["directions"][0]["name"]
        yield client, created, headers, url, slider


def identity_messages(socket: Any, until_values: dict[str, float], limit: int = 400) -> list[dict[str, Any]]:
    """Read the socket until an identity message of ``until_values``; return every identity message seen."""
    found: list[dict[str, Any]] = []
    for _ in range(limit):
        message = socket.receive()
        if message.get("text") is None:
            continue
        data = json.loads(message["text"])
        assert data["type"] != "error", data
        if data["type"] == "identity":
            found.append(data)
            if data["values"] == until_values:
                return found
    raise AssertionError(f"no identity message of {until_values} in {limit} messages (saw {found})")


def test_the_meter_follows_a_drag_at_a_bounded_rate_and_reports_the_release(metered: Any) -> None:
    client, created, headers, url, slider = metered
    with client.websocket_connect(url) as socket:
        state = json.loads(socket.receive_text())
        assert state["identity"] == {"available": True, "embedder": "dlib", "threshold": 0.6, "preview": None,
                                     "final": None}
        socket.send_text(json.dumps({"seq": 1, "values": {slider: 0.0}}))
        neutral = identity_messages(socket, {slider: 0.0})[-1]
        began = time.monotonic()
        states = [round(float(value), 2) for value in np.linspace(0.0, 8.0, 12)[1:]]
        for seq, value in enumerate(states, start=2):  # a fast drag: far more states than the meter's rate
            socket.send_text(json.dumps({"seq": seq, "values": {slider: value}, "commit": value == states[-1]}))
        seen = identity_messages(socket, {slider: states[-1]})
        elapsed = time.monotonic() - began
    assert len(seen) <= 2.0 * elapsed + 2, f"{len(seen)} readings in {elapsed:.1f} s at 2 a second"
    assert len(seen) < len(states), "every state was measured: the newest did not replace waiting ones"
    released = seen[-1]
    assert neutral["distance"] < 0.2 and neutral["same_person"] is True
    assert released["distance"] > neutral["distance"] + 0.05, (neutral, released)
    assert released["threshold"] == 0.6 and released["source"] == "preview"
    assert released["same_person"] == (released["distance"] < 0.6)

    view = client.get(f"/api/sessions/{created['session_id']}", headers=headers).json()
    assert view["identity"]["preview"] == {key: value for key, value in released.items() if key != "type"}
    finalized = client.post(f"/api/sessions/{created['session_id']}/finalize", headers=headers).json()
    final = finalized["identity"]["final"]
    assert final["source"] == "final" and final["values"] == {slider: states[-1]}
    assert final["distance"] > neutral["distance"], (neutral, final)


def test_a_meter_turned_off_sends_nothing_and_says_so(tmp_path: Path, runtime: Runtime, photo: bytes) -> None:
    with client_for(small_settings(tmp_path, identity_meter="off"), runtime) as client:
        created, headers, url = ready_session(client, photo)
        slider = client.get("/api/directions").json()["directions"][0]["name"]
        with client.websocket_connect(url) as socket:
            assert json.loads(socket.receive_text())["identity"]["available"] is False
            socket.send_text(json.dumps({"seq": 1, "values": {slider: 3.0}, "commit": True}))
            _, before = receive_until(socket, "saved")
            time.sleep(1.0)
            socket.send_text(json.dumps({"type": "ping"}))
            _, after = receive_until(socket, "pong")
        assert not [item for item in before + after if isinstance(item, dict) and item.get("type") == "identity"]
        view = client.get(f"/api/sessions/{created['session_id']}", headers=headers).json()
        assert view["identity"] == {"available": False,
                                    "reason": "the identity meter is turned off (FLUIDSRV_IDENTITY_METER=off)"}
        finalized = client.post(f"/api/sessions/{created['session_id']}/finalize", headers=headers).json()
        assert finalized["identity"]["available"] is False and finalized["result"]


def test_a_cancelled_measurement_never_hands_its_answer_to_the_next(shared_dir: Path) -> None:
    _, _, paul = aligned_reference(shared_dir, "paul_rudd.jpg")
    _, _, kate = aligned_reference(shared_dir, "kate_siegel.jpg")
    meter = IdentityMeter(choose_embedder("dlib", Path()))

    async def measure() -> float:
        await meter.distance(paul, encoded(paul.image))  # the worker is up
        cancelled = asyncio.ensure_future(meter.distance(paul, encoded(paul.image)))  # the same person: ~0
        await asyncio.sleep(0.01)
        cancelled.cancel()
        other = await meter.distance(paul, encoded(kate.image))
        await meter.close()
        return other

    assert asyncio.run(measure()) > dlib_faces.SAME_PERSON_DISTANCE * 0.75  # Kate's distance, not Paul's answer


def test_a_worker_that_cannot_start_is_given_up_after_two_tries(tmp_path: Path) -> None:
    broken = tmp_path / "arcface.onnx"
    broken.write_bytes(b"not a model")
    meter = IdentityMeter(EmbedderChoice("arcface", 0.65, broken))
    reference = Reference("s:1", np.zeros((SIDE, SIDE, 3), np.uint8), np.zeros((5, 2)))

    async def measure() -> list[str]:
        failures = []
        for _ in range(MAX_FAILED_STARTS + 1):
            with pytest.raises(IdentityWorkerError) as refused:
                await meter.distance(reference, encoded(reference.image))
            failures.append(str(refused.value))
        await meter.close()
        return failures

    failures = asyncio.run(measure())
    assert not meter.available and "failed to start 2 times" in meter.unavailable_reason
    assert "failed to start" in failures[-1]  # answered at once, no third process
