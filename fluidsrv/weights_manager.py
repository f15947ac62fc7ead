"""Where each weights file of the manifest lives, and how to check and download it.

Plugins find a file with :meth:`WeightsManager.path_for` and explain a missing one with
:meth:`WeightsManager.missing_reason`. The manifest itself is :mod:`fluidsrv.manifest`; the HTTP transfer is
:mod:`fluidsrv.fetch`: a download is checked (size, sha256) as a ``.part`` file and only then renamed into
place, so a file under its final name is always complete.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from fluidsrv.digest_stamps import DigestStamps, sha256_of
from fluidsrv.fetch import DownloadError, download, exclusive_lock, fsync_file, host_of
from fluidsrv.manifest import MANIFEST_PATH, Kind, WeightsEntry, WeightsError, load_manifest
from fluidsrv.progress_bar import ProgressCallback, megabytes
from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR, default_cache_dir

PART_SUFFIX = ".part"


class Status(StrEnum):
    """What is known about a file on disk."""

    MISSING = "missing"
    PRESENT = "present"  # on disk, digest not checked (or none published)
    VERIFIED = "verified"  # on disk, sha256 equals the manifest's
    CHECKSUM_MISMATCH = "checksum-mismatch"  # on disk, size or sha256 differs from the manifest's


@dataclass(frozen=True)
class EntryStatus:
    """The state of one entry's file: where it is, its status and a human detail."""

    entry: WeightsEntry
    path: Path
    status: Status
    detail: str = ""
    actual_sha256: str | None = None  # set when the file was hashed


class ContextLike(Protocol):
    """Anything with the two weights folders (``fluidsrv.stages.PluginContext`` fits)."""

    @property
    def weights_dir(self) -> Path:
        """The repository's embedded weights folder."""
        ...

    @property
    def cache_dir(self) -> Path:
        """The user's weights cache."""
        ...


