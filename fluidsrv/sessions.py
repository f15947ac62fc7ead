"""Per-user editing sessions and the store that keeps them: tokens, memory budget, spill to disk, TTL.

A :class:`Session` is plain data that the pipeline fills in stage by stage (upload → faces → chosen
face → alignment and crops → ``w`` / ``ws`` → fine-tuned generator delta → student state) plus the
slider state and its undo/redo history. The :class:`SessionStore` holds them:

- every access needs the session's token (``get(session_id, token)``), compared in constant time
  against its SHA-256 digest (only the digest is kept and written to disk); an unknown id raises
  :class:`UnknownSessionError` (404), a wrong token :class:`BadTokenError` (401), too many sessions
  :class:`TooManySessionsError` (429);
- the tensors held by in-memory sessions are kept under a byte budget: least-recently-used
  sessions spill to a ``diskcache.Cache`` under ``data_dir`` and come back transparently on the next
  ``get``; a new store on the same directory finds every session written there (``close()`` writes
  all in-memory sessions, so a restarted server restores them);
- sessions idle longer than the TTL are deleted with everything they wrote (``expire()``);
- pinned sessions (``with store.pinned(session):`` while a job or a websocket uses one) are never
  evicted or expired, so the object a job mutates is never dropped underneath it.

Spill format (no pickle anywhere, so restoring runs no code): per session three byte strings,
``session/<id>/meta`` (JSON), ``.../arrays`` (safetensors of numpy arrays) and ``.../tensors``
(safetensors of torch tensors), written in one transaction; the cache refuses to store or load
anything that is not bytes.

Threading: every store method takes one lock, so the event loop and the device worker may both
call it. ``get`` may read from disk and copy tensors to the device; ``check`` never does, so async
routes can reject bad requests cheaply and run ``get`` on the executor. Mutate a session's tensor
dicts by assigning new dicts rather than in place while another thread may read them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from fluidsrv.errors import UserError
from fluidsrv.stages import Face

logger = logging.getLogger(__name__)

SPILL_FORMAT = 1
"""Version of the on-disk session format; entries of another version are discarded."""

Record = dict[str, Any]
"""A mixed record such as ``Alignment.to_dict()``: numpy arrays plus JSON values (str, numbers, lists, dicts)."""

_SESSION_ID = re.compile(r"[0-9a-f]{32}")


class SessionError(UserError):
    """A session request that cannot be served; ``status`` and ``code`` map it to a JSON HTTP error."""

    status = 400
    code = "session_error"


class UnknownSessionError(SessionError):
    """No such session (never existed, deleted, or expired)."""

    status = 404
    code = "unknown_session"


class BadTokenError(SessionError):
    """The token does not match the session."""

    status = 401
    code = "bad_token"


class TooManySessionsError(SessionError):
    """The server holds its maximum number of sessions."""

    status = 429
    code = "too_many_sessions"


class SessionStateError(SessionError):
    """A session holds something that cannot be written to disk (e.g. an object array)."""

    status = 500
    code = "session_state"


@dataclass
class SliderHistory:
    """Bounded undo/redo stacks of committed slider states (oldest dropped first).

    ``committed`` is the newest committed state: live states sent while a slider is dragged are not
    history, only the state at release (a commit) is.
    """

    limit: int = 100
    undo_stack: list[dict[str, float]] = field(default_factory=list)
    redo_stack: list[dict[str, float]] = field(default_factory=list)
    committed: dict[str, float] = field(default_factory=dict)

    def commit(self, state: Mapping[str, float]) -> None:
        """Make ``state`` the newest committed state; the previous one becomes undoable, redo is cleared."""
        new = dict(state)
        if new == self.committed:
            return
        self.undo_stack.append(self.committed)
        del self.undo_stack[: max(0, len(self.undo_stack) - self.limit)]
        self.redo_stack.clear()
        self.committed = new

    def undo(self) -> dict[str, float] | None:
        """Step back to the previous committed state and return it, or None when there is none."""
        if not self.undo_stack:
            return None
        self.redo_stack.append(self.committed)
        self.committed = self.undo_stack.pop()
        return dict(self.committed)

    def redo(self) -> dict[str, float] | None:
        """Step forward to the state undone last and return it, or None."""
        if not self.redo_stack:
            return None
        self.undo_stack.append(self.committed)
        self.committed = self.redo_stack.pop()
        return dict(self.committed)


@dataclass(eq=False)
class Session:
    """One user's editing state; the pipeline fills the fields in as the stages complete."""

    id: str
    token_digest: str  # SHA-256 hex of the token; the token itself is only returned by create()
    created_at: float  # wall-clock seconds (time.time()), survive a restart
    last_used: float
    upload: bytes = b""  # the original uploaded file, byte for byte
    image: np.ndarray | None = None  # uint8 [H, W, 3] RGB, the decoded upload
    faces: list[Face] = field(default_factory=list)  # largest first
    face_index: int | None = None  # the chosen face
    alignment: Record | None = None  # e.g. geometry.Alignment.to_dict(); restored with from_dict()
    inner_crop: np.ndarray | None = None  # uint8 [R, R, 3] aligned face at generator resolution
    outer_crop: np.ndarray | None = None  # uint8 [R2, R2, 3] wider aligned crop for paste-back
    w: torch.Tensor | None = None  # [1, w_dim]
    ws: torch.Tensor | None = None  # [1, num_ws, w_dim]
    generator_delta: dict[str, torch.Tensor] = field(default_factory=dict)  # fine-tuned minus base (or low-rank)
    student_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the tuned previewer's state dict
    sliders: dict[str, float] = field(default_factory=dict)  # direction name -> slider value
    history: SliderHistory = field(default_factory=SliderHistory)
    extra_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # any other numpy state (masks, ...)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # any other tensors
    meta: dict[str, Any] = field(default_factory=dict)  # small JSON-serialisable facts (stage, file name, ...)

    @property
    def face(self) -> Face | None:
        """The chosen face, if one was chosen."""
        if self.face_index is None or not 0 <= self.face_index < len(self.faces):
            return None
        return self.faces[self.face_index]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the session holds, by its spill name (``w``, ``generator_delta/<key>``, ...)."""
        named: dict[str, torch.Tensor] = {}
        if self.w is not None:
            named["w"] = self.w
        if self.ws is not None:
            named["ws"] = self.ws
        for prefix, group in (("generator_delta", self.generator_delta), ("student_state", self.student_state),
                              ("extra", self.extra_tensors)):
            for key, tensor in tuple(group.items()):
                named[f"{prefix}/{key}"] = tensor
        return named

    def tensor_bytes(self) -> int:
        """Bytes of tensor data the session holds (what the store's device-memory budget counts)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors().values())

    def host_bytes(self) -> int:
        """Bytes the session holds in host memory: the upload, its pixels, crops and other arrays."""
        arrays = [self.image, self.inner_crop, self.outer_crop, *self.extra_arrays.values()]
        if self.alignment is not None:
            arrays += [value for value in self.alignment.values() if isinstance(value, np.ndarray)]
        return len(self.upload) + sum(array.nbytes for array in arrays if array is not None)

    def set_sliders(self, values: Mapping[str, float], *, record: bool = True) -> None:
        """Make ``values`` the slider state; with ``record`` it is committed (the previous commit is undoable)."""
        new = {str(name): float(value) for name, value in values.items()}
        if not all(math.isfinite(value) for value in new.values()):
            raise ValueError("slider values must be finite numbers")
        if record:
            self.history.commit(new)
        self.sliders = new

    def undo(self) -> bool:
        """Go back one step: first to the last commit if uncommitted changes are shown; return whether it moved."""
        if self.sliders != self.history.committed:
            self.sliders = dict(self.history.committed)
            return True
        previous = self.history.undo()
        if previous is None:
            return False
        self.sliders = previous
        return True

    def redo(self) -> bool:
        """Re-apply the slider state undone last; return whether there was one."""
        following = self.history.redo()
        if following is None:
            return False
        self.sliders = following
        return True


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store (for /api and benchmarks)."""

    in_memory: int  # sessions held in memory
    on_disk_only: int  # sessions spilled and not in memory
    pinned: int
    tensor_bytes: int  # tensor bytes held by in-memory sessions
    budget_bytes: int
    host_bytes: int  # upload, pixel and array bytes held by in-memory sessions
    host_budget_bytes: int
    spills: int  # sessions written out by eviction
    restores: int  # sessions read back from disk
    expired: int  # sessions deleted by the TTL
    disk_bytes: int  # estimated size of the spill cache on disk


@dataclass(frozen=True)
class _DiskEntry:
    """What the store remembers about a session that lives only on disk."""

    token_digest: str
    created_at: float
    last_used: float


class _BytesOnlyDisk(diskcache.Disk):
    """A diskcache serializer that stores and loads only str keys and bytes values, never pickles."""

    def put(self, key: Any) -> Any:
        """Serialize a key (str only)."""
        if type(key) is not str:
            raise TypeError("session cache keys must be str")
        return super().put(key)

    def get(self, key: Any, raw: bool) -> Any:
        """Deserialize a key; a pickled (foreign) key is never unpickled and reads as None."""
        if not raw:
            return None
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        """Serialize a value (bytes only)."""
        if type(value) is not bytes:
            raise TypeError("session cache values must be bytes")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
        """Deserialize a value, refusing pickled ones."""
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise ValueError("refusing to load a session cache value that is not raw bytes")
        return super().fetch(mode, filename, value, read)


def token_digest(token: str) -> str:
    """Return the SHA-256 hex digest under which a token is kept."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    """Sessions in memory under a tensor byte budget, spilled to disk beyond it; see the module docstring."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        device: torch.device | str = "cpu",
        memory_budget_bytes: int = 2 * 1024**3,
        host_budget_bytes: int = 4 * 1024**3,
        ttl_seconds: float = 6 * 3600.0,
        max_sessions: int = 64,
        history_limit: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert memory_budget_bytes >= 0 and ttl_seconds > 0 and max_sessions > 0 and history_limit > 0
        self.data_dir = Path(data_dir)
        self.device = torch.device(device)
        self.memory_budget_bytes = memory_budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self.history_limit = history_limit
        self._clock = clock
        self._lock = threading.RLock()
        self._live: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._on_disk: dict[str, _DiskEntry] = {}  # sessions only on disk (not in memory)
        self._pins: Counter[str] = Counter()
        self._pin_lock = threading.Lock()  # pins are taken on the event loop: never behind a disk write
        # token digest of every session, in memory or on disk: read without the lock by check(), so the event
        # loop never waits for a disk write (single dict reads are atomic; writes happen under self._lock)
        self._digests: dict[str, str] = {}
        self._counters = Counter[str]()
        self._closed = False
        self._cache = diskcache.Cache(
            str(self.data_dir / "sessions"), disk=_BytesOnlyDisk, eviction_policy="none", size_limit=2**62)
        self._load_index()
        self.expire()

    # ---- lifecycle ---------------------------------------------------------------------------------

    def create(self, *, upload: bytes = b"", image: np.ndarray | None = None) -> tuple[Session, str]:
        """Create a session for an upload; return it with its token (shown to the client once)."""
        if image is not None:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, "image must be uint8 [H, W, 3]"
        with self._lock:
            self._check_open()
            if len(self) >= self.max_sessions:
                self.expire()
            if len(self) >= self.max_sessions:
                raise TooManySessionsError(f"the server holds its maximum of {self.max_sessions} sessions; try later")
            token = secrets.token_urlsafe(32)
            now = self._clock()
            session = Session(id=secrets.token_hex(16), token_digest=token_digest(token), created_at=now,
                              last_used=now, upload=upload, image=image,
                              history=SliderHistory(limit=self.history_limit))
            self._live[session.id] = session
            self._digests[session.id] = session.token_digest
            self._enforce_budget(keep=session.id)
            return session, token

    def check(self, session_id: str, token: str) -> None:
        """Raise UnknownSessionError / BadTokenError unless ``token`` opens ``session_id``.

        Safe to call on the event loop: it takes no lock and touches no disk (``get`` or ``expire`` delete an
        expired session).
        """
        if self._closed:
            raise RuntimeError("the session store is closed")
        digest = self._digests.get(session_id) if isinstance(session_id, str) else None
        if digest is None:
            raise UnknownSessionError("no such session")
        given = token_digest(token) if isinstance(token, str) else ""
        if not hmac.compare_digest(given, digest):
            raise BadTokenError("the token does not open this session")
        live, entry = self._live.get(session_id), self._on_disk.get(session_id)
        last_used = live.last_used if live is not None else entry.last_used if entry is not None else None
        if last_used is not None and last_used <= self._clock() - self.ttl_seconds and not self._pins[session_id]:
            raise UnknownSessionError("this session has expired")  # deleted by the next get() or expire()

    def peek(self, session_id: str) -> Session | None:
        """Return the in-memory session without authorising, touching or restoring it (None if spilled).

        Safe to call on the event loop (no lock).
        """
        return self._live.get(session_id)

    def get(self, session_id: str, token: str) -> Session:
        """Return the session (restored from disk if it was spilled) and mark it used."""
        with self._lock:
            self._check_open()
            self._authorize(session_id, token)
            session = self._live.get(session_id)
            if session is None:
                session = self._restore(session_id)
            self._touch(session)
            self._enforce_budget(keep=session_id)
            return session

    def update(self, session: Session) -> None:
        """Tell the store ``session`` changed (e.g. new tensors): mark it used and re-check the budget.

        If the session had been evicted while the caller held it, the caller's object is the newest
        state and is taken back in memory; a deleted or expired session raises UnknownSessionError.
        """
        with self._lock:
            self._check_open()
            current = self._live.get(session.id)
            if current is None and session.id not in self._on_disk:
                raise UnknownSessionError("this session no longer exists")
            if current is not session:
                if current is not None:
                    logger.warning("session %s was restored while an older copy was held; keeping the caller's",
                                   session.id)
                self._on_disk.pop(session.id, None)
                self._live[session.id] = session
            self._touch(session)
            self._enforce_budget(keep=session.id)

    def persist(self, session: Session) -> None:
        """Write ``session`` to disk now (e.g. after an expensive stage), keeping it in memory."""
        with self._lock:
            self._check_open()
            if self._live.get(session.id) is not session:
                self.update(session)
            self._write(session)

    def delete(self, session_id: str, token: str) -> None:
        """Delete a session and everything it wrote, memory and disk."""
        with self._lock:
            self._check_open()
            self._authorize(session_id, token)
            self._remove(session_id)

    def close(self) -> None:
        """Write every in-memory session to disk (a restarted store restores them) and close the cache."""
        with self._lock:
            if self._closed:
                return
            for session in list(self._live.values()):
                try:
                    self._write(session)
                except SessionStateError:
                    logger.exception("session %s could not be written on close", session.id)
            self._closed = True
            self._cache.close()

    # ---- pinning, eviction, expiry -------------------------------------------------------------------

    def pin(self, session: Session) -> None:
        """Keep ``session`` in memory and alive until a matching ``unpin`` (pins nest; no disk wait)."""
        with self._pin_lock:
            self._pins[session.id] += 1

    def unpin(self, session: Session) -> None:
        """Release one pin of ``session``."""
        with self._pin_lock:
            self._pins[session.id] -= 1
            if self._pins[session.id] <= 0:
                del self._pins[session.id]

    @contextmanager
    def pinned(self, session: Session) -> Iterator[Session]:
        """Pin ``session`` for the duration of a ``with`` block."""
        self.pin(session)
        try:
            yield session
        finally:
            self.unpin(session)

    def remove_oldest(self, disposable: Callable[[Session], bool]) -> str | None:
        """Delete the least recently used unpinned in-memory session for which ``disposable`` is true.

        Returns its id, or None when there is none. Used when the server is full, to make room.
        """
        with self._lock:
            self._check_open()
            for session_id, session in self._live.items():
                if not self._pins[session_id] and disposable(session):
                    self._remove(session_id)
                    return session_id
            return None

    def evict_idle(self) -> int:
        """Spill every unpinned in-memory session to disk; return the tensor bytes freed (the executor's OOM hook)."""
        with self._lock:
            if self._closed:
                return 0
            freed = 0
            for session_id in [sid for sid in self._live if not self._pins[sid]]:
                freed += self._evict(session_id)
            return freed

    def expire(self) -> list[str]:
        """Delete the unpinned sessions idle longer than the TTL (memory and disk); return their ids."""
        with self._lock:
            if self._closed:
                return []
            deadline = self._clock() - self.ttl_seconds
            last_used = {sid: s.last_used for sid, s in self._live.items()}
            last_used.update({sid: entry.last_used for sid, entry in self._on_disk.items()})
            expired = [sid for sid, used in last_used.items() if used <= deadline and not self._pins[sid]]
            for session_id in expired:
                self._remove(session_id)
            self._counters["expired"] += len(expired)
            return expired

    # ---- introspection --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of live sessions, in memory or on disk."""
        with self._lock:
            return len(self._live) + len(self._on_disk)

    def __contains__(self, session_id: object) -> bool:
        """Whether a session with this id exists (in memory or on disk)."""
        with self._lock:
            return session_id in self._live or session_id in self._on_disk

    def is_in_memory(self, session_id: str) -> bool:
        """Whether the session is held in memory (not only on disk)."""
        with self._lock:
            return session_id in self._live

    def stats(self) -> StoreStats:
        """Return a snapshot of the store's state and counters."""
        with self._lock:
            return StoreStats(
                in_memory=len(self._live), on_disk_only=len(self._on_disk), pinned=len(self._pins),
                tensor_bytes=self._tensor_bytes(), budget_bytes=self.memory_budget_bytes,
                host_bytes=sum(session.host_bytes() for session in self._live.values()),
                host_budget_bytes=self.host_budget_bytes,
                spills=self._counters["spills"], restores=self._counters["restores"],
                expired=self._counters["expired"], disk_bytes=0 if self._closed else int(self._cache.volume()))

    # ---- internals (callers hold self._lock) ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session store is closed")

    def _authorize(self, session_id: str, token: str) -> None:
        """Raise unless the session exists, has not expired and ``token`` matches (constant-time)."""
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise UnknownSessionError("no such session")
        live, entry = self._live.get(session_id), self._on_disk.get(session_id)
        if live is not None:
            digest, last_used = live.token_digest, live.last_used
        elif entry is not None:
            digest, last_used = entry.token_digest, entry.last_used
        else:
            raise UnknownSessionError("no such session")
        if last_used <= self._clock() - self.ttl_seconds and not self._pins[session_id]:
            self._remove(session_id)
            self._counters["expired"] += 1
            raise UnknownSessionError("this session has expired")
        given = token_digest(token) if isinstance(token, str) else ""
        if not hmac.compare_digest(given, digest):
            raise BadTokenError("the token does not open this session")

    def _touch(self, session: Session) -> None:
        session.last_used = max(session.last_used, self._clock())
        self._live.move_to_end(session.id)

    def _tensor_bytes(self) -> int:
        return sum(session.tensor_bytes() for session in self._live.values())

    def _enforce_budget(self, keep: str) -> None:
        """Spill least-recently-used unpinned sessions (never ``keep``) until tensors and host memory fit."""
        tensors = self._tensor_bytes()
        host = sum(session.host_bytes() for session in self._live.values())
        for session_id in list(self._live):
            if tensors <= self.memory_budget_bytes and host <= self.host_budget_bytes:
                return
            if session_id == keep or self._pins[session_id]:
                continue
            host_freed = self._live[session_id].host_bytes()
            freed = self._evict(session_id)
            if session_id not in self._live:
                tensors, host = tensors - freed, host - host_freed
        if tensors > self.memory_budget_bytes or host > self.host_budget_bytes:
            logger.info("sessions hold %d tensor / %d host bytes over budgets of %d / %d: the rest are in use",
                        tensors, host, self.memory_budget_bytes, self.host_budget_bytes)

    def _evict(self, session_id: str) -> int:
        """Write a session to disk and drop it from memory; return its tensor bytes (0 if it could not be written)."""
        session = self._live[session_id]
        try:
            self._write(session)
        except SessionStateError:
            logger.exception("session %s cannot be spilled; keeping it in memory", session_id)
            return 0
        del self._live[session_id]
        self._on_disk[session_id] = _DiskEntry(session.token_digest, session.created_at, session.last_used)
        self._counters["spills"] += 1
        return session.tensor_bytes()

    def _restore(self, session_id: str) -> Session:
        """Read a spilled session back into memory (tensors onto the store's device)."""
        try:
            blobs = [self._cache.get(_key(session_id, part)) for part in _PARTS]
            if any(blob is None for blob in blobs):
                raise ValueError("incomplete entry")
            session = _decode(*blobs, device=self.device, history_limit=self.history_limit)
        except Exception as error:
            logger.exception("session %s on disk is unreadable; deleting it", session_id)
            self._remove(session_id)
            raise UnknownSessionError("this session could not be restored") from error
        del self._on_disk[session_id]
        self._live[session_id] = session
        self._counters["restores"] += 1
        return session

    def _write(self, session: Session) -> None:
        """Write the session's three parts in one transaction (the meta part last, as the commit marker)."""
        meta, arrays, tensors = _encode(session)
        with self._cache.transact(retry=True):
            self._cache.set(_key(session.id, "arrays"), arrays, retry=True)
            self._cache.set(_key(session.id, "tensors"), tensors, retry=True)
            self._cache.set(_key(session.id, "meta"), meta, retry=True)

    def _remove(self, session_id: str) -> None:
        """Forget a session everywhere: memory, index, pins and every disk entry."""
        self._live.pop(session_id, None)
        self._on_disk.pop(session_id, None)
        self._digests.pop(session_id, None)
        with self._pin_lock:
            self._pins.pop(session_id, None)
        with self._cache.transact(retry=True):
            for part in _PARTS:
                self._cache.delete(_key(session_id, part), retry=True)

    def _load_index(self) -> None:
        """Find the sessions a previous store wrote; drop unreadable or partial entries."""
        parts: dict[str, set[str]] = {}
        for key in list(self._cache.iterkeys()):
            if not isinstance(key, str) or not key.startswith("session/"):
                continue  # not ours (we never write such keys): leave it alone, never load it
            session_id, _, part = str(key).removeprefix("session/").partition("/")
            parts.setdefault(session_id, set()).add(part)
        for session_id, found in parts.items():
            try:
                if not _SESSION_ID.fullmatch(session_id) or not found.issuperset(_PARTS):
                    raise ValueError(f"incomplete entry with parts {sorted(found)}")
                meta = json.loads(self._cache.get(_key(session_id, "meta")))
                if meta.get("format") != SPILL_FORMAT or meta.get("id") != session_id:
                    raise ValueError("unknown format")
                self._on_disk[session_id] = _DiskEntry(
                    str(meta["token_digest"]), float(meta["created_at"]), float(meta["last_used"]))
                self._digests[session_id] = str(meta["token_digest"])
            except Exception:
                logger.warning("discarding unreadable session entry %r in %s", session_id, self.data_dir,
                               exc_info=True)
                with self._cache.transact(retry=True):
                    for part in found:
                        self._cache.delete(f"session/{session_id}/{part}", retry=True)


_PARTS = ("meta", "arrays", "tensors")


def _key(session_id: str, part: str) -> str:
    return f"session/{session_id}/{part}"


# ---- the spill format ---------------------------------------------------------------------------------


def _encode(session: Session) -> tuple[bytes, bytes, bytes]:
    """Serialize a session into (meta JSON, numpy safetensors, torch safetensors) bytes."""
    arrays: dict[str, np.ndarray] = {"upload": np.frombuffer(session.upload, dtype=np.uint8)}
    for name in ("image", "inner_crop", "outer_crop"):
        value = getattr(session, name)
        if value is not None:
            arrays[name] = value
    for index, face in enumerate(session.faces):
        arrays[f"faces/{index}/landmarks5"] = face.landmarks5
        if face.landmarks68 is not None:
            arrays[f"faces/{index}/landmarks68"] = face.landmarks68
    alignment_json: dict[str, Any] | None = None
    if session.alignment is not None:
        alignment_json = {}
        for key, value in session.alignment.items():
            if isinstance(value, np.ndarray):
                arrays[f"alignment/{key}"] = value
            else:
                alignment_json[key] = value.item() if isinstance(value, np.generic) else value
    for key, array in session.extra_arrays.items():
        arrays[f"extra/{key}"] = array
    meta = {
        "format": SPILL_FORMAT,
        "id": session.id,
        "token_digest": session.token_digest,
        "created_at": session.created_at,
        "last_used": session.last_used,
        "faces": [{"box": list(face.box), "score": face.score} for face in session.faces],
        "face_index": session.face_index,
        "alignment": alignment_json,
        "sliders": session.sliders,
        "undo": session.history.undo_stack,
        "redo": session.history.redo_stack,
        "committed": session.history.committed,
        "meta": session.meta,
    }
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in session.tensors().items()}
    try:
        meta_bytes = json.dumps(meta, allow_nan=False).encode("utf-8")
        array_bytes = safetensors.numpy.save({key: np.ascontiguousarray(value) for key, value in arrays.items()})
        tensor_bytes = safetensors.torch.save(tensors)
    except Exception as error:
        raise SessionStateError(f"session {session.id} holds state that cannot be written: {error}") from error
    return meta_bytes, array_bytes, tensor_bytes


