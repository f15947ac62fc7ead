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
from typing import Any, Literal

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
    action: Literal["undo", "redo"]


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
        return HistoryMessage(seq=_parse_seq(data.get("seq")), action="undo" if kind == "undo" else "redo")
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


# ---- REST request bodies of the on-demand directions and the latent tools ---------------------------------

MAX_SEFA_VECTORS = 32
MAX_PROMPT_CHARS = 100
MAX_MORPH_FACES = 8
MAX_VIDEO_FRAMES = 480
VIDEO_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}
MAX_LAYER_INDEX = 10_000

LayerSpec = str | tuple[int, int]
"""A ws layer range as sent: a preset name ("coarse", "middle", "fine") or [start, stop); the service resolves it
against the generator's num_ws."""


@dataclass(frozen=True)
class FaceRef:
    """A prepared session named in a tool request: its id and token."""

    session_id: str
    token: str


@dataclass(frozen=True)
class SefaRequest:
    """``POST .../directions/sefa``: the top ``k`` SeFa directions of a layer range."""

    layers: LayerSpec
    k: int = 5


@dataclass(frozen=True)
class TextRequest:
    """``POST .../directions/text``: the direction of a text prompt, optionally on a layer range."""

    prompt: str
    layers: LayerSpec | None = None


@dataclass(frozen=True)
class MixRequest:
    """``POST /api/tools/mix``: B's styles on a layer range of A, or A made ``percent`` % more like B."""

    faces: tuple[FaceRef, FaceRef]
    percent: float | None = None
    layers: LayerSpec = "coarse"


@dataclass(frozen=True)
class MorphRequest:
    """``POST /api/tools/morph``: a video through 2–8 faces."""

    faces: tuple[FaceRef, ...]
    frames_per_transition: int = 24
    loop: bool = False
    format: str = "mp4"


@dataclass(frozen=True)
class LoopRequest:
    """``POST /api/tools/loop``: a seamless "deform loop" video of one face."""

    face: FaceRef
    layers: LayerSpec | None = None
    frames: int = 48
    amplitude: float = 1.0
    seed: int = 0
    format: str = "mp4"


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


def parse_layer_spec(raw: Any) -> LayerSpec:
    """Parse ``[start, stop]`` or a preset name; the range is checked against num_ws by the service."""
    if isinstance(raw, str) and len(raw) <= 32:
        return raw
    if (
        isinstance(raw, list)
        and len(raw) == 2
        and all(isinstance(value, int) and not isinstance(value, bool) for value in raw)
        and all(0 <= value <= MAX_LAYER_INDEX for value in raw)
    ):
        return raw[0], raw[1]
    raise bad_request('"layers" must be [start, stop] (0 <= start < stop <= the generator\'s num_ws), or a preset',
                      "bad_layers")


def _bounded_int(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f'"{key}" must be an integer in [{low}, {high}]')
    return value


def _bounded_float(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f'"{key}" must be a number')
    if not low <= float(value) <= high:
        raise bad_request(f'"{key}" must be within [{low:g}, {high:g}]')
    return float(value)


def _video_type(data: dict[str, Any]) -> str:
    kind = data.get("format", "mp4")
    if kind not in VIDEO_TYPES:
        raise bad_request(f'"format" must be one of {", ".join(VIDEO_TYPES)}')
    return str(kind)


def parse_face_ref(raw: Any) -> FaceRef:
    """Parse ``{"session_id": ..., "token": ...}``."""
    keys = ("session_id", "token")
    if not isinstance(raw, dict) or not all(isinstance(raw.get(key), str) for key in keys):
        raise bad_request('each face must be {"session_id": "...", "token": "..."}', "bad_face")
    return FaceRef(raw["session_id"], raw["token"])


def parse_sefa_request(data: Any) -> SefaRequest:
    """Parse the body of ``POST .../directions/sefa``."""
    body = _object(data)
    return SefaRequest(parse_layer_spec(body.get("layers")), _bounded_int(body, "k", 5, 1, MAX_SEFA_VECTORS))


def parse_text_request(data: Any) -> TextRequest:
    """Parse the body of ``POST .../directions/text``."""
    body = _object(data)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not 0 < len(prompt.strip()) <= MAX_PROMPT_CHARS:
        raise bad_request(f'"prompt" must be a non-empty string of at most {MAX_PROMPT_CHARS} characters')
    layers = body.get("layers")
    return TextRequest(prompt.strip(), None if layers is None else parse_layer_spec(layers))


def parse_mix_request(data: Any) -> MixRequest:
    """Parse the body of ``POST /api/tools/mix``."""
    body = _object(data)
    faces = body.get("faces")
    if not isinstance(faces, list) or len(faces) != 2:
        raise bad_request('"faces" must list exactly two faces', "bad_face")
    pair = (parse_face_ref(faces[0]), parse_face_ref(faces[1]))
    if "percent" in body:
        return MixRequest(pair, percent=_bounded_float(body, "percent", 50.0, -200.0, 300.0))
    return MixRequest(pair, layers=parse_layer_spec(body.get("layers", "coarse")))


def parse_morph_request(data: Any) -> MorphRequest:
    """Parse the body of ``POST /api/tools/morph``."""
    body = _object(data)
    faces = body.get("faces")
    if not isinstance(faces, list) or not 2 <= len(faces) <= MAX_MORPH_FACES:
        raise bad_request(f'"faces" must list 2 to {MAX_MORPH_FACES} faces', "bad_face")
    per_transition = _bounded_int(body, "frames_per_transition", 24, 2, 120)
    loop = body.get("loop", False)
    if not isinstance(loop, bool):
        raise bad_request('"loop" must be true or false')
    kind = _video_type(body)
    return MorphRequest(tuple(parse_face_ref(face) for face in faces), per_transition, loop, kind)


def parse_loop_request(data: Any) -> LoopRequest:
    """Parse the body of ``POST /api/tools/loop``."""
    body = _object(data)
    face = parse_face_ref(body.get("face"))
    layers = body.get("layers")
    return LoopRequest(
        face=face,
        layers=None if layers is None else parse_layer_spec(layers),
        frames=_bounded_int(body, "frames", 48, 8, MAX_VIDEO_FRAMES),
        amplitude=_bounded_float(body, "amplitude", 1.0, 0.0, 5.0),
        seed=_bounded_int(body, "seed", 0, 0, 2**31 - 1),
        format=_video_type(body),
    )
