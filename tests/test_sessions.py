"""Sessions: tokens, LRU spill and restore, restart, TTL expiry, limits, no pickle, thread safety, the typed model."""

from __future__ import annotations

import dataclasses
import pickle
import random
import threading
from collections.abc import Callable
from pathlib import Path

import diskcache
import numpy as np
import pytest
import torch

from fluidsrv.backends.local_storage import LocalStorage
from fluidsrv.geometry import Alignment, align_face
from fluidsrv.image_io import ImageMetadata
from fluidsrv.session import (
    BadTokenError,
    EditState,
    JobProgress,
    Prepared,
    Session,
    SessionStore,
    Status,
    StatusError,
    TooManySessionsError,
    UnknownSessionError,
    Upload,
)
from fluidsrv.session.model import MAX_SESSION_DIRECTIONS, TRANSITIONS
from fluidsrv.session.store import SessionStateError
from fluidsrv.stages import Direction, Face

W_DIM, NUM_WS = 16, 6
CROP = 16  # inner crop and preview side of the fake "generator"
PHOTO_SHAPE = (48, 64)  # H, W


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- building sessions ----------------------------------------------------------------------------------


def face_landmarks5(rng: np.random.Generator, centre: tuple[float, float], eye_distance: float) -> np.ndarray:
    """Five plausible landmarks (eyes, nose, mouth corners) of an upright face, jittered."""
    cx, cy = centre
    half = eye_distance / 2.0
    points = np.array([[cx - half, cy - 0.4 * half], [cx + half, cy - 0.4 * half], [cx, cy + 0.3 * half],
                       [cx - 0.7 * half, cy + 1.0 * half], [cx + 0.7 * half, cy + 1.0 * half]])
    return points + rng.normal(0.0, 0.05 * half, points.shape)


def make_upload(seed: int, *, data_size: int = 40_000, pixels: np.ndarray | None = None) -> Upload:
    """An upload with random bytes (> diskcache's file threshold), a random photo, full metadata and two faces."""
    rng = np.random.default_rng(seed)
    if pixels is None:
        pixels = rng.integers(0, 256, (*PHOTO_SHAPE, 3), dtype=np.uint8)
    metadata = ImageMetadata(format="JPEG", icc_profile=b"ICC" + rng.bytes(300), exif=b"Exif\x00\x00" + rng.bytes(90),
                             xmp=b"<x:xmpmeta/>", comment=b"", dpi=(72.0, 96.0), orientation=6)
    faces = (
        Face(box=(1.5, 2.0, 20.0, 22.25), score=0.97, landmarks5=face_landmarks5(rng, (12.0, 12.0), 8.0),
             landmarks68=rng.random((68, 2)) * 20.0),
        Face(box=(18.0, 8.0, 50.0, 44.0), score=0.51, landmarks5=face_landmarks5(rng, (34.0, 24.0), 14.0)),
    )
    return Upload(data=rng.bytes(data_size), pixels=pixels, metadata=metadata, filename="photo.jpg", faces=faces)


