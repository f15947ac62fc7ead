"""Finalize's detail transfer: the edit is laid over the photo's own pixels; "replace" shows the raw render."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from fluidsrv.convert import encode_preview
from fluidsrv.geometry import align_face, face_landmarks
from fluidsrv.image_io import decode_image
from fluidsrv.protocol import decode_frame
from fluidsrv.runtime import Runtime
from fluidsrv.service import PREVIEW_FORMAT
from fluidsrv.settings import Settings, SettingsError
from fluidsrv.web import create_app
from tests.server_support import SMALL_PHOTO, receive_until, small_settings


def test_unknown_finalize_mode_is_refused_with_the_variable_name() -> None:
    with pytest.raises(SettingsError, match="FLUIDSRV_PHOTO_DETAIL must be one of transfer, replace"):
        Settings.from_env({"FLUIDSRV_PHOTO_DETAIL": "sharpen"})
    with pytest.raises(SettingsError, match="FLUIDSRV_MAX_SESSIONS='many' is not valid"):
        Settings.from_env({"FLUIDSRV_MAX_SESSIONS": "many"})


@dataclass
class Edited:
    """What a client sees: the preview frame of its slider state and the finalized photo."""

    preview: np.ndarray  # uint8 [R, R, 3]
    photo: np.ndarray  # uint8 [H, W, 3]


def edit_photo(settings: Settings, photo: bytes, strength: float) -> Edited:
    """Upload ``photo``, prepare face 0, set the first slider to ``strength``, preview it and finalize."""
    with TestClient(create_app(settings, runtime=Runtime.build(settings))) as client:
        created = client.post("/api/sessions", files={"file": ("photo.jpg", photo, "image/jpeg")}).json()
        base, headers = f"/api/sessions/{created['session_id']}", {"Authorization": f"Bearer {created['token']}"}
        assert client.post(f"{base}/face", json={"index": 0}, headers=headers).status_code == 202
        slider = client.get("/api/directions").json()["directions"][0]["name"]
        with client.websocket_connect(f"{base}/ws?token={created['token']}") as socket:
            if json.loads(socket.receive_text())["status"] != "ready":
                receive_until(socket, "ready")
            socket.send_text(json.dumps({"seq": 1, "values": {slider: strength}, "commit": True}))
            while (message := socket.receive()).get("bytes") is None:
                pass
            with Image.open(io.BytesIO(decode_frame(message["bytes"]).image)) as frame:
                preview = np.asarray(frame.convert("RGB"))
        finalized = client.post(f"{base}/finalize", headers=headers)
        assert finalized.status_code == 200, finalized.text
        result = client.get(finalized.json()["result"], headers=headers)
        return Edited(preview=preview, photo=decode_image(result.content).pixels)


def webp_round_trip(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as the client decodes it from a preview frame (int16 for differences)."""
    with Image.open(io.BytesIO(encode_preview(image, PREVIEW_FORMAT))) as decoded:
        return np.asarray(decoded.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


@pytest.fixture(scope="module")
def original(photo: bytes) -> np.ndarray:
    return decode_image(photo).pixels.astype(np.int16)


def test_an_unedited_face_is_the_photo_with_transfer_and_the_render_with_replace(
    tmp_path: Path, photo: bytes, original: np.ndarray
) -> None:
    transfer = edit_photo(small_settings(tmp_path / "t", photo_detail="transfer"), photo, 0.0)
    replace = edit_photo(small_settings(tmp_path / "r", photo_detail="replace"), photo, 0.0)

    transfer_error = np.abs(transfer.photo.astype(np.int16) - original).mean(axis=2)  # [H, W]
    replace_error = np.abs(replace.photo.astype(np.int16) - original).mean(axis=2)
    face = replace_error > 12  # where the untrained 32 px render replaced the face
    assert face.mean() > 0.01
    assert transfer_error[face].mean() < 2.0 and transfer_error.max() < 10  # JPEG re-encoding only
    assert replace_error[face].mean() > 10 * transfer_error[face].mean()

    settings = small_settings(tmp_path)
    image = decode_image(photo).pixels
    faces = Runtime.build(settings).stage("detector").detect(image)

    def inner_frame(size: int) -> np.ndarray:  # the aligned photo as a preview frame would carry it
        return webp_round_trip(align_face(image, face_landmarks(faces[0]), size=size).inner_image)

    assert transfer.preview.shape == replace.preview.shape == (256, 256, 3)  # both at the preview side
    assert np.abs(transfer.preview.astype(np.int16) - inner_frame(256)).mean() < 1.0  # at zero: the photo
    assert np.abs(replace.preview.astype(np.int16) - inner_frame(256)).mean() > 10.0  # ... or the untrained render


def test_an_edit_with_transfer_changes_the_face_by_the_renders_difference(
    tmp_path: Path, photo: bytes, original: np.ndarray
) -> None:
    edited = edit_photo(small_settings(tmp_path, photo_detail="transfer"), photo, 3.0)
    change = np.abs(edited.photo.astype(np.int16) - original).mean(axis=2)
    assert change.max() > 20 and (change > 8).mean() > 0.005  # the edit shows in the photo


def test_an_edit_with_replace_changes_only_the_outer_crop_with_the_predicted_outer_head(
    tmp_path: Path, photo: bytes, original: np.ndarray
) -> None:
    settings = small_settings(tmp_path, photo_detail="replace")
    assert settings.outer_seg != "inner"  # the default moves the old head outside the inner crop with the edit
    edited = edit_photo(settings, photo, 3.0)
    assert edited.photo.shape == original.shape
    change = np.abs(edited.photo.astype(np.int16) - original).max(axis=2)  # [H, W]

    image = decode_image(photo).pixels
    faces = Runtime.build(small_settings(tmp_path / "detect")).stage("detector").detect(image)
    outer = align_face(image, face_landmarks(faces[0]), size=32).outer
    side = outer.size
    corners = outer.to_photo_points(np.array([[0, 0], [side, 0], [side, side], [0, side]], np.float64) - 0.5)
    inside = np.zeros(change.shape, np.uint8)
    cv2.fillPoly(inside, [np.round(corners).astype(np.int32)], 1)
    inside = cv2.dilate(inside, np.ones((5, 5), np.uint8)).astype(bool)  # resampling reaches a pixel past the quad
    assert change[inside].max() > 20  # the render replaced the face
    assert change[~inside].max() <= 12  # ... and nothing outside the outer crop moved (JPEG re-encoding only)
