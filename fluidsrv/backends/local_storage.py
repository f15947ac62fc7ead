"""Session storage in files under the data directory: the single-box default (diskcache, i.e. SQLite).

``data_dir/sessions`` holds the three parts of each session under ``session/<id>/<part>``, written in one
transaction with the meta part last; ``data_dir/edits`` holds the edit records (SQLite WAL, synchronous=FULL,
records stored inline, never as side files), so a recorded edit survives a power cut and never waits behind
another session's spill. Only ``str`` keys and ``bytes`` values are ever stored or loaded: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache

from fluidsrv.backends.storage import StoredSession

PARTS = ("meta", "arrays", "tensors")
EDIT_RECORD_INLINE_BYTES = 64 * 1024**2
"""Edit records below this size live inside the SQLite file (fsync'd with it), never as separate files."""
_PREFIX = "session/"


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


def _key(session_id: str, part: str) -> str:
    return f"{_PREFIX}{session_id}/{part}"


def _owner(key: object) -> str | None:
    """The session id of one of our keys, or None for a key we never write (left alone, never loaded)."""
    if not isinstance(key, str) or not key.startswith(_PREFIX):
        return None
    return key.removeprefix(_PREFIX).partition("/")[0]


class LocalStorage:
    """:class:`~fluidsrv.backends.storage.SessionStorage` in two diskcache databases under ``data_dir``."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self._edit_lock = threading.Lock()
        self._closed = False
        self._parts = diskcache.Cache(
            str(self.data_dir / "sessions"), disk=_BytesOnlyDisk, eviction_policy="none", size_limit=2**62)
        self._edits = diskcache.Cache(
            str(self.data_dir / "edits"), disk=_BytesOnlyDisk, eviction_policy="none", size_limit=2**62,
            sqlite_synchronous=2, disk_min_file_size=EDIT_RECORD_INLINE_BYTES)

    def write(self, session_id: str, parts: StoredSession) -> None:
        """Write the three parts in one transaction, the meta part last."""
        with self._parts.transact(retry=True):
            self._parts.set(_key(session_id, "arrays"), parts.arrays, retry=True)
            self._parts.set(_key(session_id, "tensors"), parts.tensors, retry=True)
            self._parts.set(_key(session_id, "meta"), parts.meta, retry=True)

    def read(self, session_id: str) -> StoredSession | None:
        """The session's three parts, or None when any is missing."""
        with self._parts.transact(retry=True):
            blobs = [self._parts.get(_key(session_id, part), retry=True) for part in PARTS]
        if any(not isinstance(blob, bytes) for blob in blobs):
            return None
        meta, arrays, tensors = blobs
        return StoredSession(meta=meta, arrays=arrays, tensors=tensors)

    def scan(self) -> Iterator[tuple[str, bytes | None]]:
        """Every session id with parts on disk, with its meta part (None when a part is missing)."""
        found: dict[str, set[str]] = {}
        for key in list(self._parts.iterkeys()):
            owner = _owner(key)
            if owner is not None:
                found.setdefault(owner, set()).add(str(key).rpartition("/")[2])
        for session_id, parts in found.items():
            meta = None
            if parts.issuperset(PARTS):
                with contextlib.suppress(ValueError):  # a value that is not raw bytes is never loaded
                    meta = self._parts.get(_key(session_id, "meta"))
            yield session_id, meta if isinstance(meta, bytes) else None

    def remove(self, session_id: str) -> None:
        """Delete the session's parts (every key under its prefix) and its edit record."""
        with self._edit_lock:
            self._edits.delete(_key(session_id, "edit"), retry=True)
        with self._parts.transact(retry=True):
            for part in PARTS:
                self._parts.delete(_key(session_id, part), retry=True)

    def write_edit(self, session_id: str, revision: int, record: bytes) -> None:
        """Store the edit record unless a higher revision is stored (synchronous=FULL: durable on return)."""
        key = _key(session_id, "edit")
        with self._edit_lock:
            if self._closed:
                raise RuntimeError("the session storage is closed")
            with self._edits.transact(retry=True):
                try:
                    _, stored_revision = self._edits.get(key, default=None, tag=True, retry=True)
                except ValueError:  # a value that is not raw bytes (never ours): replaced
                    stored_revision = None
                if isinstance(stored_revision, int) and stored_revision > revision:
                    return
                self._edits.set(key, record, tag=revision, retry=True)  # the tag column holds the revision

    def read_edit(self, session_id: str) -> bytes | None:
        """The stored edit record, or None."""
        record = self._edits.get(_key(session_id, "edit"), retry=True)
        return record if isinstance(record, bytes) else None

    def edit_owners(self) -> Iterator[str]:
        """The session ids with an edit record."""
        for key in list(self._edits.iterkeys()):
            owner = _owner(key)
            if owner is not None:
                yield owner

    def volume(self) -> int:
        """The size of the parts database on disk, in bytes."""
        return 0 if self._closed else int(self._parts.volume())

    def close(self) -> None:
        """Close both databases (idempotent)."""
        with self._edit_lock:
            if self._closed:
                return
            self._closed = True
            self._edits.close()
        self._parts.close()
