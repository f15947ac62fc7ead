"""The one storage interface a session store writes through, whatever holds the bytes.

A session is stored as three parts (see :mod:`fluidsrv.session.spill`): ``meta`` (small JSON facts: status,
faces, sliders, undo history), ``arrays`` and ``tensors`` (large: the upload, crops, the generator delta, the
student state, the result). Beside it lives one small *edit record* per session, written through on every
committed edit. Two implementations:

- :class:`fluidsrv.backends.local_storage.LocalStorage`: files under the data directory (diskcache, i.e.
  SQLite) -- the single-box default;
- :class:`fluidsrv.backends.cloud_storage.CloudStorage`: ``meta`` and edit records in PostgreSQL, ``arrays`` and
  ``tensors`` in S3-compatible object storage -- the scale-out backend, shared by every process of a cluster.

Both give the same guarantees, which the store relies on: :meth:`SessionStorage.write` replaces a session's
three parts all at once (a reader sees the old parts or the new ones, never a mix, also across processes);
:meth:`SessionStorage.write_edit` keeps the highest revision (a late write of an older one changes nothing)
and is durable when it returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StorageUnavailableError(RuntimeError):
    """The storage's servers failed (unreachable, refused, down); the message names which and where."""


@dataclass(frozen=True)
class StoredSession:
    """A session's three stored parts."""

    meta: bytes
    arrays: bytes
    tensors: bytes


@runtime_checkable
class SessionStorage(Protocol):
    """Where sessions and their edit records live; every method may be called from several threads."""

    def write(self, session_id: str, parts: StoredSession) -> None:
        """Replace the session's three parts at once (atomic for every reader, in any process)."""

    def read(self, session_id: str) -> StoredSession | None:
        """The session's parts as last written, or None when it has none (never written, or removed)."""

    def scan(self) -> Iterator[tuple[str, bytes | None]]:
        """Every session id with stored parts, with its ``meta`` part (None when the entry is incomplete)."""

    def remove(self, session_id: str) -> None:
        """Delete the session's parts and its edit record (no error when there are none)."""

    def write_edit(self, session_id: str, revision: int, record: bytes) -> None:
        """Store the session's edit record unless one of a higher revision is stored; durable on return."""

    def read_edit(self, session_id: str) -> bytes | None:
        """The session's stored edit record, or None."""

    def edit_owners(self) -> Iterator[str]:
        """The session ids that have an edit record."""

    def volume(self) -> int:
        """An estimate of the bytes stored."""

    def close(self) -> None:
        """Release connections and files (idempotent)."""