class WeightsManager:
    """Find, check and download the files of a weights manifest."""

    def __init__(
        self,
        manifest: Mapping[str, WeightsEntry] | Path | None = None,
        *,
        weights_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        if manifest is None or isinstance(manifest, Path):
            manifest = load_manifest(manifest or MANIFEST_PATH)
        self.entries: dict[str, WeightsEntry] = dict(manifest)
        self.weights_dir = Path(weights_dir) if weights_dir is not None else EMBEDDED_WEIGHTS_DIR
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._stamps = DigestStamps(self.cache_dir)  # so `list` can say "verified" without hashing gigabytes

    @classmethod
    def from_context(cls, context: ContextLike, manifest: Path | None = None) -> WeightsManager:
        """Return a manager using a plugin context's weights and cache folders."""
        return cls(manifest, weights_dir=context.weights_dir, cache_dir=context.cache_dir)

    # -- lookup --

    def entry(self, name: str) -> WeightsEntry:
        """Return the entry called ``name``; an unknown name raises with the closest known names."""
        try:
            return self.entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.entries), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            known = ", ".join(sorted(self.entries)) or "none"
            raise WeightsError(f"no weights called {name!r}.{hint} Known: {known}.") from None

    def path_for(self, name: str) -> Path:
        """Return where ``name``'s file is or belongs: weights_dir for embedded entries, else the cache."""
        entry = self.entry(name)
        folder = self.weights_dir if entry.kind is Kind.EMBEDDED else self.cache_dir
        return folder / entry.file

    def existing_files(self, names: Sequence[str]) -> list[Path]:
        """The files of the manifest entries ``names`` that are present, in order (names not listed are skipped)."""
        found = []
        for name in names:
            try:
                path = self.path_for(name)
            except WeightsError:
                continue
            if path.is_file():
                found.append(path)
        return found

    def missing_reason(self, name: str) -> str | None:
        """Return why ``name``'s file cannot be used yet (for a plugin's ``unavailable``), or None."""
        entry = self.entry(name)
        path = self.path_for(name)
        if path.is_file():
            return None
        if entry.kind is Kind.EMBEDDED:
            return f"embedded model {entry.file} is not in {self.weights_dir} yet"
        if entry.urls:
            return f"{entry.file} is not in {self.cache_dir}; run `fluidsrv weights fetch {name}`"
        return f"{entry.file} is not in {self.cache_dir}; put it there (see `fluidsrv weights list`)"

    # -- status and verification --

    def status(self, *, check: bool = False) -> list[EntryStatus]:
        """Return the status of every entry, in manifest order; ``check`` hashes files not yet verified."""
        return [self.status_of(name, check=check) for name in self.entries]

    def status_of(self, name: str, *, check: bool = False) -> EntryStatus:
        """Return one entry's status: cheap (size and remembered digests) unless ``check`` is set."""
        entry = self.entry(name)
        path = self.path_for(name)
        if not path.is_file():
            return EntryStatus(entry, path, Status.MISSING)
        size = path.stat().st_size
        if entry.size is not None and size != entry.size:
            return EntryStatus(
                entry, path, Status.CHECKSUM_MISMATCH, f"{size} bytes on disk, the manifest says {entry.size}"
            )
        remembered = self._stamps.remembered(path)
        if remembered is not None and entry.sha256 is not None:
            if remembered == entry.sha256:
                return EntryStatus(entry, path, Status.VERIFIED, actual_sha256=remembered)
            return EntryStatus(entry, path, Status.CHECKSUM_MISMATCH, "sha256 differs", actual_sha256=remembered)
        if check:
            return self.verify(name)
        detail = "" if entry.has_checksum else "unverified: no published checksum"
        return EntryStatus(entry, path, Status.PRESENT, detail)

    def verify(self, name: str) -> EntryStatus:
        """Hash ``name``'s file and compare it with the manifest; remember a good digest."""
        entry = self.entry(name)
        path = self.path_for(name)
        if not path.is_file():
            return EntryStatus(entry, path, Status.MISSING)
        digest = sha256_of(path)
        if entry.sha256 is None:
            return EntryStatus(entry, path, Status.PRESENT, "unverified: no published checksum", actual_sha256=digest)
        if digest != entry.sha256:
            self._stamps.forget(path)
            return EntryStatus(
                entry,
                path,
                Status.CHECKSUM_MISMATCH,
                f"sha256 is {digest}, the manifest says {entry.sha256}",
                actual_sha256=digest,
            )
        self._stamps.remember(path, digest)
        return EntryStatus(entry, path, Status.VERIFIED, actual_sha256=digest)

    # -- download --

    def fetch(
        self,
        name: str,
        *,
        url: str | None = None,
        progress: ProgressCallback | None = None,
        timeout: float = 30.0,
    ) -> Path:
        """Download ``name`` into the cache (resuming a ``.part``), check it, rename it into place.

        ``url`` replaces the manifest's mirrors. An existing file that verifies is kept as is. Raises
        :class:`WeightsError` with a readable reason when every URL fails; a partial download is kept
        for the next call unless its content proved wrong.
        """
        entry = self.entry(name)
        if entry.kind is Kind.EMBEDDED:
            raise WeightsError(
                f"{name} is an embedded model: it ships in {self.weights_dir} (or is made by `fluidsrv train`), "
                "it is not downloaded"
            )
        urls = (url,) if url else entry.urls
        if not urls:
            raise WeightsError(f"{name} has no download URL; put {entry.file} in {self.cache_dir} or pass --url")
        target = self.path_for(name)
        if target.is_file():
            current = self.verify(name)
            if current.status is not Status.CHECKSUM_MISMATCH:
                return target
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + PART_SUFFIX)
        failures: list[str] = []
        with exclusive_lock(part, name):
            for candidate in urls:
                try:
                    download(candidate, part, expected_size=entry.size, progress=progress, timeout=timeout)
                except DownloadError as error:
                    failures.append(f"{host_of(candidate)}: {error}")
                    continue
                problem = _download_problem(part, entry)
                if problem is not None:
                    part.unlink(missing_ok=True)
                    failures.append(f"{host_of(candidate)}: {problem}")
                    continue
                fsync_file(part)
                os.replace(part, target)  # atomic on one filesystem: the target is complete or absent
                if entry.sha256 is not None:
                    self._stamps.remember(target, entry.sha256)
                return target
        raise WeightsError(_failure_message(name, failures, part))


def _download_problem(part: Path, entry: WeightsEntry) -> str | None:
    """Return why the finished ``part`` is not the manifest's file, or None when it is."""
    size = part.stat().st_size
    if entry.size is not None and size != entry.size:
        return f"got {size} bytes, expected {entry.size}"
    if entry.sha256 is not None:
        digest = sha256_of(part)
        if digest != entry.sha256:
            return f"checksum mismatch: sha256 {digest}, expected {entry.sha256}"
    return None


def _failure_message(name: str, failures: list[str], part: Path) -> str:
    lines = [f"could not download {name}:"]
    lines += [f"  - {failure}" for failure in failures]
    if part.exists() and part.stat().st_size:
        lines.append(
            f"{megabytes(part.stat().st_size)} already downloaded are kept in {part}; "
            f"run `fluidsrv weights fetch {name}` again to resume."
        )
    else:
        lines.append("Nothing was left in the cache. Check the network, or pass --url with another mirror.")
    return "\n".join(lines)
