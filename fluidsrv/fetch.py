"""Resumable HTTP download of one file into a ``.part`` file, standard library only.

The body goes to ``<file>.part``, continued with an HTTP Range request after an interruption; the caller
checks the finished part and renames it into place, so a file under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from fluidsrv.manifest import WeightsError
from fluidsrv.progress_bar import ProgressCallback, megabytes

USER_AGENT = "fluidsrv-weights/0.1 (python-urllib)"
CHUNK_BYTES = 1024 * 1024  # bytes read from the response at a time


class DownloadError(Exception):
    """One URL could not deliver the file (network, HTTP status, truncated body)."""


def download(
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
            return download(url, part, expected_size=expected_size, progress=progress, timeout=timeout)
        raise DownloadError(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(_network_reason(error.reason)) from None
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(_network_reason(error)) from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header and sends the whole file
        elif offset and not _content_range_starts_at(response.headers.get("Content-Range", ""), offset):
            raise DownloadError("the server answered the resume request with the wrong byte range")
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html"):
            raise DownloadError("the server sent a web page instead of the file (a login or warning page?)")
        length = response.headers.get("Content-Length")
        body_size = int(length) if length is not None and length.isdigit() else None
        total = offset + body_size if body_size is not None else expected_size
        _copy_body(response, part, offset=offset, total=total, progress=progress)


def host_of(url: str) -> str:
    """Return the host part of ``url`` (the whole URL when it has none), to name a mirror in messages."""
    return urllib.parse.urlsplit(url).netloc or url


def fsync_file(path: Path) -> None:
    """Flush ``path``'s contents to the disk before it is renamed into place."""
    with path.open("rb+") as stream:
        os.fsync(stream.fileno())


@contextlib.contextmanager
def exclusive_lock(part: Path, name: str) -> Iterator[None]:
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
                raise DownloadError(f"the connection broke after {megabytes(done)}: {_network_reason(error)}") from None
            if not chunk:
                break
            sink.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    if total is not None and done < total:
        raise DownloadError(f"the connection closed after {megabytes(done)} of {megabytes(total)}")


def _content_range_starts_at(content_range: str, offset: int) -> bool:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return match is not None and int(match.group(1)) == offset


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
