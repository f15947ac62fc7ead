"""The weights manager against a loopback HTTP server: checksums, atomic rename, resume, offline; and the CLI."""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fluidsrv.cli import main
from fluidsrv.manifest import Kind, WeightsError, load_manifest
from fluidsrv.weights_manager import PART_SUFFIX, Status, WeightsManager

PAYLOAD = random.Random(20240601).randbytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FILE_PATH = "/files/model.bin"


# --- a loopback file server with Range support and a mode that cuts the body ----------------------


class FixtureServer(ThreadingHTTPServer):
    """Serves ``files`` on 127.0.0.1, logs each request's Range header, can drop a body part-way."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FixtureHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_after: int | None = None  # next response sends only this many body bytes, then closes
        self.ignore_range = False  # answer 200 with the whole file even to a Range request

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"


class _FixtureHandler(BaseHTTPRequestHandler):
    server: FixtureServer

    def do_GET(self) -> None:
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if range_header and not self.server.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, range_header
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        remaining = body[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(remaining)))
        self.end_headers()
        if self.server.cut_after is not None:
            self.wfile.write(remaining[: self.server.cut_after])
            self.server.cut_after = None
            self.close_connection = True  # the connection closes with the body incomplete
            return
        self.wfile.write(remaining)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FixtureServer]:
    instance = FixtureServer()
    instance.files[FILE_PATH] = PAYLOAD
    thread = threading.Thread(target=instance.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield instance
    instance.shutdown()
    instance.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL on a port nothing listens on (as if offline)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/files/model.bin"


# --- temporary manifests ---------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    return str(value) if isinstance(value, int) else json.dumps(value)


def write_manifest(path: Path, entries: list[dict[str, Any]]) -> Path:
    """Write a manifest with these entries (defaults fill license and plugins)."""
    lines = ["schema = 1", ""]
    for entry in entries:
        full = {"license": "test licence", "plugins": ["test"], **entry}
        lines.append("[[weights]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in full.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def model_entry(url: str | list[str], sha256: str = PAYLOAD_SHA256, **extra: Any) -> dict[str, Any]:
    urls = [url] if isinstance(url, str) else url
    return {
        "name": "model",
        "file": "model.bin",
        "kind": "downloadable",
        "urls": urls,
        "size": len(PAYLOAD),
        "sha256": sha256,
        **extra,
    }


def make_manager(tmp_path: Path, entries: list[dict[str, Any]]) -> WeightsManager:
    manifest = write_manifest(tmp_path / "manifest.toml", entries)
    return WeightsManager(manifest, weights_dir=tmp_path / "embedded", cache_dir=tmp_path / "cache")


# --- fetch -----------------------------------------------------------------------------------------


def test_fetch_verifies_and_renames_into_place(tmp_path: Path, server: FixtureServer) -> None:
    manager = make_manager(tmp_path, [model_entry(server.url(FILE_PATH))])
    target = tmp_path / "cache" / "model.bin"
    part = target.with_name(target.name + PART_SUFFIX)
    seen: list[tuple[int, int | None]] = []

    def progress(done: int, total: int | None) -> None:
        seen.append((done, total))
        if done:  # mid-download the bytes are in .part, never under the final name
            assert part.is_file() and not target.exists()

    path = manager.fetch("model", progress=progress)

    assert path == target
    assert target.read_bytes() == PAYLOAD
    assert not part.exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert server.requests == [(FILE_PATH, None)]
    assert manager.status_of("model").status is Status.VERIFIED  # remembered, no re-hash needed


def test_fetch_checksum_mismatch_leaves_nothing_in_cache(tmp_path: Path, server: FixtureServer) -> None:
    wrong = hashlib.sha256(b"another file").hexdigest()
    manager = make_manager(tmp_path, [model_entry(server.url(FILE_PATH), sha256=wrong)])

    with pytest.raises(WeightsError, match="checksum mismatch") as raised:
        manager.fetch("model")

    assert PAYLOAD_SHA256 in str(raised.value) and wrong in str(raised.value)
    assert list((tmp_path / "cache").iterdir()) == []
    assert manager.status_of("model").status is Status.MISSING


def test_interrupted_download_resumes_from_part(tmp_path: Path, server: FixtureServer) -> None:
    manager = make_manager(tmp_path, [model_entry(server.url(FILE_PATH))])
    part = tmp_path / "cache" / ("model.bin" + PART_SUFFIX)
    server.cut_after = 100_000

    with pytest.raises(WeightsError, match="again to resume"):
        manager.fetch("model")
    assert part.stat().st_size == 100_000
    assert not (tmp_path / "cache" / "model.bin").exists()

    path = manager.fetch("model")

    assert server.requests == [(FILE_PATH, None), (FILE_PATH, "bytes=100000-")]
    assert path.read_bytes() == PAYLOAD
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, server: FixtureServer) -> None:
    manager = make_manager(tmp_path, [model_entry(server.url(FILE_PATH))])
    part = tmp_path / "cache" / ("model.bin" + PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 5000)  # stale bytes a Range-less answer must replace, not follow
    server.ignore_range = True

    path = manager.fetch("model")

    assert server.requests == [(FILE_PATH, "bytes=5000-")]
    assert path.read_bytes() == PAYLOAD


def test_fetch_falls_back_to_the_next_mirror(tmp_path: Path, server: FixtureServer) -> None:
    manager = make_manager(tmp_path, [model_entry([server.url("/missing.bin"), server.url(FILE_PATH)])])

    assert manager.fetch("model").read_bytes() == PAYLOAD
    assert [path for path, _ in server.requests] == ["/missing.bin", FILE_PATH]


def test_offline_gives_a_clear_error(tmp_path: Path, closed_port_url: str) -> None:
    manager = make_manager(tmp_path, [model_entry(closed_port_url)])

    with pytest.raises(WeightsError, match="offline") as raised:
        manager.fetch("model")

    assert "could not download model" in str(raised.value)
    assert not (tmp_path / "cache" / "model.bin").exists()


def test_fetch_keeps_a_verified_file_without_downloading(tmp_path: Path, server: FixtureServer) -> None:
    manager = make_manager(tmp_path, [model_entry(server.url(FILE_PATH))])
    cached = tmp_path / "cache" / "model.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)

    assert manager.fetch("model") == cached
    assert server.requests == []


def test_embedded_models_are_not_fetched_and_live_in_weights_dir(tmp_path: Path) -> None:
    manager = make_manager(
        tmp_path,
        [
            {"name": "ours", "file": "ours.safetensors", "kind": "embedded"},
            model_entry("http://127.0.0.1:9/model.bin"),
        ],
    )

    assert manager.path_for("ours") == tmp_path / "embedded" / "ours.safetensors"
    assert manager.path_for("model") == tmp_path / "cache" / "model.bin"
    assert "fluidsrv weights fetch model" in (manager.missing_reason("model") or "")
    with pytest.raises(WeightsError, match="embedded"):
        manager.fetch("ours")
    with pytest.raises(WeightsError, match="Did you mean ours"):
        manager.path_for("our")


# --- manifest --------------------------------------------------------------------------------------


def test_repository_manifest_lists_the_checkpoints() -> None:
    entries = load_manifest()

    expected = {
        "generator-128": ("generator-128.safetensors", Kind.EMBEDDED),
        "encoder-128": ("encoder-128.safetensors", Kind.EMBEDDED),
        "stylegan2-ffhq-1024": ("stylegan2-ffhq-config-f.pt", Kind.DOWNLOADABLE),
        "e4e-ffhq": ("e4e_ffhq_encode.pt", Kind.DOWNLOADABLE),
        "bisenet-faceparsing": ("79999_iter.pth", Kind.DOWNLOADABLE),
    }
    for name, (file_name, kind) in expected.items():
        assert (entries[name].file, entries[name].kind) == (file_name, kind)
    for entry in entries.values():
        assert entry.license and entry.plugins, entry.name
        if entry.kind is Kind.EMBEDDED:
            assert entry.urls == ()
        else:
            assert entry.urls and all(url.startswith("https://") for url in entry.urls), entry.name
        if entry.kind is Kind.DOWNLOADABLE:  # the core checkpoints are pinned by size and digest
            assert entry.size is not None and entry.sha256 is not None and entry.checksum_source, entry.name
    plugin_files = {entry.plugins[0] for entry in entries.values() if entry.kind is Kind.USER_PROVIDED}
    assert {"yunet", "insightface", "lama", "clip"} <= plugin_files


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "ABC"}, "sha256"),
        ({"kind": "borrowed"}, "kind"),
        ({"file": "../escape.bin"}, "bare file name"),
        ({"urls": ["ftp://example.org/model.bin"]}, "http"),
        ({"colour": "blue"}, "unknown field"),
    ],
)
def test_malformed_manifest_entries_are_named(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    manifest = write_manifest(tmp_path / "manifest.toml", [{**model_entry("https://example.org/m.bin"), **change}])

    with pytest.raises(WeightsError, match=message):
        load_manifest(manifest)


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    entry = model_entry("https://example.org/m.bin")
    manifest = write_manifest(tmp_path / "manifest.toml", [entry, entry])

    with pytest.raises(WeightsError, match="appears twice"):
        load_manifest(manifest)


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def cli_setup(tmp_path: Path) -> list[str]:
    """A manifest with an embedded file present, a good, a corrupt and a missing download; the CLI flags."""
    embedded, cache = tmp_path / "embedded", tmp_path / "cache"
    embedded.mkdir()
    cache.mkdir()
    (embedded / "ours.safetensors").write_bytes(b"embedded model")
    (cache / "good.bin").write_bytes(PAYLOAD)
    (cache / "bad.bin").write_bytes(bytes(len(PAYLOAD)))  # right size, wrong content
    url = "https://example.org/model.bin"
    write_manifest(
        tmp_path / "manifest.toml",
        [
            {"name": "ours", "file": "ours.safetensors", "kind": "embedded"},
            model_entry(url, name="good", file="good.bin", plugins=["e4e"]),
            model_entry(url, name="bad", file="bad.bin"),
            model_entry(url, name="absent", file="absent.bin", kind="user-provided"),
        ],
    )
    manifest = str(tmp_path / "manifest.toml")
    return ["weights", "--manifest", manifest, "--cache-dir", str(cache), "--weights-dir", str(embedded)]


def _table(output: str) -> dict[str, list[str]]:
    rows = [re.split(r"\s{2,}", line.strip()) for line in output.splitlines() if line.strip()]
    return {row[0]: row for row in rows[1:] if len(row) >= 4}


def test_cli_list_shows_status_of_every_entry(cli_setup: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*cli_setup, "list", "--check"]) == 0
    table = _table(capsys.readouterr().out)

    assert table["ours"][1:3] == ["embedded", "present (unverified)"]
    assert table["good"][1:] == ["downloadable", "verified", "300.0 kB", "e4e"]
    assert table["bad"][2] == "checksum-mismatch"
    assert table["absent"][1:3] == ["user-provided", "missing"]


def test_cli_verify_reports_mismatch_with_exit_status(cli_setup: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*cli_setup, "verify", "good"]) == 0
    assert capsys.readouterr().out.strip() == "good: verified"

    assert main([*cli_setup, "verify"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "good: verified" in lines
    assert any(line.startswith("bad: checksum-mismatch") for line in lines)
    assert any(line.startswith("ours: present (unverified") for line in lines)

    assert main([*cli_setup, "verify", "absent"]) == 1


def test_cli_fetch_with_url_override(
    cli_setup: list[str], server: FixtureServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*cli_setup, "fetch", "absent", "--url", server.url(FILE_PATH)]) == 0

    assert (tmp_path / "cache" / "absent.bin").read_bytes() == PAYLOAD
    assert "absent: verified" in capsys.readouterr().out


def test_cli_errors_have_no_traceback(
    cli_setup: list[str], closed_port_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*cli_setup, "fetch", "absent", "--url", closed_port_url]) == 2
    err = capsys.readouterr().err
    assert "fluidsrv: error: could not download absent" in err
    assert "Traceback" not in err

    assert main([*cli_setup, "fetch", "nonesuch"]) == 2
    assert "no weights called 'nonesuch'" in capsys.readouterr().err
