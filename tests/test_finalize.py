"""Finalize's detail transfer: the edit is laid over the photo's own pixels; "replace" shows the raw render."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from fluidsrv.app import create_app
from fluidsrv.compose import add_photo_detail
from fluidsrv.image_io import decode_image
from fluidsrv.runtime import Runtime
from fluidsrv.settings import Settings, SettingsError
from tests.server_support import SMALL_PHOTO, receive_until, small_settings


def test_add_photo_detail_moves_the_photo_by_the_edit_and_leaves_the_rest_byte_identical() -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    reconstructed = photo.copy()
    reconstructed[10:30, 10:30] = 128  # a blurry render pasted over the face region
    edited = reconstructed.copy()
    edited[10:30, 10:30] = 140  # the edit brightens the render by 12

    result = add_photo_detail(photo, edited, reconstructed)

    expected = np.clip(photo[10:30, 10:30].astype(int) + 12, 0, 255)
    assert np.array_equal(result[10:30, 10:30], expected)
    outside = np.ones(photo.shape[:2], dtype=bool)
    outside[10:30, 10:30] = False
    assert np.array_equal(result[outside], photo[outside])
    assert np.array_equal(add_photo_detail(photo, reconstructed, reconstructed), photo)  # no edit: the photo
    with pytest.raises(ValueError, match="shapes differ"):
        add_photo_detail(photo, edited[:-1], reconstructed)


def test_unknown_finalize_mode_is_refused_with_the_variable_name() -> None:
    with pytest.raises(SettingsError, match="FLUIDSRV_FINALIZE_DETAIL must be one of transfer, replace"):
        Settings.from_env({"FLUIDSRV_FINALIZE_DETAIL": "sharpen"})
    with pytest.raises(SettingsError, match="FLUIDSRV_MAX_SESSIONS='many' is not valid"):
        Settings.from_env({"FLUIDSRV_MAX_SESSIONS": "many"})


def finalize_photo(settings: Settings, photo: bytes, strength: float) -> np.ndarray:
    """Upload ``photo``, prepare face 0, set the first slider to ``strength``, finalize; return the result's pixels."""
    with TestClient(create_app(settings, runtime=Runtime.build(settings))) as client:
        created = client.post("/api/sessions", files={"file": ("photo.jpg", photo, "image/jpeg")}).json()
        base, headers = f"/api/sessions/{created['session_id']}", {"Authorization": f"Bearer {created['token']}"}
        assert client.post(f"{base}/face", json={"index": 0}, headers=headers).status_code == 202
        with client.websocket_connect(f"{base}/ws?token={created['token']}") as socket:
            if json.loads(socket.receive_text())["status"] != "ready":
                receive_until(socket, "ready")
            if strength:
                slider = client.get("/api/directions").json()["directions"][0]["name"]
                socket.send_text(json.dumps({"seq": 1, "values": {slider: strength}, "commit": True}))
                while socket.receive().get("bytes") is None:  # the committed state's preview frame
                    pass
        finalized = client.post(f"{base}/finalize", headers=headers)
        assert finalized.status_code == 200, finalized.text
        result = client.get(finalized.json()["result"], headers=headers)
        return decode_image(result.content).pixels


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


@pytest.fixture(scope="module")
def original(photo: bytes) -> np.ndarray:
    return decode_image(photo).pixels.astype(np.int16)


def test_an_unedited_finalize_returns_the_photo_with_transfer_and_the_render_with_replace(
    tmp_path: Path, photo: bytes, original: np.ndarray
) -> None:
    transferred = finalize_photo(small_settings(tmp_path / "t", finalize_detail="transfer"), photo, 0.0)
    replaced = finalize_photo(small_settings(tmp_path / "r", finalize_detail="replace"), photo, 0.0)

    transfer_error = np.abs(transferred.astype(np.int16) - original).mean(axis=2)  # [H, W]
    replace_error = np.abs(replaced.astype(np.int16) - original).mean(axis=2)
    face = replace_error > 12  # where the untrained 32 px render replaced the face
    assert face.mean() > 0.01
    assert transfer_error[face].mean() < 2.0 and transfer_error.max() < 10  # JPEG re-encoding only
    assert replace_error[face].mean() > 10 * transfer_error[face].mean()


def test_an_edit_with_transfer_changes_the_face_by_the_renders_difference(
    tmp_path: Path, photo: bytes, original: np.ndarray
) -> None:
    edited = finalize_photo(small_settings(tmp_path, finalize_detail="transfer"), photo, 3.0)
    change = np.abs(edited.astype(np.int16) - original).mean(axis=2)
    assert change.max() > 20 and (change > 8).mean() > 0.005  # the edit shows in the photo