def make_prepared(seed: int, upload: Upload, face_index: int = 1) -> Prepared:
    """A prepared face with a real alignment and tensors of several dtypes (incl. a view and a shared tensor)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    alignment = align_face(upload.pixels, upload.faces[face_index].landmarks5, size=CROP)
    w = torch.randn(1, W_DIM)  # [1, w_dim]
    ws = w[:, None, :].repeat(1, NUM_WS, 1) + 0.1 * torch.randn(1, NUM_WS, W_DIM)  # [1, num_ws, w_dim]
    shared = torch.randn(3, 3)
    generator_delta = {"convs.0.conv.weight": torch.randn(1, 8, 8, 3, 3),
                       "to_rgbs.0.bias": torch.randn(1, 3, 1, 1).half(),
                       "convs.1.conv.weight.lora_down": shared}
    student_state = {"decoder.0.weight": torch.randn(4, 4, dtype=torch.bfloat16), "step": torch.tensor(7),
                     "decoder.1.weight": torch.randn(6, 4).t(),  # not contiguous
                     "tied": shared,  # shares memory with a generator_delta tensor
                     "mask": torch.rand(5) > 0.5, "spectrum": torch.randn(3, dtype=torch.complex64)}
    return Prepared(face_index=face_index, alignment=alignment, w=w, ws=ws, generator_delta=generator_delta,
                    student_state=student_state,
                    reconstruction=rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8),
                    head_mask=rng.random((CROP, CROP), dtype=np.float32),
                    preview_crop=rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8), version=3 + seed)


def make_directions(seed: int) -> list[Direction]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Direction(name="sefa:0:4:0", label="SeFa 0:4 1", vector=torch.randn(1, W_DIM, generator=generator),
                  layers=(0, 4), slider_range=(-3.0, 3.0), group="More sliders", provenance="SeFa eigenvector 0"),
        Direction(name="text:smile", label="Smile", vector=torch.randn(NUM_WS, W_DIM, generator=generator),
                  slider_range=(-1.5, 2.5), group="Text", provenance="prompt 'a smiling face'"),
    ]


def fill(session: Session, seed: int) -> None:
    """Give a session one of everything the pipeline stores, with random contents."""
    rng = np.random.default_rng(seed + 1000)
    session.upload = make_upload(seed)
    session.move_to(Status.PREPARING)
    session.progress = JobProgress("distil", 2, 5, "tuning the previewer")
    session.prepared = make_prepared(seed, session.upload)
    session.edit.add_directions(make_directions(seed))
    session.edit.set_sliders({"age": 1.5})
    session.edit.set_sliders({"age": 2.0, "smile": -1.0})
    session.edit.set_sliders({"age": 0.5, "smile": -1.0})
    assert session.edit.undo()  # something to redo
    session.edit.set_sliders({"age": 0.75, "smile": -1.0}, record=False)  # an uncommitted drag
    # the statuses a spilled session may be in, with what goes with them
    outcome = seed % 3
    if outcome == 0:
        session.move_to(Status.READY)
    elif outcome == 1:
        session.move_to(Status.FAILED, error="the encoder ran out of memory")
    session.result = rng.bytes(5000)


def assert_arrays_equal(got: np.ndarray | None, want: np.ndarray | None) -> None:
    if want is None:
        assert got is None
        return
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def assert_same_alignment(got: Alignment, want: Alignment) -> None:
    assert got.photo_shape == want.photo_shape
    assert got.inner_offset == want.inner_offset
    for crop in ("inner", "outer"):
        assert got.transform(crop).size == want.transform(crop).size, crop
        assert_arrays_equal(got.transform(crop).quad, want.transform(crop).quad)
        assert np.allclose(got.transform(crop).from_crop, want.transform(crop).from_crop, rtol=0, atol=1e-12)
        assert_arrays_equal(got.image(crop), want.image(crop))


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].device == tensor.device, key
        assert torch.equal(got[key], tensor), key


def assert_same(restored: Session, original: Session) -> None:
    """Everything a session holds is equal (but ``last_used``, which every access moves)."""
    for name in ("id", "token_digest", "created_at", "status", "error", "progress", "result", "face_index"):
        assert getattr(restored, name) == getattr(original, name), name
    # the upload: bytes, pixels, metadata (incl. its byte fields), file name and faces
    got, want = restored.upload, original.upload
    assert got.data == want.data and got.filename == want.filename and got.size == want.size
    assert got.metadata == want.metadata
    assert_arrays_equal(got.pixels, want.pixels)
    assert len(got.faces) == len(want.faces)
    for got_face, want_face in zip(got.faces, want.faces):
        assert (got_face.box, got_face.score) == (want_face.box, want_face.score)
        assert_arrays_equal(got_face.landmarks5, want_face.landmarks5)
        assert_arrays_equal(got_face.landmarks68, want_face.landmarks68)
    # the prepared face: alignment, host arrays and every tensor
    if original.prepared is None:
        assert restored.prepared is None
    else:
        assert restored.prepared is not None
        got_prepared, want_prepared = restored.prepared, original.prepared
        assert (got_prepared.face_index, got_prepared.version) == (want_prepared.face_index, want_prepared.version)
        assert_same_alignment(got_prepared.alignment, want_prepared.alignment)
        for name in ("reconstruction", "head_mask", "preview_crop"):
            assert_arrays_equal(getattr(got_prepared, name), getattr(want_prepared, name))
        for name in ("generator_delta", "student_state"):
            assert_same_tensors(dict(getattr(got_prepared, name)), dict(getattr(want_prepared, name)))
    # the edit state: sliders, history, the directions (in order) and their version
    got_edit, want_edit = restored.edit, original.edit
    assert got_edit.sliders == want_edit.sliders and got_edit.version == want_edit.version
    assert got_edit.history.undo_stack == want_edit.history.undo_stack
    assert got_edit.history.redo_stack == want_edit.history.redo_stack
    assert got_edit.history.committed == want_edit.history.committed
    assert got_edit.history.limit == want_edit.history.limit
    assert list(got_edit.directions) == list(want_edit.directions)
    for name, direction in want_edit.directions.items():
        assert got_edit.directions[name].describe() == direction.describe()
        assert got_edit.directions[name].slider_range == direction.slider_range
        assert got_edit.directions[name].layers == direction.layers
    assert_same_tensors(restored.tensors(), original.tensors())
    assert restored.tensor_bytes() == original.tensor_bytes() and restored.host_bytes() == original.host_bytes()


def filled_session(store: SessionStore, seed: int) -> tuple[Session, str]:
    session, token = store.create(make_upload(seed))
    fill(session, seed)
    store.update(session)
    return session, token


def small_upload(seed: int = 0) -> Upload:
    """A tiny upload (no faces) for tests that only need a session to exist."""
    rng = np.random.default_rng(seed)
    return Upload(data=rng.bytes(100), pixels=rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
                  metadata=ImageMetadata(format="PNG"))


def bare_session(status: Status = Status.UPLOADED) -> Session:
    return Session(id="0" * 32, token_digest="", created_at=0.0, last_used=0.0, upload=small_upload(), status=status)


def spill_files(data_dir: Path) -> list[Path]:
    return [path for path in (data_dir / "sessions").rglob("*.val")]


# ---- the store ------------------------------------------------------------------------------------------


def test_every_access_needs_the_right_token(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    first, first_token = store.create(small_upload(1))
    second, second_token = store.create(small_upload(2))
    assert first.id != second.id and first_token != second_token
    assert len(first_token) >= 43  # token_urlsafe(32)
    assert first.upload.data == small_upload(1).data and first.status == Status.UPLOADED

    assert store.get(first.id, first_token) is first
    store.check(first.id, first_token)
    for bad in (second_token, "", first_token[:-1], "ü" * 43, None):
        with pytest.raises(BadTokenError) as error:
            store.get(first.id, bad)  # type: ignore[arg-type]
        assert error.value.status == 404
        with pytest.raises(BadTokenError):
            store.check(first.id, bad)  # type: ignore[arg-type]
    for unknown in ("0" * 32, "../../etc/passwd", "", first.id.upper(), first.id + "0"):
        with pytest.raises(UnknownSessionError) as missing:
            store.get(unknown, first_token)
        assert missing.value.status == 404
    with pytest.raises(BadTokenError):
        store.delete(first.id, second_token)
    store.delete(first.id, first_token)
    with pytest.raises(UnknownSessionError):
        store.get(first.id, first_token)
    assert store.get(second.id, second_token) is second


def test_tokens_never_reach_the_disk(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    tokens = [filled_session(store, seed)[1] for seed in range(2)]
    store.close()
    written = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    assert written  # something was written
    for token in tokens:
        assert token.encode() not in written


def test_least_recently_used_sessions_spill_and_restore_equal(tmp_path: Path) -> None:
    probe, _ = SessionStore(tmp_path / "probe").create(make_upload(0))
    fill(probe, 0)
    one_session = probe.tensor_bytes()
    store = SessionStore(tmp_path / "store", memory_budget_bytes=int(2.5 * one_session))

    b, b_token = filled_session(store, 1)
    a, a_token = filled_session(store, 2)
    assert store.is_in_memory(a.id) and store.is_in_memory(b.id)
    assert store.get(b.id, b_token) is b  # b is now used more recently than a
    c, _ = filled_session(store, 3)  # over budget: the least recently used (a) spills
    assert not store.is_in_memory(a.id)
    assert store.is_in_memory(b.id) and store.is_in_memory(c.id)
    assert store.stats().tensor_bytes <= store.memory_budget_bytes

    restored = store.get(a.id, a_token)
    assert restored is not a
    assert_same(restored, a)
    assert not store.is_in_memory(b.id)  # now b was the least recently used
    assert_same(store.get(b.id, b_token), b)
    stats = store.stats()
    assert (stats.spills, stats.restores, stats.in_memory, stats.on_disk_only) == (3, 2, 2, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])  # ready with a result, failed with an error, preparing with progress
def test_every_status_round_trips_through_the_disk(tmp_path: Path, seed: int) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, seed)
    assert session.status == [Status.READY, Status.FAILED, Status.PREPARING][seed]
    assert (session.progress is not None) == (session.status == Status.PREPARING)
    store.evict_idle()
    restored = store.get(session.id, token)
    assert restored is not session
    assert_same(restored, session)
    # the restored edit state still works: the drag is undone first, then the undone commit redone
    assert restored.edit.sliders == {"age": 0.75, "smile": -1.0}
    assert restored.edit.undo() and restored.edit.sliders == {"age": 2.0, "smile": -1.0}
    assert restored.edit.redo() and restored.edit.sliders == {"age": 0.5, "smile": -1.0}
    assert not restored.edit.redo()


def test_a_session_without_a_prepared_face_round_trips(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    upload = dataclasses.replace(make_upload(4), filename=None,
                                 metadata=ImageMetadata(format="PNG"))  # no metadata bytes, no dpi
    session, token = store.create(upload)
    store.evict_idle()
    restored = store.get(session.id, token)
    assert_same(restored, session)
    assert restored.prepared is None and restored.result is None and restored.tensors() == {}


def test_pinned_sessions_are_not_evicted(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, memory_budget_bytes=0)
    a, _ = filled_session(store, 1)
    with store.pinned(a):
        b, _ = filled_session(store, 2)
        assert store.is_in_memory(a.id)  # over budget, but pinned
        assert store.evict_idle() == b.tensor_bytes()
        assert store.is_in_memory(a.id) and not store.is_in_memory(b.id)
    assert store.evict_idle() == a.tensor_bytes()
    assert store.stats().in_memory == 0


def test_update_takes_back_a_session_evicted_while_held(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 1)
    store.evict_idle()
    session.edit.set_sliders({"age": -2.0})  # the caller still mutates its object
    assert session.prepared is not None
    session.prepared = dataclasses.replace(session.prepared, w=torch.ones(1, W_DIM))  # and replaces a part
    store.update(session)
    assert store.get(session.id, token) is session
    assert session.edit.sliders == {"age": -2.0}
    store.evict_idle()  # the caller's state is what is written next
    restored = store.get(session.id, token)
    assert restored.edit.sliders == {"age": -2.0}
    assert restored.prepared is not None and torch.equal(restored.prepared.w, torch.ones(1, W_DIM))


def test_a_restarted_store_restores_every_session(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    spilled, spilled_token = filled_session(store, 1)
    kept, kept_token = filled_session(store, 2)
    store.evict_idle()
    kept = store.get(kept.id, kept_token)
    kept.edit.set_sliders({"age": 3.0})
    store.close()

    restarted = SessionStore(tmp_path)
    assert len(restarted) == 2 and restarted.stats().in_memory == 0
    assert_same(restarted.get(spilled.id, spilled_token), spilled)
    assert_same(restarted.get(kept.id, kept_token), kept)
    with pytest.raises(BadTokenError):
        restarted.get(kept.id, spilled_token)


def test_ttl_expiry_deletes_memory_and_disk(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SessionStore(tmp_path, ttl_seconds=60, clock=clock)
    on_disk, on_disk_token = filled_session(store, 1)
    store.evict_idle()
    in_memory, in_memory_token = filled_session(store, 2)
    store.persist(in_memory)
    pinned, pinned_token = filled_session(store, 3)
    assert len(spill_files(tmp_path)) >= 2
    clock.now += 30
    store.get(pinned.id, pinned_token)  # used recently ...
    clock.now += 45

    with store.pinned(pinned):
        assert sorted(store.expire()) == sorted([on_disk.id, in_memory.id])
    for session_id, token in ((on_disk.id, on_disk_token), (in_memory.id, in_memory_token)):
        with pytest.raises(UnknownSessionError):
            store.get(session_id, token)
    assert store.get(pinned.id, pinned_token) is pinned
    assert spill_files(tmp_path) == []  # the pinned one never reached the disk; the others are gone
    clock.now += 61
    with pytest.raises(UnknownSessionError, match="expired"):
        store.check(pinned.id, pinned_token)  # lock-free: reports it; the sweep deletes it
    assert store.expire() == [pinned.id]
    assert len(store) == 0 and store.stats().expired == 3


def test_expired_sessions_are_deleted_when_a_store_restarts(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SessionStore(tmp_path, ttl_seconds=60, clock=clock)
    filled_session(store, 1)
    store.close()
    assert spill_files(tmp_path)
    clock.now += 61
    restarted = SessionStore(tmp_path, ttl_seconds=60, clock=clock)
    assert len(restarted) == 0 and spill_files(tmp_path) == []


def test_max_sessions_is_enforced_with_a_clear_error(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SessionStore(tmp_path, max_sessions=2, ttl_seconds=60, clock=clock)
    first, first_token = store.create(small_upload())
    store.create(small_upload())
    with pytest.raises(TooManySessionsError, match="maximum of 2") as error:
        store.create(small_upload())
    assert error.value.status == 429
    store.delete(first.id, first_token)
    store.create(small_upload())
    clock.now += 61  # both expire: creating frees their slots
    store.create(small_upload())
    store.create(small_upload())
    assert len(store) == 2


def test_the_spill_cache_never_unpickles(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 1)
    store.close()
    with pytest.raises(TypeError):
        LocalStorage(tmp_path)._parts.set("session/x/meta", {"not": "bytes"})

    foreign = diskcache.Cache(str(tmp_path / "sessions"))  # a plain cache pickles whatever it is given
    foreign.set(f"session/{session.id}/meta", _Exploit())
    foreign.set(("a", "tuple", "key"), b"pickled key")
    foreign.close()
    EXPLOITED.clear()

    restarted = SessionStore(tmp_path)
    assert EXPLOITED == []
    assert len(restarted) == 0  # the tampered entry was discarded, not loaded
    with pytest.raises(UnknownSessionError):
        restarted.get(session.id, token)
    pickle.loads(pickle.dumps(_Exploit()))
    assert EXPLOITED == ["ran"]  # the payload works when unpickled: the store never unpickled it


EXPLOITED: list[str] = []


def _record_exploit(marker: str) -> None:
    EXPLOITED.append(marker)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record_exploit, ("ran",))


def _object_head_mask(session: Session) -> None:
    assert session.prepared is not None
    session.prepared = dataclasses.replace(session.prepared, head_mask=np.array([object()]))  # safetensors refuses


def _meta_device_tensor(session: Session) -> None:
    assert session.prepared is not None
    student_state = {**session.prepared.student_state, "lazy": torch.zeros(4, device="meta")}  # holds no data
    session.prepared = dataclasses.replace(session.prepared, student_state=student_state)


def _non_finite_score(session: Session) -> None:
    face = dataclasses.replace(session.upload.faces[0], score=float("nan"))  # JSON without NaN refuses it
    session.upload = dataclasses.replace(session.upload, faces=(face, *session.upload.faces[1:]))


@pytest.mark.parametrize("spoil", [_object_head_mask, _meta_device_tensor, _non_finite_score])
def test_unwritable_state_is_reported_and_the_session_stays_in_memory(
        tmp_path: Path, spoil: Callable[[Session], None]) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 1)
    spoil(session)
    with pytest.raises(SessionStateError) as error:
        store.persist(session)
    assert error.value.status == 500 and session.id in str(error.value)
    assert store.evict_idle() == 0
    assert store.get(session.id, token) is session
    store.close()  # reported, not raised
    assert len(SessionStore(tmp_path)) == 0


def test_undo_redo_history_is_bounded(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, history_limit=3)
    session, _ = store.create(small_upload())
    edit = session.edit
    assert edit.history.limit == 3
    for value in range(1, 6):
        edit.set_sliders({"age": float(value)})
    edit.set_sliders({"age": 5.0})  # unchanged: not recorded
    edit.set_sliders({"age": 6.0}, record=False)  # e.g. mid-drag
    assert len(edit.history.undo_stack) == 3
    assert edit.undo() and edit.sliders == {"age": 5.0}  # the uncommitted drag goes first
    assert edit.undo() and edit.sliders == {"age": 4.0}
    assert edit.undo() and edit.undo() and edit.sliders == {"age": 2.0}
    assert not edit.undo()
    assert edit.redo() and edit.sliders == {"age": 3.0}
    edit.set_sliders({"smile": 1.0})
    assert not edit.redo()
    with pytest.raises(ValueError, match="finite"):
        edit.set_sliders({"age": float("nan")})
    edit.reset()  # a new face was prepared: values and history go, the limit stays
    assert edit.sliders == {} and not edit.undo() and edit.history.limit == 3


def test_a_restored_session_keeps_the_stores_history_bound(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, history_limit=3)
    session, token = store.create(small_upload())
    for value in range(1, 6):
        session.edit.set_sliders({"age": float(value)})
    store.close()
    restored = SessionStore(tmp_path, history_limit=2).get(session.id, token)
    assert restored.edit.history.limit == 2
    assert len(restored.edit.history.undo_stack) == 3  # what was written is kept ...
    restored.edit.set_sliders({"age": 9.0})
    assert len(restored.edit.history.undo_stack) == 2  # ... and trimmed to the new bound at the next commit


def test_a_drag_and_its_release_are_one_undo_step(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = store.create(small_upload())
    session.edit.set_sliders({"age": 1.0})
    for value in (1.5, 2.0, 2.5):  # live states while dragging
        session.edit.set_sliders({"age": value}, record=False)
    session.edit.set_sliders({"age": 2.5})  # release: the commit equals the live state
    assert session.edit.undo() and session.edit.sliders == {"age": 1.0}
    assert session.edit.redo() and session.edit.sliders == {"age": 2.5}
    store.evict_idle()  # the history survives a spill to disk
    restored = store.get(session.id, token)
    assert restored.edit.undo() and restored.edit.sliders == {"age": 1.0}


def test_the_host_budget_spills_sessions_holding_large_photos(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, host_budget_bytes=3 * 1024 * 1024)
    photo = np.zeros((1024, 1024, 3), np.uint8)  # 3 MiB of pixels, no tensors at all
    first, first_token = store.create(Upload(data=b"x" * 1000, pixels=photo, metadata=ImageMetadata(format="PNG")))
    second, _ = store.create(Upload(data=b"y" * 1000, pixels=photo.copy(), metadata=ImageMetadata(format="PNG")))
    assert not store.is_in_memory(first.id) and store.is_in_memory(second.id)
    assert store.stats().host_bytes <= store.stats().host_budget_bytes + first.host_bytes()
    restored = store.get(first.id, first_token)
    assert np.array_equal(restored.upload.pixels, photo) and restored.upload.data == b"x" * 1000
    assert not store.is_in_memory(second.id)


def test_host_bytes_count_the_upload_the_prepared_arrays_and_the_result() -> None:
    session = bare_session()
    fill(session, 0)
    prepared = session.prepared
    assert prepared is not None and session.result is not None
    arrays = [session.upload.pixels, prepared.reconstruction, prepared.head_mask, prepared.preview_crop,
              prepared.alignment.inner_image, prepared.alignment.outer_image]
    assert session.host_bytes() == len(session.upload.data) + len(session.result) + sum(a.nbytes for a in arrays)
    assert session.tensor_bytes() == sum(t.numel() * t.element_size() for t in session.tensors().values())
    assert {"w", "ws", "direction/0", "direction/1", "student_state/step"} <= session.tensors().keys()


def test_check_never_waits_for_a_disk_write(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = store.create(small_upload())
    with store._lock:  # as if another thread were writing a session to disk right now
        done = threading.Event()
        worker = threading.Thread(target=lambda: (store.check(session.id, token), store.pin(session), done.set()))
        worker.start()
        assert done.wait(5), "check() or pin() blocked on the store lock"
        worker.join()
    store.unpin(session)


def _tiny_prepared(upload: Upload, value: float) -> Prepared:
    """A prepared face of 2 × 256 floats (w and ws), all ``value``."""
    alignment = align_face(upload.pixels, upload.faces[1].landmarks5, size=CROP)
    blank = np.zeros((CROP, CROP, 3), np.uint8)
    return Prepared(face_index=1, alignment=alignment, w=torch.full((1, 256), value), ws=torch.full((1, 1, 256), value),
                    generator_delta={}, student_state={}, reconstruction=blank,
                    head_mask=np.zeros((CROP, CROP), np.float32), preview_crop=blank)


def test_concurrent_access_from_threads_keeps_every_session_intact(tmp_path: Path) -> None:
    upload = make_upload(0, data_size=100)
    template = _tiny_prepared(upload, 0.0)
    probe = bare_session()
    probe.prepared = template
    store = SessionStore(tmp_path / "store", memory_budget_bytes=3 * probe.tensor_bytes())
    errors: list[BaseException] = []
    finals: dict[str, tuple[str, float]] = {}

    def worker(index: int) -> None:
        try:
            rng = random.Random(index)
            session, token = store.create(upload)
            for step in range(40):
                session = store.get(session.id, token)
                value = float(index * 1000 + step)
                prepared = dataclasses.replace(template, w=torch.full((1, 256), value),
                                               ws=torch.full((1, 1, 256), value))
                if rng.random() < 0.5:
                    with store.pinned(session):
                        session.prepared = prepared
                        session.edit.set_sliders({"step": value})
                        store.update(session)
                else:
                    session.prepared = prepared
                    session.edit.set_sliders({"step": value})
                    store.update(session)
                if rng.random() < 0.2:
                    store.evict_idle()
            finals[session.id] = (token, value)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(finals) == 4
    for session_id, (token, value) in finals.items():
        session = store.get(session_id, token)
        assert session.edit.sliders == {"step": value}
        assert session.prepared is not None
        assert bool((session.prepared.w == value).all()) and bool((session.prepared.ws == value).all())
    assert store.stats().tensor_bytes <= store.memory_budget_bytes


# ---- the status state machine -----------------------------------------------------------------------------

EXPECTED_TRANSITIONS = {
    Status.UPLOADED: {Status.PREPARING},
    Status.PREPARING: {Status.READY, Status.FAILED, Status.CANCELLED, Status.INTERRUPTED},
    Status.READY: {Status.PREPARING},
    Status.FAILED: {Status.PREPARING},
    Status.CANCELLED: {Status.PREPARING},
    Status.INTERRUPTED: {Status.PREPARING},
}


def test_the_transition_table_covers_every_status() -> None:
    assert {status: set(targets) for status, targets in TRANSITIONS.items()} == EXPECTED_TRANSITIONS
    assert set(TRANSITIONS) == set(Status)
    assert bare_session().status == Status.UPLOADED


@pytest.mark.parametrize("source", list(Status))
def test_move_to_allows_exactly_the_listed_transitions(source: Status) -> None:
    for target in Status:
        session = bare_session(source)
        if target in EXPECTED_TRANSITIONS[source] or target == source:  # staying put is no transition
            session.move_to(target)
            assert session.status == target
        else:
            with pytest.raises(StatusError, match=f"{source} cannot become {target}") as error:
                session.move_to(target)
            assert (error.value.status, error.value.code) == (409, "not_ready")
            assert session.status == source  # unchanged


def test_every_move_clears_the_last_jobs_progress_and_sets_the_error() -> None:
    session = bare_session(Status.READY)
    session.progress = JobProgress("finalize", 3, 3, "encoded")  # the last finalize's
    session.move_to(Status.PREPARING)  # picking the face again starts from no progress
    assert session.progress is None
    session.progress = JobProgress("encode", 3, 10, "inverting")
    session.move_to(Status.FAILED, error="out of memory")
    assert (session.status, session.error, session.progress) == (Status.FAILED, "out of memory", None)
    session.move_to(Status.PREPARING)  # retrying forgets the old error
    assert session.error is None
    for target in (Status.READY, Status.CANCELLED, Status.INTERRUPTED):
        session = bare_session(Status.PREPARING)
        session.progress = JobProgress("distil", 1, 2)
        session.move_to(target)
        assert session.progress is None and session.status == target


def test_require_ready_needs_the_ready_status_and_a_prepared_face() -> None:
    session = bare_session()
    with pytest.raises(StatusError):
        session.require_ready()
    fill(session, 1)  # failed, with a prepared face from before
    with pytest.raises(StatusError):
        session.require_ready()
    session.move_to(Status.PREPARING)
    session.move_to(Status.READY)
    assert session.require_ready() is session.prepared
    assert session.face_index == 1 and session.faces == session.upload.faces
    session.prepared = None
    with pytest.raises(StatusError):
        session.require_ready()


# ---- the edit state's directions ----------------------------------------------------------------------------


def _direction(name: str, value: float = 0.0, label: str | None = None) -> Direction:
    return Direction(name=name, label=label or name, vector=torch.full((1, W_DIM), value))


def test_add_directions_replaces_same_names_at_the_end_and_bumps_the_version() -> None:
    edit = EditState()
    assert edit.version == 0
    edit.add_directions([_direction("a", 1.0), _direction("b", 2.0), _direction("c", 3.0)])
    assert list(edit.directions) == ["a", "b", "c"] and edit.version == 1
    edit.add_directions([_direction("a", 9.0, label="new a")])
    assert list(edit.directions) == ["b", "c", "a"] and edit.version == 2
    assert edit.directions["a"].label == "new a" and bool((edit.directions["a"].vector == 9.0).all())
    edit.add_directions([])  # even an empty addition is a new version (the client refreshes its list)
    assert edit.version == 3 and list(edit.directions) == ["b", "c", "a"]


def test_add_directions_keeps_the_newest_and_owns_float_copies_of_the_vectors() -> None:
    edit = EditState()
    before = edit.directions
    edit.add_directions([_direction(f"d{index}", float(index)) for index in range(MAX_SESSION_DIRECTIONS + 5)])
    assert list(edit.directions) == [f"d{index}" for index in range(5, MAX_SESSION_DIRECTIONS + 5)]
    assert before == {}  # a new dict: a reader holding the old one sees it unchanged
    edit.add_directions([_direction("d5", 0.5), _direction("extra")])  # d5 moves to the end, d6 is the oldest
    names = list(edit.directions)
    assert len(names) == MAX_SESSION_DIRECTIONS and names[-2:] == ["d5", "extra"] and "d6" not in names
    assert names[0] == "d7"

    source = torch.arange(2 * W_DIM, dtype=torch.float16).reshape(W_DIM, 2).t()[:1]  # half, not contiguous
    edit.add_directions([Direction(name="half", label="Half", vector=source, layers=(2, 5),
                                   slider_range=(-1.0, 4.0), group="G", provenance="p")])
    stored = edit.directions["half"]
    assert stored.vector.dtype == torch.float32 and stored.vector.is_contiguous()
    assert torch.equal(stored.vector, source.float())
    source.fill_(7)  # the caller's tensor is not the session's
    assert not torch.equal(stored.vector, source.float())
    assert (stored.layers, stored.slider_range, stored.group, stored.provenance) == ((2, 5), (-1.0, 4.0), "G", "p")


# ---- durable edits ------------------------------------------------------------------------------------------


def test_a_recorded_edit_survives_a_store_that_never_closed(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 3)
    store.persist(session)
    session.edit.set_sliders({"age": 2.5, "smile": 0.5})
    session.edit.set_sliders({"age": -1.0})
    assert session.edit.undo()
    session.edit.add_directions(make_directions(11)[:1])
    store.record_edit(session.id, session.edit.snapshot())
    # the process dies here: no close(), no spill; a new store on the same directory is the restarted server
    restarted = SessionStore(tmp_path)
    got = restarted.get(session.id, token).edit
    assert got.sliders == {"age": 2.5, "smile": 0.5}
    assert got.history.undo_stack == session.edit.history.undo_stack
    assert got.history.redo_stack == [{"age": -1.0}]
    assert list(got.directions) == list(session.edit.directions)
    for name, direction in session.edit.directions.items():
        assert torch.equal(got.directions[name].vector, direction.vector)
    assert got.revision == session.edit.revision
    store.close()


def test_an_older_edit_record_never_overwrites_a_newer_one(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 4)
    store.persist(session)
    session.edit.set_sliders({"age": 1.0})
    stale = dataclasses.replace(session.edit, sliders={"age": -9.0}, revision=session.edit.revision - 1)
    store.record_edit(session.id, session.edit.snapshot())
    store.record_edit(session.id, stale)
    assert SessionStore(tmp_path).get(session.id, token).edit.sliders == {"age": 1.0}
    store.close()


def test_a_deleted_sessions_edit_record_is_gone_with_it(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 5)
    store.persist(session)
    store.record_edit(session.id, session.edit.snapshot())
    store.delete(session.id, token)
    with pytest.raises(UnknownSessionError):
        store.record_edit(session.id, session.edit.snapshot())
    restarted = SessionStore(tmp_path)
    assert len(restarted) == 0
    for folder in ("sessions", "edits"):
        assert not [key for key in diskcache.Cache(str(tmp_path / folder)).iterkeys() if session.id in str(key)]


def test_an_unreadable_edit_record_costs_only_the_edits_since_the_last_spill(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 7)
    store.persist(session)
    spilled = dict(session.edit.sliders)
    session.edit.set_sliders({"age": 4.0})
    store.record_edit(session.id, session.edit.snapshot())
    store._storage.write_edit(session.id, 10**9, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    restored = SessionStore(tmp_path).get(session.id, token)  # the session survives, with its spilled edit state
    assert restored.edit.sliders == spilled
    store.close()


def test_a_newer_spill_wins_over_an_older_edit_record(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 8)
    session.edit.set_sliders({"age": 1.0})
    store.record_edit(session.id, session.edit.snapshot())
    session.edit.set_sliders({"age": 2.0})
    store.persist(session)  # written later, with a newer revision than the record
    assert SessionStore(tmp_path).get(session.id, token).edit.sliders == {"age": 2.0}
    store.close()


def test_recording_an_edit_after_close_is_refused(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, _ = filled_session(store, 9)
    store.close()
    with pytest.raises(RuntimeError):
        store.record_edit(session.id, session.edit.snapshot())


def test_a_wrong_token_is_answered_exactly_like_an_unknown_session(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, _ = filled_session(store, 6)
    with pytest.raises(UnknownSessionError) as wrong:
        store.check(session.id, "not-the-token")
    with pytest.raises(UnknownSessionError) as unknown:
        store.check("0" * 32, "not-the-token")
    assert (wrong.value.status, wrong.value.code, wrong.value.message) == (
        unknown.value.status, unknown.value.code, unknown.value.message) == (404, "unknown_session", "no such session")
