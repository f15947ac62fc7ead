"""Sessions: tokens, LRU spill and restore, restart, TTL expiry, limits, no pickle, thread safety."""

from __future__ import annotations

import pickle
import random
import threading
from pathlib import Path

import diskcache
import numpy as np
import pytest
import torch

from fluidsrv.sessions import (
    BadTokenError,
    Session,
    SessionStateError,
    SessionStore,
    TooManySessionsError,
    UnknownSessionError,
)
from fluidsrv.stages import Face

W_DIM, NUM_WS = 16, 6


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fill(session: Session, seed: int) -> None:
    """Give a session one of everything the pipeline stores, with random contents."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    session.upload = rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes()  # > diskcache's file threshold
    session.image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    session.faces = [
        Face(box=(1.5, 2.0, 20.0, 22.25), score=0.97, landmarks5=rng.random((5, 2)), landmarks68=rng.random((68, 2))),
        Face(box=(3.0, 4.0, 9.0, 10.0), score=0.51, landmarks5=rng.random((5, 2))),
    ]
    session.face_index = 1
    session.alignment = {"quad": rng.random((4, 2)), "inner_box": [1, 2, 30, 31], "scale": 1.25,
                         "resolution": 64, "mode": "ffhq", "flipped": False, "padding": None}
    session.inner_crop = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    session.outer_crop = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    session.w = torch.randn(1, W_DIM)  # [1, w_dim]
    session.ws = session.w[:, None, :].repeat(1, NUM_WS, 1)  # [1, num_ws, w_dim]
    session.generator_delta = {"convs.0.conv.weight": torch.randn(1, 8, 8, 3, 3),
                               "to_rgbs.0.bias": torch.randn(1, 3, 1, 1).half()}
    session.student_state = {"decoder.0.weight": torch.randn(4, 4, dtype=torch.bfloat16), "step": torch.tensor(7)}
    session.set_sliders({"age": 1.5})
    session.set_sliders({"age": 2.0, "smile": -1.0})
    session.set_sliders({"age": 0.5, "smile": -1.0})
    assert session.undo()
    session.extra_arrays = {"face_mask": rng.random((16, 16)) > 0.5}
    session.extra_tensors = {"noise/0": torch.randn(1, 1, 4, 4)}
    session.meta = {"stage": "ready", "file_name": "photo.jpg", "timings": [0.5, 1.25]}


def assert_same(restored: Session, original: Session) -> None:
    for name in ("id", "token_digest", "created_at", "upload", "face_index", "sliders", "meta"):
        assert getattr(restored, name) == getattr(original, name), name
    assert restored.history.undo_stack == original.history.undo_stack
    assert restored.history.redo_stack == original.history.redo_stack
    for name in ("image", "inner_crop", "outer_crop"):
        assert_arrays_equal(getattr(restored, name), getattr(original, name))
    assert len(restored.faces) == len(original.faces)
    for got, want in zip(restored.faces, original.faces):
        assert (got.box, got.score) == (want.box, want.score)
        assert_arrays_equal(got.landmarks5, want.landmarks5)
        assert_arrays_equal(got.landmarks68, want.landmarks68)
    assert restored.alignment is not None and original.alignment is not None
    assert restored.alignment.keys() == original.alignment.keys()
    for key, value in original.alignment.items():
        if isinstance(value, np.ndarray):
            assert_arrays_equal(restored.alignment[key], value)
        else:
            assert restored.alignment[key] == value, key
    assert restored.extra_arrays.keys() == original.extra_arrays.keys()
    for key, array in original.extra_arrays.items():
        assert_arrays_equal(restored.extra_arrays[key], array)
    assert restored.tensors().keys() == original.tensors().keys()
    for key, tensor in original.tensors().items():
        restored_tensor = restored.tensors()[key]
        assert restored_tensor.dtype == tensor.dtype and restored_tensor.device == tensor.device, key
        assert torch.equal(restored_tensor, tensor), key


def assert_arrays_equal(got: np.ndarray | None, want: np.ndarray | None) -> None:
    if want is None:
        assert got is None
        return
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def filled_session(store: SessionStore, seed: int) -> tuple[Session, str]:
    session, token = store.create()
    fill(session, seed)
    store.update(session)
    return session, token


def spill_files(data_dir: Path) -> list[Path]:
    return [path for path in (data_dir / "sessions").rglob("*.val")]


def test_every_access_needs_the_right_token(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    first, first_token = store.create()
    second, second_token = store.create()
    assert first.id != second.id and first_token != second_token
    assert len(first_token) >= 43  # token_urlsafe(32)

    assert store.get(first.id, first_token) is first
    store.check(first.id, first_token)
    for bad in (second_token, "", first_token[:-1], "ü" * 43, None):
        with pytest.raises(BadTokenError) as error:
            store.get(first.id, bad)  # type: ignore[arg-type]
        assert error.value.status == 401
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
    probe, _ = SessionStore(tmp_path / "probe").create()
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
    session.set_sliders({"age": -2.0})  # the caller still mutates its object
    store.update(session)
    assert store.get(session.id, token) is session
    assert session.sliders == {"age": -2.0}


def test_a_restarted_store_restores_every_session(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    spilled, spilled_token = filled_session(store, 1)
    kept, kept_token = filled_session(store, 2)
    store.evict_idle()
    kept = store.get(kept.id, kept_token)
    kept.set_sliders({"age": 3.0})
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
    first, first_token = store.create()
    store.create()
    with pytest.raises(TooManySessionsError, match="maximum of 2") as error:
        store.create()
    assert error.value.status == 429
    store.delete(first.id, first_token)
    store.create()
    clock.now += 61  # both expire: creating frees their slots
    store.create()
    store.create()
    assert len(store) == 2


def test_the_spill_cache_never_unpickles(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = filled_session(store, 1)
    store.close()
    with pytest.raises(TypeError):
        SessionStore(tmp_path)._cache.set("session/x/meta", {"not": "bytes"})

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


def test_unwritable_state_is_reported_and_the_session_stays_in_memory(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = store.create()
    session.extra_arrays = {"objects": np.array([object()])}
    with pytest.raises(SessionStateError):
        store.persist(session)
    assert store.evict_idle() == 0
    assert store.get(session.id, token) is session


def test_undo_redo_history_is_bounded(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, history_limit=3)
    session, _ = store.create()
    for value in range(1, 6):
        session.set_sliders({"age": float(value)})
    session.set_sliders({"age": 5.0})  # unchanged: not recorded
    session.set_sliders({"age": 6.0}, record=False)  # e.g. mid-drag
    assert len(session.history.undo_stack) == 3
    assert session.undo() and session.sliders == {"age": 5.0}  # the uncommitted drag goes first
    assert session.undo() and session.sliders == {"age": 4.0}
    assert session.undo() and session.undo() and session.sliders == {"age": 2.0}
    assert not session.undo()
    assert session.redo() and session.sliders == {"age": 3.0}
    session.set_sliders({"smile": 1.0})
    assert not session.redo()
    with pytest.raises(ValueError, match="finite"):
        session.set_sliders({"age": float("nan")})


def test_a_drag_and_its_release_are_one_undo_step(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = store.create()
    session.set_sliders({"age": 1.0})
    for value in (1.5, 2.0, 2.5):  # live states while dragging
        session.set_sliders({"age": value}, record=False)
    session.set_sliders({"age": 2.5})  # release: the commit equals the live state
    assert session.undo() and session.sliders == {"age": 1.0}
    assert session.redo() and session.sliders == {"age": 2.5}
    store.evict_idle()  # the history survives a spill to disk
    restored = store.get(session.id, token)
    assert restored.undo() and restored.sliders == {"age": 1.0}


def test_the_host_budget_spills_sessions_holding_large_photos(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, host_budget_bytes=3 * 1024 * 1024)
    photo = np.zeros((1024, 1024, 3), np.uint8)  # 3 MiB of pixels, no tensors at all
    first, first_token = store.create(upload=b"x" * 1000, image=photo)
    second, _ = store.create(upload=b"y" * 1000, image=photo.copy())
    assert not store.is_in_memory(first.id) and store.is_in_memory(second.id)
    assert store.stats().host_bytes <= store.stats().host_budget_bytes + first.host_bytes()
    restored = store.get(first.id, first_token)
    assert np.array_equal(restored.image, photo) and not store.is_in_memory(second.id)


def test_check_never_waits_for_a_disk_write(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    session, token = store.create()
    with store._lock:  # as if another thread were writing a session to disk right now
        done = threading.Event()
        worker = threading.Thread(target=lambda: (store.check(session.id, token), store.pin(session), done.set()))
        worker.start()
        assert done.wait(5), "check() or pin() blocked on the store lock"
        worker.join()
    store.unpin(session)


def test_concurrent_access_from_threads_keeps_every_session_intact(tmp_path: Path) -> None:
    probe, _ = SessionStore(tmp_path / "probe").create()
    probe.w = torch.zeros(1, 256)
    store = SessionStore(tmp_path / "store", memory_budget_bytes=3 * probe.tensor_bytes())
    errors: list[BaseException] = []
    finals: dict[str, tuple[str, float]] = {}

    def worker(index: int) -> None:
        try:
            rng = random.Random(index)
            session, token = store.create()
            for step in range(40):
                session = store.get(session.id, token)
                value = float(index * 1000 + step)
                if rng.random() < 0.5:
                    with store.pinned(session):
                        session.w = torch.full((1, 256), value)
                        session.set_sliders({"step": value})
                        store.update(session)
                else:
                    session.w = torch.full((1, 256), value)
                    session.set_sliders({"step": value})
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
        assert session.sliders == {"step": value}
        assert session.w is not None and bool((session.w == value).all())
    assert store.stats().tensor_bytes <= store.memory_budget_bytes
