"""The spill codec reads what the previous release wrote: a format-1 session of release 0.1.0 still restores.

tests/fixtures/spill-v1/ holds the three blobs that release 0.1.0 (commit 666e1c0) wrote for one finalized
session (meta.json, arrays.safetensors, tensors.safetensors) and session.json: its id, token and the REST
state that server reported for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from fluidsrv.backends.local_storage import _BytesOnlyDisk
from fluidsrv.image_io import decode_image
from fluidsrv.session import JobProgress, Session, SessionStore, Status, UnknownSessionError, spill
from tests.test_sessions import FakeClock, assert_same

V1 = Path(__file__).resolve().parent / "fixtures" / "spill-v1"
PARTS = ("meta", "arrays", "tensors")


@pytest.fixture(scope="module")
def blobs() -> dict[str, bytes]:
    return {"meta": (V1 / "meta.json").read_bytes(), "arrays": (V1 / "arrays.safetensors").read_bytes(),
            "tensors": (V1 / "tensors.safetensors").read_bytes()}


@pytest.fixture(scope="module")
def reported() -> dict[str, Any]:
    facts: dict[str, Any] = json.loads((V1 / "session.json").read_text())
    return facts


def decode(blobs: dict[str, bytes], history_limit: int = 100) -> Session:
    return spill.decode(blobs["meta"], blobs["arrays"], blobs["tensors"], device=torch.device("cpu"),
                        history_limit=history_limit)


def write_like_release_0_1_0(data_dir: Path, session_id: str, blobs: dict[str, bytes]) -> None:
    """Put the blobs where the old store did: keys session/<id>/<part> of a bytes-only diskcache under data_dir."""
    cache = diskcache.Cache(str(data_dir / "sessions"), disk=_BytesOnlyDisk, eviction_policy="none", size_limit=2**62)
    with cache.transact(retry=True):
        cache.set(f"session/{session_id}/arrays", blobs["arrays"], retry=True)
        cache.set(f"session/{session_id}/tensors", blobs["tensors"], retry=True)
        cache.set(f"session/{session_id}/meta", blobs["meta"], retry=True)
    cache.close()


def read_back(data_dir: Path, session_id: str) -> dict[str, bytes | None]:
    cache = diskcache.Cache(str(data_dir / "sessions"), disk=_BytesOnlyDisk)
    try:
        return {part: cache.get(f"session/{session_id}/{part}") for part in PARTS}
    finally:
        cache.close()


def clock_for(blobs: dict[str, bytes]) -> FakeClock:
    """A clock a few seconds after the fixture was last used (so the TTL keeps it, whatever today's date)."""
    return FakeClock(json.loads(blobs["meta"])["last_used"] + 5.0)


def test_the_fixture_is_format_1_as_release_0_1_0_wrote_it(blobs: dict[str, bytes], reported: dict[str, Any]) -> None:
    meta = json.loads(blobs["meta"])
    assert meta["format"] == 1 and "upload" not in meta and "meta" in meta  # the free-form bags of format 1
    assert meta["id"] == reported["session_id"] == reported["state"]["session_id"]
    assert meta["token_digest"] == hashlib.sha256(reported["token"].encode()).hexdigest()
    assert spill.header(blobs["meta"]) == {key: meta[key] for key in
                                           ("format", "id", "token_digest", "created_at", "last_used")}
    assert 1 in spill.READABLE_FORMATS and spill.SPILL_FORMAT == 2


def test_a_format_1_session_decodes_to_what_the_old_server_reported(
        blobs: dict[str, bytes], reported: dict[str, Any]) -> None:
    state = reported["state"]
    session = decode(blobs)
    meta = json.loads(blobs["meta"])
    assert session.id == reported["session_id"]
    assert session.token_digest == hashlib.sha256(reported["token"].encode()).hexdigest()
    assert (session.created_at, session.last_used) == (meta["created_at"], meta["last_used"])
    assert session.status == Status.READY == Status(state["status"]) and session.error is state["error"] is None
    assert session.progress == JobProgress(**state["progress"])

    # the upload: the original bytes, its decoded pixels and metadata, file name and faces
    upload = session.upload
    decoded = decode_image(upload.data)
    assert upload.size == (state["width"], state["height"]) == (200, 200)
    assert np.array_equal(upload.pixels, decoded.pixels) and upload.pixels.dtype == np.uint8
    assert upload.metadata == decoded.metadata and upload.metadata.format == "JPEG"
    assert upload.filename == state["filename"] == "fixture.jpg"
    assert len(session.faces) == len(state["faces"]) == 1
    for face, facts in zip(session.faces, state["faces"]):
        assert list(face.box) == facts["box"] and face.score == facts["score"]
        assert face.landmarks5.shape == (5, 2) and face.landmarks5.dtype == np.float64
        assert np.allclose(face.landmarks5, facts["landmarks"], atol=0.006)
        assert face.landmarks68 is not None and face.landmarks68.shape == (68, 2)
    assert session.face_index == state["face_index"] == 0

    # the sliders and their history: can undo (twice), cannot redo
    edit = session.edit
    assert edit.sliders == state["sliders"] == {"sefa:0:2:0": 1.0, "sefa:0:4:0": -0.5}
    assert edit.history.undo_stack == [{}, {"sefa:0:2:0": 1.0}] and edit.history.redo_stack == []
    assert edit.history.committed == edit.sliders
    assert bool(edit.history.undo_stack) == state["can_undo"] and bool(edit.history.redo_stack) == state["can_redo"]

    # the two SeFa directions the session added, in order, with their vectors
    assert [direction.describe() for direction in edit.directions.values()] == state["custom_directions"]
    assert [(d.name, d.label, d.layers, d.slider_range) for d in edit.directions.values()] == [
        ("sefa:0:4:0", "SeFa 0:4 1", (0, 4), (-3.0, 3.0)), ("sefa:0:4:1", "SeFa 0:4 2", (0, 4), (-3.0, 3.0))]
    assert edit.version == meta["meta"]["directions_version"] == 1
    stored = safetensors.torch.load(blobs["tensors"])
    for name, direction in edit.directions.items():
        assert torch.equal(direction.vector, stored[f"extra/direction:{name}"]) and direction.vector.shape == (1, 64)

    # the prepared face: alignment, tensors and the preview references
    prepared = session.prepared
    assert prepared is not None and prepared.face_index == 0 and prepared.version == 1
    alignment = prepared.alignment
    assert alignment.photo_shape == (200, 200) and (alignment.inner.size, alignment.outer.size) == (32, 48)
    assert alignment.inner_image.shape == (32, 32, 3) and alignment.outer_image.shape == (48, 48, 3)
    box = session.faces[0].box  # the aligned crop is centred on the face
    assert box[0] < alignment.inner.centre[0] < box[2] and box[1] < alignment.inner.centre[1] < box[3]
    assert prepared.w.shape == (1, 64) and prepared.ws.shape == (1, 8, 64)
    assert torch.equal(prepared.w, stored["w"]) and torch.equal(prepared.ws, stored["ws"])
    delta_keys = {name.removeprefix("generator_delta/") for name in stored if name.startswith("generator_delta/")}
    assert set(prepared.generator_delta) == delta_keys and len(delta_keys) == 14  # LoRA factors of 7 convs
    assert all(key.endswith((".lora_down", ".lora_up")) for key in delta_keys)
    assert dict(prepared.student_state) == {}
    for key, tensor in prepared.generator_delta.items():
        assert torch.equal(tensor, stored[f"generator_delta/{key}"]), key
    assert prepared.reconstruction.shape == (32, 32, 3) and prepared.reconstruction.dtype == np.uint8
    assert prepared.head_mask.shape == (256, 256) and prepared.head_mask.dtype == np.float32
    assert 0.0 <= prepared.head_mask.min() < prepared.head_mask.max() <= 1.0
    assert prepared.preview_crop.shape == (256, 256, 3) and prepared.preview_crop.dtype == np.uint8
    assert session.require_ready() is prepared

    # the finalized result: a JPEG of the upload's size
    assert session.result is not None and state["result"] is not None
    result = decode_image(session.result)
    assert result.metadata.format == "JPEG" and result.pixels.shape == (200, 200, 3)
    assert session.result[:3] == b"\xff\xd8\xff"

    # and the restored edit state works
    assert edit.undo() and edit.sliders == {"sefa:0:2:0": 1.0}
    assert edit.undo() and edit.sliders == {}
    assert not edit.undo() and edit.redo() and edit.sliders == {"sefa:0:2:0": 1.0}


def test_a_format_1_session_restores_through_a_store_and_is_rewritten_as_format_2(
        tmp_path: Path, blobs: dict[str, bytes], reported: dict[str, Any]) -> None:
    session_id, token = reported["session_id"], reported["token"]
    write_like_release_0_1_0(tmp_path, session_id, blobs)
    clock = clock_for(blobs)
    expected = decode(blobs)

    store = SessionStore(tmp_path, clock=clock)
    assert len(store) == 1 and session_id in store and not store.is_in_memory(session_id)
    store.check(session_id, token)
    restored = store.get(session_id, token)
    assert store.stats().restores == 1
    assert_same(restored, expected)
    assert restored.last_used == clock.now  # touched
    store.close()  # writes it again, in this release's format

    rewritten = read_back(tmp_path, session_id)
    assert all(rewritten[part] is not None for part in PARTS)
    assert json.loads(rewritten["meta"] or b"")["format"] == spill.SPILL_FORMAT == 2
    clock.now += 5.0
    restarted = SessionStore(tmp_path, clock=clock)
    assert len(restarted) == 1
    again = restarted.get(session_id, token)
    assert_same(again, expected)
    assert again.status == Status.READY and again.result == expected.result
    again.edit.set_sliders({"sefa:0:4:1": 2.0})
    restarted.evict_idle()  # format 2 round-trips too, with the new state
    final = restarted.get(session_id, token)
    assert final.edit.sliders == {"sefa:0:4:1": 2.0}
    assert final.edit.history.undo_stack == [{}, {"sefa:0:2:0": 1.0}, {"sefa:0:2:0": 1.0, "sefa:0:4:0": -0.5}]
    restarted.close()


def test_a_format_1_session_prepared_before_head_masks_must_be_prepared_again(blobs: dict[str, bytes]) -> None:
    arrays = safetensors.numpy.load(blobs["arrays"])
    del arrays["extra/head_mask"], arrays["extra/preview_crop"]  # an even older preview: no head mask yet
    session = decode({**blobs, "arrays": safetensors.numpy.save(arrays)})
    assert session.prepared is None and session.status == Status.INTERRUPTED and session.error
    assert session.result is not None and len(session.edit.directions) == 2  # the rest is kept


def _v1_meta_as(blobs: dict[str, bytes], format_: object) -> bytes:
    """The fixture's meta renamed to session ff…f, with ``format`` set to ``format_`` (or removed for ...)."""
    facts = {**json.loads(blobs["meta"]), "id": "f" * 32, "format": format_}
    if format_ is Ellipsis:
        del facts["format"]
    return json.dumps(facts).encode()


@pytest.mark.parametrize("kind", ["future", "null", "no-format", "not-an-object", "not-json"])
def test_an_entry_of_an_unknown_format_is_discarded_with_a_warning(
        tmp_path: Path, blobs: dict[str, bytes], reported: dict[str, Any], caplog: pytest.LogCaptureFixture,
        kind: str) -> None:
    meta_bytes = {"future": lambda: _v1_meta_as(blobs, 99), "null": lambda: _v1_meta_as(blobs, None),
                  "no-format": lambda: _v1_meta_as(blobs, Ellipsis), "not-an-object": lambda: b"[1, 2]",
                  "not-json": lambda: b"not json"}[kind]()
    with pytest.raises(ValueError):  # SpillError, or the JSON error
        spill.header(meta_bytes)
    if kind in ("future", "null", "no-format"):  # (decode is only reached for entries whose header read)
        with pytest.raises(spill.SpillError, match="unknown session format"):
            decode({**blobs, "meta": meta_bytes})
    write_like_release_0_1_0(tmp_path, "f" * 32, {**blobs, "meta": meta_bytes})
    write_like_release_0_1_0(tmp_path, reported["session_id"], blobs)  # a readable neighbour

    with caplog.at_level(logging.WARNING, logger="fluidsrv.session.store"):
        store = SessionStore(tmp_path, clock=clock_for(blobs))
    assert any("discarding unreadable session entry" in record.getMessage() and "f" * 32 in record.getMessage()
               for record in caplog.records)
    assert len(store) == 1 and "f" * 32 not in store
    assert store.get(reported["session_id"], reported["token"]).status == Status.READY
    store.close()
    assert read_back(tmp_path, "f" * 32) == {part: None for part in PARTS}  # every part of it is gone


def test_an_entry_whose_body_is_unreadable_is_deleted_on_get(
        tmp_path: Path, blobs: dict[str, bytes], reported: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    write_like_release_0_1_0(tmp_path, reported["session_id"], {**blobs, "arrays": b"not safetensors"})
    store = SessionStore(tmp_path, clock=clock_for(blobs))
    assert len(store) == 1  # the header reads fine
    with caplog.at_level(logging.ERROR, logger="fluidsrv.session.store"), \
            pytest.raises(UnknownSessionError, match="could not be restored"):
        store.get(reported["session_id"], reported["token"])
    assert len(store) == 0 and any("unreadable" in record.getMessage() for record in caplog.records)
    store.close()
