"""File digests: hashing a file, and remembering good digests so a listing need not re-hash gigabytes.

The stamps live in one JSON file in the cache folder, keyed by the file's resolved path; a stamp holds the
digest with the file's size and mtime, and stops counting once either changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

STAMPS_FILE = ".verified.json"  # in the cache dir: digests already checked, keyed by path, size and mtime
HASH_CHUNK_BYTES = 1024 * 1024  # bytes read at a time while hashing


def sha256_of(path: Path) -> str:
    """Return the lowercase hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class DigestStamps:
    """The sha256 digests already checked for files, valid while a file's size and mtime stay the same."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / STAMPS_FILE

    def remembered(self, path: Path) -> str | None:
        """Return the digest remembered for ``path`` if the file is unchanged since, else None."""
        stamp = self._read().get(str(path.resolve()))
        if not isinstance(stamp, dict):
            return None
        info = path.stat()
        if stamp.get("size") != info.st_size or stamp.get("mtime_ns") != info.st_mtime_ns:
            return None
        digest = stamp.get("sha256")
        return digest if isinstance(digest, str) else None

    def remember(self, path: Path, digest: str) -> None:
        """Remember that ``path``, as it is now on disk, has ``digest``."""
        info = path.stat()
        stamps = self._read()
        stamps[str(path.resolve())] = {"sha256": digest, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
        self._write(stamps)

    def forget(self, path: Path) -> None:
        """Drop any digest remembered for ``path``."""
        stamps = self._read()
        if stamps.pop(str(path.resolve()), None) is not None:
            self._write(stamps)

    def _read(self) -> dict[str, Any]:
        try:
            stamps = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return stamps if isinstance(stamps, dict) else {}

    def _write(self, stamps: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash later
            self.path.parent.mkdir(parents=True, exist_ok=True)
            scratch = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            scratch.write_text(json.dumps(stamps, indent=1, sort_keys=True))
            os.replace(scratch, self.path)
