"""No absolute server path in an answer: the server's own directories by label, any other path by file name.

Plugin reasons, a checkpoint's source, a direction file's provenance and error messages may name files on the
server; :func:`hide_paths` rewrites them as ``<cache>/…``, ``<weights>/…``, ``<data>/…`` or the bare file name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.requests import HTTPConnection

from fluidsrv.settings import Settings

_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\<>-])(?:/|[A-Za-z]:[\\/])[^\s'\"`;:,()<>\[\]{}]+")
"""An absolute POSIX or Windows path in a sentence (not a URL's path, nor a relative one like ``a/b``)."""


def path_labels(settings: Settings) -> list[tuple[re.Pattern[str], str]]:
    """The server's own directories (as configured and resolved), longest first, each with its public name."""
    roots = {"<cache>": settings.cache_dir, "<weights>": settings.weights_dir, "<data>": settings.data_dir}
    found: dict[str, str] = {}
    for label, root in roots.items():
        for form in (root.expanduser(), root.expanduser().resolve()):
            text = str(form).rstrip("/\\")
            if form.is_absolute() and text and text not in found:
                found[text] = label
    ordered = sorted(found.items(), key=lambda item: -len(item[0]))
    return [(re.compile(re.escape(text) + r"(?![\w-]|\.[\w.-])"), label) for text, label in ordered]


def hide_paths(value: Any, labels: list[tuple[re.Pattern[str], str]]) -> Any:
    """``value`` with each absolute path in its strings shown relative to its labelled root, else by file name."""
    if isinstance(value, str):
        for pattern, label in labels:
            value = pattern.sub(label, value)
        return _ABSOLUTE_PATH.sub(_file_name, value)
    if isinstance(value, dict):
        return {key: hide_paths(item, labels) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [hide_paths(item, labels) for item in value]
    return value


def _file_name(match: re.Match[str]) -> str:
    path = match.group(0)
    trailing = path[len(path.rstrip(".")):]  # a sentence's full stop is not part of the name
    name = Path(path.rstrip(".").replace("\\", "/")).name
    return (name or "…") + trailing


def hide_request_paths(connection: HTTPConnection, value: Any) -> Any:
    """:func:`hide_paths` with the labels of the app serving ``connection`` (a request or a websocket)."""
    return hide_paths(value, connection.app.state.path_labels)
