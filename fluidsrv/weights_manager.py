"""The weights manifest, where each file lives, and how to check and download it.

The manifest (``weights/manifest.toml``) lists our embedded models and the public checkpoints plugins
can use. Embedded files live in the repository's ``weights/``; everything else lives in the user's cache
(``~/.cache/fluidsrv`` or ``$FLUIDSRV_CACHE``). Plugins find a file with :meth:`WeightsManager.path_for`
and explain a missing one with :meth:`WeightsManager.missing_reason`.

Downloads use only the standard library: the body goes to ``<file>.part`` (continued with an HTTP Range
request after an interruption), its sha256 is checked, and only then is it renamed into place, so a
file under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Protocol

from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR, default_cache_dir

MANIFEST_PATH = EMBEDDED_WEIGHTS_DIR / "manifest.toml"
MANIFEST_SCHEMA = 1
PART_SUFFIX = ".part"
STAMPS_FILE = ".verified.json"  # in the cache dir: digests already checked, keyed by path, size and mtime
CHUNK_BYTES = 1024 * 1024
USER_AGENT = "fluidsrv-weights/0.1 (python-urllib)"

ProgressCallback = Callable[[int, int | None], None]
"""Called as ``progress(bytes_done, bytes_total_or_None)`` while a file downloads."""

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")


class WeightsError(Exception):
    """A user-facing weights problem (unknown name, bad manifest, failed download, wrong checksum)."""


class Kind(StrEnum):
    """Where a weights file comes from."""

    EMBEDDED = "embedded"  # ships in the repository's weights/
    DOWNLOADABLE = "downloadable"  # a public checkpoint `fluidsrv weights fetch` downloads
    USER_PROVIDED = "user-provided"  # an optional plugin file the user brings (or fetches explicitly)


class Status(StrEnum):
    """What is known about a file on disk."""

    MISSING = "missing"
    PRESENT = "present"  # on disk, digest not checked (or none published)
    VERIFIED = "verified"  # on disk, sha256 equals the manifest's
    CHECKSUM_MISMATCH = "checksum-mismatch"  # on disk, size or sha256 differs from the manifest's


@dataclass(frozen=True)
class WeightsEntry:
    """One manifest entry: a weights file, where to get it and how to check it."""

    name: str
    file: str
    kind: Kind
    description: str
    urls: tuple[str, ...]
    size: int | None  # exact bytes, None when unpublished
    sha256: str | None  # lowercase hex, None when unpublished ("unverified")
    license: str
    plugins: tuple[str, ...]
    source: str = ""
    checksum_source: str = ""
    notes: str = ""

    @property
    def has_checksum(self) -> bool:
        """Whether the manifest carries a published sha256 for this file."""
        return self.sha256 is not None


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


# --- manifest --------------------------------------------------------------------------------------


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, WeightsEntry]:
    """Return the manifest's entries by name; raise :class:`WeightsError` naming what is malformed."""
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError as error:
        raise WeightsError(f"weights manifest {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise WeightsError(f"weights manifest {path} is not valid TOML: {error}") from error
    schema = document.get("schema", MANIFEST_SCHEMA)
    if schema != MANIFEST_SCHEMA:
        raise WeightsError(f"weights manifest {path} has schema {schema!r}; this fluidsrv reads {MANIFEST_SCHEMA}")
    raw_entries = document.get("weights", [])
    if not isinstance(raw_entries, list):
        raise WeightsError(f"weights manifest {path}: `weights` must be an array of tables ([[weights]])")
    entries: dict[str, WeightsEntry] = {}
    for index, raw in enumerate(raw_entries):
        entry = _parse_entry(raw, where=f"{path} entry {index + 1}")
        if entry.name in entries:
            raise WeightsError(f"weights manifest {path}: the name {entry.name!r} appears twice")
        entries[entry.name] = entry
    return entries


def _parse_entry(raw: Any, where: str) -> WeightsEntry:
    if not isinstance(raw, dict):
        raise WeightsError(f"{where}: expected a table")
    known = {
        "name", "file", "kind", "description", "urls", "size", "sha256",
        "license", "plugins", "source", "checksum_source", "notes",
    }  # fmt: skip
    unknown = sorted(set(raw) - known)
    if unknown:
        raise WeightsError(f"{where}: unknown field(s) {', '.join(unknown)}")
    for required in ("name", "file", "kind", "license"):
        if not isinstance(raw.get(required), str) or not raw[required]:
            raise WeightsError(f"{where}: `{required}` must be a non-empty string")
    name = raw["name"]
    where = f"{where} ({name})"
    if not _NAME_PATTERN.fullmatch(name):
        raise WeightsError(f"{where}: names use lowercase letters, digits, '.', '_' and '-'")
    file_name = raw["file"]
    if Path(file_name).name != file_name or file_name in (".", ".."):
        raise WeightsError(f"{where}: `file` must be a bare file name, not a path")
    try:
        kind = Kind(raw["kind"])
    except ValueError as error:
        choices = ", ".join(kind.value for kind in Kind)
        raise WeightsError(f"{where}: `kind` must be one of {choices}") from error
    urls = tuple(_string_list(raw.get("urls", []), where, "urls"))
    for url in urls:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise WeightsError(f"{where}: {url!r} is not an http(s) URL")
    if kind is Kind.DOWNLOADABLE and not urls:
        raise WeightsError(f"{where}: a downloadable entry needs at least one URL")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise WeightsError(f"{where}: `size` must be a positive integer (bytes) or left out")
    sha256 = raw.get("sha256", "")
    if not isinstance(sha256, str) or (sha256 and not _SHA256_PATTERN.fullmatch(sha256)):
        raise WeightsError(f'{where}: `sha256` must be 64 lowercase hex digits, or "" when unverified')
    text_fields = {}
    for optional in ("description", "source", "checksum_source", "notes"):
        value = raw.get(optional, "")
        if not isinstance(value, str):
            raise WeightsError(f"{where}: `{optional}` must be a string")
        text_fields[optional] = value
    return WeightsEntry(
        name=name,
        file=file_name,
        kind=kind,
        urls=urls,
        size=size,
        sha256=sha256 or None,
        license=raw["license"],
        plugins=tuple(_string_list(raw.get("plugins", []), where, "plugins")),
        **text_fields,
    )


def _string_list(value: Any, where: str, field_name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise WeightsError(f"{where}: `{field_name}` must be a list of non-empty strings")
    return value


# --- the manager -----------------------------------------------------------------------------------


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
        remembered = self._remembered_digest(path)
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
            self._forget_digest(path)
            return EntryStatus(
                entry,
                path,
                Status.CHECKSUM_MISMATCH,
                f"sha256 is {digest}, the manifest says {entry.sha256}",
                actual_sha256=digest,
            )
        self._remember_digest(path, digest)
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
        with _exclusive_lock(part, name):
            for candidate in urls:
                try:
                    _download(candidate, part, expected_size=entry.size, progress=progress, timeout=timeout)
                except _DownloadError as error:
                    failures.append(f"{_host(candidate)}: {error}")
                    continue
                problem = _check_download(part, entry)
                if problem is not None:
                    part.unlink(missing_ok=True)
                    failures.append(f"{_host(candidate)}: {problem}")
                    continue
                _fsync(part)
                os.replace(part, target)  # atomic on one filesystem: the target is complete or absent
                if entry.sha256 is not None:
                    self._remember_digest(target, entry.sha256)
                return target
        raise WeightsError(_failure_message(name, failures, part))

    # -- remembered digests (so `list` can say "verified" without hashing gigabytes) --

    def _stamps_path(self) -> Path:
        return self.cache_dir / STAMPS_FILE

    def _read_stamps(self) -> dict[str, Any]:
        try:
            stamps = json.loads(self._stamps_path().read_text())
        except (OSError, ValueError):
            return {}
        return stamps if isinstance(stamps, dict) else {}

    def _write_stamps(self, stamps: dict[str, Any]) -> None:
        path = self._stamps_path()
        with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash later
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            scratch.write_text(json.dumps(stamps, indent=1, sort_keys=True))
            os.replace(scratch, path)

    def _remembered_digest(self, path: Path) -> str | None:
        stamp = self._read_stamps().get(str(path.resolve()))
        if not isinstance(stamp, dict):
            return None
        info = path.stat()
        if stamp.get("size") != info.st_size or stamp.get("mtime_ns") != info.st_mtime_ns:
            return None
        digest = stamp.get("sha256")
        return digest if isinstance(digest, str) else None

    def _remember_digest(self, path: Path, digest: str) -> None:
        info = path.stat()
        stamps = self._read_stamps()
        stamps[str(path.resolve())] = {"sha256": digest, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
        self._write_stamps(stamps)

    def _forget_digest(self, path: Path) -> None:
        stamps = self._read_stamps()
        if stamps.pop(str(path.resolve()), None) is not None:
            self._write_stamps(stamps)


def sha256_of(path: Path) -> str:
    """Return the lowercase hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --- HTTP, standard library only -------------------------------------------------------------------


class _DownloadError(Exception):
    """One URL could not deliver the file (network, HTTP status, truncated body)."""


def _download(
    url: str, part: Path, *, expected_size: int | None, progress: ProgressCallback | None, timeout: float
) -> None:
    """Bring ``part`` to the full file from ``url``, continuing from its current length when it exists."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the real file: it cannot be a prefix of it
        offset = 0
    if expected_size is not None and offset == expected_size:
        return  # complete already (e.g. interrupted just before the rename); the checksum decides
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            part.unlink()  # the server will not continue this .part: start again from zero
            return _download(url, part, expected_size=expected_size, progress=progress, timeout=timeout)
        raise _DownloadError(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise _DownloadError(_network_reason(error.reason)) from None
    except (OSError, http.client.HTTPException) as error:
        raise _DownloadError(_network_reason(error)) from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header and sends the whole file
        elif offset and not _content_range_starts_at(response.headers.get("Content-Range", ""), offset):
            raise _DownloadError("the server answered the resume request with the wrong byte range")
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html"):
            raise _DownloadError("the server sent a web page instead of the file (a login or warning page?)")
        length = response.headers.get("Content-Length")
        body_size = int(length) if length is not None and length.isdigit() else None
        total = offset + body_size if body_size is not None else expected_size
        _copy_body(response, part, offset=offset, total=total, progress=progress)


def _copy_body(
    response: IO[bytes], part: Path, *, offset: int, total: int | None, progress: ProgressCallback | None
) -> None:
    """Append the response body to ``part`` (or rewrite it when ``offset`` is 0), reporting progress."""
    done = offset
    mode = "ab" if offset else "wb"
    with part.open(mode) as sink:
        if progress is not None:
            progress(done, total)
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as error:
                raise _DownloadError(
                    f"the connection broke after {_megabytes(done)}: {_network_reason(error)}"
                ) from None
            if not chunk:
                break
            sink.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    if total is not None and done < total:
        raise _DownloadError(f"the connection closed after {_megabytes(done)} of {_megabytes(total)}")


def _content_range_starts_at(content_range: str, offset: int) -> bool:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return match is not None and int(match.group(1)) == offset


def _check_download(part: Path, entry: WeightsEntry) -> str | None:
    """Return why the finished ``part`` is not the manifest's file, or None when it is."""
    size = part.stat().st_size
    if entry.size is not None and size != entry.size:
        return f"got {size} bytes, expected {entry.size}"
    if entry.sha256 is not None:
        digest = sha256_of(part)
        if digest != entry.sha256:
            return f"checksum mismatch: sha256 {digest}, expected {entry.sha256}"
    return None


def _network_reason(reason: object) -> str:
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror}); is this machine offline?"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused; is this machine offline, or the server down?"
    if isinstance(reason, TimeoutError):
        return "timed out; is this machine offline?"
    if isinstance(reason, OSError) and reason.strerror:
        return f"{reason.strerror}; is this machine offline?"
    return str(reason) or type(reason).__name__


def _failure_message(name: str, failures: list[str], part: Path) -> str:
    lines = [f"could not download {name}:"]
    lines += [f"  - {failure}" for failure in failures]
    if part.exists() and part.stat().st_size:
        lines.append(
            f"{_megabytes(part.stat().st_size)} already downloaded are kept in {part}; "
            f"run `fluidsrv weights fetch {name}` again to resume."
        )
    else:
        lines.append("Nothing was left in the cache. Check the network, or pass --url with another mirror.")
    return "\n".join(lines)


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _fsync(path: Path) -> None:
    with path.open("rb+") as stream:
        os.fsync(stream.fileno())


@contextlib.contextmanager
def _exclusive_lock(part: Path, name: str) -> Iterator[None]:
    """Hold a lock beside ``part`` so two fetches of one file never write the same ``.part``."""
    lock_path = part.with_name(part.name + ".lock")
    with lock_path.open("a") as lock_file:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the checksum still guards the result
            yield
            return
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WeightsError(f"another `fluidsrv weights fetch {name}` is running") from None
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
            lock_path.unlink(missing_ok=True)


# --- a progress bar on stderr ----------------------------------------------------------------------


class ProgressBar:
    """A one-line download progress bar (redrawn at most ten times a second) for a terminal stream."""

    def __init__(self, label: str, stream: IO[str] | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._first_done: int | None = None
        self._last_draw = 0.0
        self._last_line = ""

    def __call__(self, done: int, total: int | None) -> None:
        """Record progress; redraw when due (every call's state is kept for :meth:`close`)."""
        if self._first_done is None:
            self._first_done = done
        self._last_line = self._render(done, total)
        now = time.monotonic()
        if self.interactive and (now - self._last_draw >= 0.1 or (total is not None and done >= total)):
            self._last_draw = now
            self.stream.write("\r" + self._last_line)
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line (a non-terminal stream gets the final state once)."""
        if not self._last_line:
            return
        self.stream.write(("\r" if self.interactive else "") + self._last_line + "\n")
        self.stream.flush()

    def _render(self, done: int, total: int | None) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = (done - (self._first_done or 0)) / elapsed
        speed = f"{rate / 1e6:.1f} MB/s"
        if total:
            fraction = min(done / total, 1.0)
            filled = int(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            return f"{self.label} [{bar}] {fraction:4.0%} {_megabytes(done)}/{_megabytes(total)} {speed}"
        return f"{self.label} {_megabytes(done)} {speed}"


def human_size(size: int | None) -> str:
    """Return a short size such as ``381.5 MB`` (``?`` when unknown)."""
    if size is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
