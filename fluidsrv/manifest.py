"""The weights manifest (``weights/manifest.toml``): its entries and how they are read and checked.

The manifest lists our embedded models and the public checkpoints plugins can use. Embedded files live in
the repository's ``weights/``; everything else lives in the user's cache (``~/.cache/fluidsrv`` or
``$FLUIDSRV_CACHE``). :class:`fluidsrv.weights_manager.WeightsManager` finds, checks and downloads them.
"""

from __future__ import annotations

import re
import tomllib
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR

MANIFEST_PATH = EMBEDDED_WEIGHTS_DIR / "manifest.toml"
MANIFEST_SCHEMA = 1

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
_KNOWN_FIELDS = frozenset(
    {
        "name", "file", "kind", "description", "urls", "size", "sha256",
        "license", "plugins", "source", "checksum_source", "notes",
    }
)  # fmt: skip


class WeightsError(Exception):
    """A user-facing weights problem (unknown name, bad manifest, failed download, wrong checksum)."""


class Kind(StrEnum):
    """Where a weights file comes from."""

    EMBEDDED = "embedded"  # ships in the repository's weights/
    DOWNLOADABLE = "downloadable"  # a public checkpoint `fluidsrv weights fetch` downloads
    USER_PROVIDED = "user-provided"  # an optional plugin file the user brings (or fetches explicitly)


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
    unknown = sorted(set(raw) - _KNOWN_FIELDS)
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
