"""The store that keeps sessions: tokens, memory budgets, pins, spill to disk, TTL and LRU.

- every access needs the session's token (``get(session_id, token)``), compared in constant time
  against its SHA-256 digest (only the digest is kept and written to disk); an unknown id raises
  :class:`UnknownSessionError` (404), a wrong token :class:`BadTokenError` (also 404, with the same code
  and message, so that nobody learns which session ids exist), too many sessions :class:`TooManySessionsError`
  (429);
- the tensors held by in-memory sessions are kept under a byte budget (and their host arrays under another):
  least-recently-used sessions spill to the store's :class:`~fluidsrv.backends.storage.SessionStorage` (files
  under ``data_dir`` by default, PostgreSQL + S3 for the scale-out backend; in the codec of
  :mod:`fluidsrv.session.spill`) and come back transparently on the next ``get``; a new store on the same
  storage finds every session written there (``close()`` writes all in-memory sessions, so a restarted
  server restores them);
- edits are durable: :meth:`SessionStore.record_edit` writes a session's edit state (sliders, undo history,
  added directions) through to disk as a small record in a database of its own (``data_dir/edits``: SQLite WAL,
  synchronous=FULL, records stored inline, never as side files), so it never waits behind another session's
  spill; the caller acknowledges the edit after it returns. A restored session takes the newer of its spilled
  edit state and its record (by revision), so a server killed at any moment restores the last recorded edit;
- sessions idle longer than the TTL are deleted with everything they wrote (``expire()``);
- pinned sessions (``with store.pinned(session):`` while a job or a websocket uses one) are never
  evicted or expired, so the object a job mutates is never dropped underneath it.

Threading: every store method takes one lock (``record_edit`` only the edit records' own lock), so the event
loop and the device worker may both call it. ``get`` may read from disk and copy tensors to the device; ``check``
never does, so async routes can reject bad requests cheaply and run ``get`` on a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fluidsrv.backends.local_storage import LocalStorage
from fluidsrv.backends.storage import SessionStorage, StorageUnavailableError, StoredSession
from fluidsrv.errors import UserError
from fluidsrv.session import spill
from fluidsrv.session.model import EditState, Session, SliderHistory, Upload

logger = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"[0-9a-f]{32}")


class SessionError(UserError):
    """A session request that cannot be served; ``status`` and ``code`` map it to a JSON HTTP error."""

    status = 400
    code = "session_error"


class UnknownSessionError(SessionError):
    """No such session (never existed, deleted, or expired)."""

    status = 404
    code = "unknown_session"


class BadTokenError(UnknownSessionError):
    """The token does not match the session (answered exactly like an unknown session)."""


class TooManySessionsError(SessionError):
    """The server holds its maximum number of sessions."""

    status = 429
    code = "too_many_sessions"


class SessionStateError(SessionError):
    """A session holds something that cannot be written to disk."""

    status = 500
    code = "session_state"


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
        storage: SessionStorage | None = None,
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
        self._edit_lock = threading.Lock()  # edit records are written without the store lock, never behind a spill
        self._edit_revisions: dict[str, int] = {}  # newest edit revision on disk, per session
        self._storage: SessionStorage = storage if storage is not None else LocalStorage(self.data_dir)
        self._load_index()
        self.expire()

    # ---- lifecycle ---------------------------------------------------------------------------------

    def create(self, upload: Upload) -> tuple[Session, str]:
        """Create a session for an upload; return it with its token (shown to the client once)."""
        with self._lock:
            self._check_open()
            if len(self) >= self.max_sessions:
                self.expire()
            if len(self) >= self.max_sessions:
                raise TooManySessionsError(f"the server holds its maximum of {self.max_sessions} sessions; try later")
            token = secrets.token_urlsafe(32)
            now = self._clock()
            session = Session(id=secrets.token_hex(16), token_digest=token_digest(token), created_at=now,
                              last_used=now, upload=upload,
                              edit=EditState(history=SliderHistory(limit=self.history_limit)))
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
            raise BadTokenError("no such session")
        live, entry = self._live.get(session_id), self._on_disk.get(session_id)
        last_used = live.last_used if live is not None else entry.last_used if entry is not None else None
        if last_used is not None and last_used <= self._clock() - self.ttl_seconds and not self._pins[session_id]:
            raise UnknownSessionError("this session has expired")  # deleted by the next get() or expire()

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

    def record_edit(self, session_id: str, edit: EditState) -> None:
        """Write an edit state (a :meth:`EditState.snapshot`) through to disk now; the newest revision wins.

        Takes no store lock and writes to its own database, so it never waits behind another session's spill;
        raises UnknownSessionError when the session no longer exists, RuntimeError when the store is closed.
        """
        record = spill.encode_edit(edit)
        with self._edit_lock:
            if self._closed:
                raise RuntimeError("the session store is closed")
            if session_id not in self._digests:
                raise UnknownSessionError("this session no longer exists")
            if edit.revision < self._edit_revisions.get(session_id, -1):
                return  # a newer state is on disk already
            self._storage.write_edit(session_id, edit.revision, record)
            self._edit_revisions[session_id] = edit.revision

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
            with self._edit_lock:
                self._closed = True
            self._storage.close()

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
                expired=self._counters["expired"], disk_bytes=0 if self._closed else self._storage.volume())

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
            raise BadTokenError("no such session")

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
        except (SessionStateError, StorageUnavailableError):
            logger.exception("session %s cannot be spilled; keeping it in memory", session_id)
            return 0
        del self._live[session_id]
        self._on_disk[session_id] = _DiskEntry(session.token_digest, session.created_at, session.last_used)
        self._counters["spills"] += 1
        return session.tensor_bytes()

    def _restore(self, session_id: str) -> Session:
        """Read a spilled session back into memory (tensors onto the store's device)."""
        try:
            stored = self._storage.read(session_id)
        except StorageUnavailableError as error:  # an outage is not a broken session: keep it, answer 503
            logger.error("session %s cannot be read now: %s", session_id, error)
            raise SessionError("the session storage is unavailable right now; try again in a moment", status=503,
                               code="storage_unavailable") from None
        try:
            if stored is None:
                raise ValueError("incomplete entry")
            session = spill.decode(stored.meta, stored.arrays, stored.tensors, device=self.device,
                                   history_limit=self.history_limit)
            self._take_newer_edit(session)
        except Exception as error:
            logger.exception("session %s on disk is unreadable; deleting it", session_id)
            self._remove(session_id)
            raise UnknownSessionError("this session could not be restored") from error
        del self._on_disk[session_id]
        self._live[session_id] = session
        self._counters["restores"] += 1
        return session

    def _take_newer_edit(self, session: Session) -> None:
        """Replace a restored session's edit state by its edit record when the record is newer."""
        record = self._storage.read_edit(session.id)
        if record is None:
            return
        try:
            if spill.edit_revision(record) >= session.edit.revision:
                session.edit = spill.decode_edit(record, device=self.device, history_limit=self.history_limit)
        except Exception:  # an unreadable record costs the edits since the last spill, never the session
            logger.exception("the edit record of session %s is unreadable; keeping its spilled edit state", session.id)

    def _write(self, session: Session) -> None:
        """Write the session's three parts in one transaction (the meta part last, as the commit marker)."""
        try:
            meta, arrays, tensors = spill.encode(session)
        except Exception as error:
            raise SessionStateError(f"session {session.id} holds state that cannot be written: {error}") from error
        self._storage.write(session.id, StoredSession(meta=meta, arrays=arrays, tensors=tensors))

    def _remove(self, session_id: str) -> None:
        """Forget a session everywhere: memory, index, pins and every disk entry."""
        self._live.pop(session_id, None)
        self._on_disk.pop(session_id, None)
        self._digests.pop(session_id, None)
        with self._pin_lock:
            self._pins.pop(session_id, None)
        with self._edit_lock:
            self._edit_revisions.pop(session_id, None)
        self._storage.remove(session_id)

    def _load_index(self) -> None:
        """Find the sessions a previous store wrote; drop unreadable or partial entries."""
        for session_id, meta_bytes in list(self._storage.scan()):
            try:
                if not _SESSION_ID.fullmatch(session_id) or meta_bytes is None:
                    raise ValueError("incomplete entry")
                meta = spill.header(meta_bytes)
                if meta["id"] != session_id:
                    raise ValueError("the entry names another session")
                self._on_disk[session_id] = _DiskEntry(
                    str(meta["token_digest"]), float(meta["created_at"]), float(meta["last_used"]))
                self._digests[session_id] = str(meta["token_digest"])
            except Exception:
                logger.warning("discarding unreadable session entry %r in %s", session_id, self.data_dir,
                               exc_info=True)
                self._storage.remove(session_id)
        for owner in list(self._storage.edit_owners()):  # a record outlives its session only if a delete was cut short
            if owner not in self._digests:
                self._storage.remove(owner)
