"""The wire format: REST request/response schemas, websocket messages and error codes.

This is the one place that defines what crosses the network; handlers parse with these functions and
never read raw JSON fields themselves.

Websocket ``/api/sessions/{id}/ws?token=...``:

* client → server, text JSON: ``{"type": "sliders", "seq": 7, "values": {"age": 1.5}, "commit": false}``
  (``type`` defaults to "sliders"; ``values`` is the whole slider state; ``commit: true`` records it in
  the undo history, e.g. when a slider is released); ``{"type": "undo", "seq": 8}``,
  ``{"type": "redo", "seq": 9}``, ``{"type": "ping"}``.
* server → client, binary: a frame = ``b"FS"`` + 1 byte kind (``1`` preview of the slider state with
  that ``seq``, ``2`` intermediate image of a running job) + 1 byte format (``1`` WebP, ``2`` JPEG) +
  4 bytes big-endian ``seq`` + the encoded image.
* server → client, text JSON: ``{"type": "state", ...}`` on connect, ``{"type": "progress", ...}``,
  ``{"type": "ready"}``, ``{"type": "sliders", "seq": ..., "values": ...}`` after undo/redo,
  ``{"type": "finalized", ...}``, ``{"type": "error", "code": ..., "message": ..., "seq": ...}``,
  ``{"type": "pong"}``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from fluidsrv.errors import UserError

MAX_SEQ = 2**31 - 1
MAX_SLIDERS = 256
MAX_SLIDER_NAME = 128
SLIDER_LIMIT = 100.0
FRAME_MAGIC = b"FS"
FRAME_KINDS = {"preview": 1, "progress": 2}
FRAME_FORMATS = {"webp": 1, "jpeg": 2}
_FRAME_HEADER = struct.Struct(">2sBBI")


class ApiError(UserError):
    """A refusal the client should see: HTTP status, a stable machine code and a human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, status=status, code=code)


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    """Return a 422 error for a malformed request."""
    return ApiError(422, code, message)


@dataclass(frozen=True)
class SliderMessage:
    """A slider state sent over the websocket: the newest ``seq`` wins."""

    seq: int
    values: dict[str, float]
    commit: bool = False


@dataclass(frozen=True)
class HistoryMessage:
    """Undo or redo the slider history; the answer and the new frame carry ``seq``."""

    seq: int
    action: str  # "undo" or "redo"


@dataclass(frozen=True)
class PingMessage:
    """A keep-alive; answered with a pong."""


ClientMessage = SliderMessage | HistoryMessage | PingMessage


def parse_client_message(text: str | bytes, max_bytes: int) -> ClientMessage:
    """Parse one websocket message from a client or raise ApiError describing what is wrong."""
    if len(text) > max_bytes:
        raise ApiError(413, "message_too_large", f"websocket messages are limited to {max_bytes} bytes")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"message is not valid JSON: {error}", "malformed_message") from None
    if not isinstance(data, dict):
        raise bad_request("message must be a JSON object", "malformed_message")
    kind = data.get("type", "sliders")
    if kind == "ping":
        return PingMessage()
    if kind in ("undo", "redo"):
        return HistoryMessage(seq=_parse_seq(data.get("seq")), action=kind)
    if kind != "sliders":
        raise bad_request(f"unknown message type {kind!r}", "malformed_message")
    return SliderMessage(
        seq=_parse_seq(data.get("seq")),
        values=parse_slider_values(data.get("values")),
        commit=_parse_bool(data.get("commit", False), "commit"),
    )


def parse_slider_values(raw: Any) -> dict[str, float]:
    """Validate a ``{name: value}`` slider mapping: bounded count, names and finite bounded values."""
    if not isinstance(raw, dict):
        raise bad_request('"values" must be an object of slider name to number', "malformed_message")
    if len(raw) > MAX_SLIDERS:
        raise bad_request(f"at most {MAX_SLIDERS} sliders per message", "malformed_message")
    values: dict[str, float] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_SLIDER_NAME:
            raise bad_request("slider names must be non-empty strings of at most 128 characters", "bad_slider")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(f"slider {name!r} must be a number", "bad_slider")
        number = float(value)
        if not math.isfinite(number) or abs(number) > SLIDER_LIMIT:
            raise bad_request(f"slider {name!r} must be a finite number within ±{SLIDER_LIMIT:g}", "bad_slider")
        values[name] = number
    return values


def _parse_seq(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_SEQ:
        raise bad_request(f'"seq" must be an integer in [0, {MAX_SEQ}]', "malformed_message")
    return raw


def _parse_bool(raw: Any, field_name: str) -> bool:
    if not isinstance(raw, bool):
        raise bad_request(f'"{field_name}" must be true or false', "malformed_message")
    return raw


def parse_face_choice(data: Any, face_count: int) -> int:
    """Return the face index of a ``{"index": n}`` request body."""
    if not isinstance(data, dict):
        raise bad_request('body must be a JSON object like {"index": 0}')
    index = data.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise bad_request('"index" must be an integer')
    if not 0 <= index < face_count:
        raise ApiError(422, "bad_face_index", f"face index {index} is out of range (found {face_count} faces)")
    return index


def parse_stage_switch(data: Any) -> tuple[str, str]:
    """Return (stage, plugin name) of a ``{"stage": ..., "name": ...}`` request body."""
    if not isinstance(data, dict):
        raise bad_request('body must be a JSON object like {"stage": "detector", "name": "dlib"}')
    stage, name = data.get("stage"), data.get("name")
    if not isinstance(stage, str) or not isinstance(name, str):
        raise bad_request('"stage" and "name" must be strings')
    return stage, name


@dataclass(frozen=True)
class Frame:
    """A decoded binary frame."""

    kind: str  # "preview" or "progress"
    image_format: str  # "webp" or "jpeg"
    seq: int
    image: bytes


def encode_frame(seq: int, image_bytes: bytes, image_format: str = "webp", kind: str = "preview") -> bytes:
    """Return a binary frame: magic, kind byte, format byte, big-endian seq, image bytes."""
    return _FRAME_HEADER.pack(FRAME_MAGIC, FRAME_KINDS[kind], FRAME_FORMATS[image_format], seq) + image_bytes


def decode_frame(data: bytes) -> Frame:
    """Return the parts of a binary frame (used by clients and tests)."""
    if len(data) < _FRAME_HEADER.size:
        raise ValueError("frame too short")
    magic, kind_id, format_id, seq = _FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ValueError("not a fluidsrv frame")
    kinds = {value: key for key, value in FRAME_KINDS.items()}
    formats = {value: key for key, value in FRAME_FORMATS.items()}
    return Frame(kinds[kind_id], formats[format_id], seq, data[_FRAME_HEADER.size :])


def event(kind: str, **fields: Any) -> str:
    """Return a JSON text event for the websocket."""
    return json.dumps({"type": kind, **fields}, allow_nan=False)