def _decode(meta_bytes: bytes, array_bytes: bytes, tensor_bytes: bytes, *, device: torch.device,
            history_limit: int) -> Session:
    """Rebuild a session from its three spilled parts, tensors on ``device``."""
    meta = json.loads(meta_bytes)
    if meta.get("format") != SPILL_FORMAT:
        raise ValueError(f"unknown session format {meta.get('format')!r}")
    arrays = safetensors.numpy.load(array_bytes)
    tensors = {name: tensor.to(device) for name, tensor in safetensors.torch.load(tensor_bytes).items()}

    def group(source: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        return {name.removeprefix(prefix): value for name, value in source.items() if name.startswith(prefix)}

    faces = [_decode_face(index, face, arrays) for index, face in enumerate(meta["faces"])]
    alignment: Record | None = None
    if meta["alignment"] is not None:
        alignment = {**meta["alignment"], **group(arrays, "alignment/")}
    history = SliderHistory(limit=history_limit, undo_stack=meta["undo"], redo_stack=meta["redo"],
                            committed=meta.get("committed", meta["sliders"]))
    return Session(
        id=meta["id"], token_digest=meta["token_digest"], created_at=meta["created_at"],
        last_used=meta["last_used"], upload=arrays["upload"].tobytes(), image=arrays.get("image"),
        faces=faces, face_index=meta["face_index"], alignment=alignment, inner_crop=arrays.get("inner_crop"),
        outer_crop=arrays.get("outer_crop"), w=tensors.get("w"), ws=tensors.get("ws"),
        generator_delta=group(tensors, "generator_delta/"), student_state=group(tensors, "student_state/"),
        sliders={name: float(value) for name, value in meta["sliders"].items()}, history=history,
        extra_arrays=group(arrays, "extra/"), extra_tensors=group(tensors, "extra/"), meta=meta["meta"],
    )


def _decode_face(index: int, face: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Face:
    """Rebuild the ``index``-th face from its JSON part (box, score) and its landmark arrays."""
    x0, y0, x1, y1 = (float(value) for value in face["box"])
    return Face(box=(x0, y0, x1, y1), score=float(face["score"]), landmarks5=arrays[f"faces/{index}/landmarks5"],
                landmarks68=arrays.get(f"faces/{index}/landmarks68"))
