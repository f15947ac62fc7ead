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
* server → client, text JSON: ``{"type": "state", ...}`` on connect, ``{"type": "progress", ...}`` (with
  ``"queued": N`` while a prepare waits in line), ``{"type": "ready"}``, ``{"type": "saved", "seq": ...}``
  once a committed state is on disk, ``{"type": "sliders", "seq": ..., "values": ...}`` after undo/redo,
  ``{"type": "finalized", ...}``, ``{"type": "error", "code": ..., "message": ..., "seq": ...}``,
  ``{"type": "pong"}``, ``{"type": "identity", "distance": ..., "threshold": ..., "same_person": ..., "embedder":
  ..., "source": "preview" | "final", "values": ...}`` (the identity meter's reading of a slider state).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from fluidsrv import wire_responses as responses  # noqa: F401 (the answers' shapes; the web reads them from here)
from fluidsrv.errors import UserError
from fluidsrv.wire_fields import Boolean, Choice, Either, Integer, IntegerPair, ListOf, MapOf, Number, Shape, Text

MAX_SEQ = 2**31 - 1
MAX_SLIDERS = 256
MAX_SLIDER_NAME = 128
MAX_NAME_CHARS = 64
SLIDER_LIMIT = 100.0
FRAME_MAGIC = b"FS"
FRAME_KINDS = {"preview": 1, "progress": 2}
FRAME_FORMATS = {"webp": 1, "jpeg": 2}
_FRAME_HEADER = struct.Struct(">2sBBI")
FRAME_HEADER_BYTES = _FRAME_HEADER.size

SEQ = Integer(0, MAX_SEQ, description="the client's counter: the answers and the preview frame of this state carry it")
SLIDER_NAME = Text(MAX_SLIDER_NAME, min_chars=1)
SLIDER_VALUES = MapOf(SLIDER_NAME, Number(-SLIDER_LIMIT, SLIDER_LIMIT), MAX_SLIDERS,
                      description="the whole slider state: slider name → value")


class ApiError(UserError):
    """A refusal the client should see: HTTP status, a stable machine code and a human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, status=status, code=code)


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    """Return a 422 error for a malformed request."""
    return ApiError(422, code, message)


# ---- reading untrusted JSON ------------------------------------------------------------------------------------

MAX_JSON_DEPTH = 32
"""Arrays and objects nested deeper than this are refused before parsing (the parser recurses per level)."""
MAX_INT_DIGITS = 30
MAX_FLOAT_CHARS = 64
MAX_ECHO_CHARS = 40
"""How much of a client's value an error message repeats."""

# a JSON string, escapes included; possessive and never failing once it starts (an unterminated string runs to
# the end), so removing the strings is one linear pass
_STRINGS = re.compile(r'"(?:[^"\\]|\\[\s\S]?)*+"?')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_MAYBE_SURROGATE = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def json_depth(text: str) -> int:
    """Return the deepest nesting of arrays and objects in JSON text, ignoring strings (linear time)."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(itertools.accumulate(1 if char in "[{" else -1 for char in brackets), default=0)


def parse_json(raw: str | bytes, code: str = "bad_json") -> Any:
    """Parse untrusted JSON, raising only ApiError (422): ``code`` for bad syntax, else a code saying why.

    Refused: nesting deeper than MAX_JSON_DEPTH (``too_deep``), integers of more than MAX_INT_DIGITS digits,
    float literals of more than MAX_FLOAT_CHARS characters, floats that overflow and NaN/Infinity
    (``bad_number``), lone surrogates (``bad_string``), repeated keys in an object (``duplicate_key``).
    """
    text = _json_text(raw, code)
    if json_depth(text) > MAX_JSON_DEPTH:
        raise bad_request(f"JSON may nest arrays and objects at most {MAX_JSON_DEPTH} deep", "too_deep")
    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant,
                          object_pairs_hook=_unique_keys)
    except RecursionError:  # unreachable after json_depth; kept so that no input can escape as a 500
        raise bad_request("JSON nests too deep", "too_deep") from None
    except ValueError as error:
        raise bad_request(f"not valid JSON: {error}", code) from None
    if _MAYBE_SURROGATE.search(text):
        refuse_lone_surrogates(data)
    return data


def _json_text(raw: str | bytes, code: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode(json.detect_encoding(raw))
    except (UnicodeDecodeError, LookupError):
        raise bad_request("JSON must be UTF-8 text", code) from None


def _parse_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise bad_request(f"integers may have at most {MAX_INT_DIGITS} digits", "bad_number")
    return int(literal)


def _parse_float(literal: str) -> float:
    value = float(literal) if len(literal) <= MAX_FLOAT_CHARS else math.nan
    if not math.isfinite(value):
        raise bad_request(f"numbers must be finite and at most {MAX_FLOAT_CHARS} characters long", "bad_number")
    return value


def _refuse_constant(name: str) -> NoReturn:
    raise bad_request(f"{name} is not a JSON number", "bad_number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise bad_request("an object names the same key twice", "duplicate_key")
    return data


def refuse_lone_surrogates(data: Any) -> None:
    """Raise ApiError (``bad_string``) if any string in parsed JSON holds a lone UTF-16 surrogate."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str) and _SURROGATE.search(item):
            raise bad_request("strings must be valid Unicode (no lone surrogates)", "bad_string")
        if isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def echo(value: Any) -> str:
    """Return a short printable form of a client's value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**MAX_ECHO_CHARS:
        return "a very large integer"
    text = repr(value) if isinstance(value, str | int | float | bool) or value is None else f"a {type(value).__name__}"
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 1] + "…"


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
    if _byte_size(text, max_bytes) > max_bytes:
        raise ApiError(413, "message_too_large", f"websocket messages are limited to {max_bytes} bytes")
    data = parse_json(text, "malformed_message")
    if not isinstance(data, dict):
        raise bad_request("message must be a JSON object", "malformed_message")
    kind = data.get("type", "sliders")
    if kind == "ping":
        return PingMessage()
    if kind == "undo" or kind == "redo":
        return HistoryMessage(seq=_parse_seq(data.get("seq")), action="undo" if kind == "undo" else "redo")
    if kind != "sliders":
        raise bad_request(f"unknown message type {echo(kind)}", "malformed_message")
    return SliderMessage(
        seq=_parse_seq(data.get("seq")),
        values=parse_slider_values(data.get("values")),
        commit=_parse_bool(data.get("commit", False), "commit"),
    )


def _byte_size(text: str | bytes, max_bytes: int) -> int:
    """Return the UTF-8 size of ``text`` (or more than ``max_bytes`` without encoding a string that long)."""
    if isinstance(text, bytes) or len(text) > max_bytes:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def parse_slider_values(raw: Any) -> dict[str, float]:
    """Validate a ``{name: value}`` slider mapping: bounded count, names and finite bounded values."""
    if not isinstance(raw, dict):
        raise bad_request('"values" must be an object of slider name to number', "malformed_message")
    if len(raw) > MAX_SLIDERS:
        raise bad_request(f"at most {MAX_SLIDERS} sliders per message", "malformed_message")
    values: dict[str, float] = {}
    for name, value in raw.items():
        if SLIDER_VALUES.key.check(name) is None:
            raise bad_request(f"slider names must be non-empty strings of at most {MAX_SLIDER_NAME} characters",
                              "bad_slider")
        number = SLIDER_VALUES.value.check(value)
        if number is None:
            raise bad_request(f"slider {echo(name)} must be a finite number within ±{SLIDER_LIMIT:g}", "bad_slider")
        values[name] = number
    return values


def _parse_seq(raw: Any) -> int:
    seq = SEQ.check(raw)
    if seq is None:
        raise bad_request(f'"seq" must be an integer in [0, {MAX_SEQ}]', "malformed_message")
    return seq


def _parse_bool(raw: Any, field_name: str) -> bool:
    if not isinstance(raw, bool):
        raise bad_request(f'"{field_name}" must be true or false', "malformed_message")
    return raw


SLIDERS_MESSAGE = Shape({"type": Choice(("sliders",), default="sliders"), "seq": SEQ, "values": SLIDER_VALUES,
                         "commit": Boolean(False, "record this state in the undo history (a slider was released)")},
                        required=("seq", "values"), title="sliders")
HISTORY_MESSAGE = Shape({"type": Choice(("undo", "redo")), "seq": SEQ}, required=("type", "seq"), title="history")
PING_MESSAGE = Shape({"type": Choice(("ping",))}, required=("type",), title="ping")
CLIENT_MESSAGES = {"sliders": SLIDERS_MESSAGE, "history": HISTORY_MESSAGE, "ping": PING_MESSAGE}
"""The client's websocket messages, as :func:`parse_client_message` reads them (described in the AsyncAPI document)."""

FACE_INDEX = Integer(0, description="the face's index in the session's faces (numbered left to right)")
FACE_CHOICE = Shape({"index": FACE_INDEX}, required=("index",), title="FaceChoice")
STAGE_NAME = Text(MAX_NAME_CHARS)
STAGE_SWITCH = Shape({"stage": STAGE_NAME, "name": STAGE_NAME}, required=("stage", "name"), title="StageSwitch")


def parse_face_choice(data: Any, face_count: int) -> int:
    """Return the face index of a ``{"index": n}`` request body."""
    if not isinstance(data, dict):
        raise bad_request('body must be a JSON object like {"index": 0}')
    index = data.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise bad_request('"index" must be an integer')
    if not FACE_INDEX.low <= index < face_count:
        raise ApiError(422, "bad_face_index", f"face index {echo(index)} is out of range (found {face_count} faces)")
    return index


FACE_QUERY = Integer(0, 999_999, description="edit only this face (numbered left to right); absent: every face")


def parse_face_query(raw: str | None) -> int | None:
    """Return the face index of a ``?face=N`` query parameter (None when absent: every face)."""
    if raw is None or raw == "":
        return None
    index = FACE_QUERY.check(int(raw)) if raw.isascii() and raw.isdigit() and len(raw) <= MAX_INT_DIGITS else None
    if index is None:  # (isdigit alone passes "²", which int() refuses)
        raise bad_request(f'"face" must be a face index (0, 1, ...), got {echo(raw)}', "bad_face_index")
    return index


def parse_stage_switch(data: Any) -> tuple[str, str]:
    """Return (stage, plugin name) of a ``{"stage": ..., "name": ...}`` request body."""
    if not isinstance(data, dict):
        raise bad_request('body must be a JSON object like {"stage": "detector", "name": "dlib"}')
    stage, name = STAGE_NAME.check(data.get("stage")), STAGE_NAME.check(data.get("name"))
    if stage is None or name is None:
        raise bad_request(f'"stage" and "name" must be strings of at most {MAX_NAME_CHARS} characters')
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
MAX_ID_CHARS = 256

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


LAYER_PRESET = Text(MAX_NAME_CHARS, description='a preset of the generator: "coarse", "middle" or "fine"')
LAYER_RANGE = IntegerPair(0, MAX_LAYER_INDEX, description="[start, stop): 0 <= start < stop <= the generator's num_ws")
LAYERS = Either((LAYER_PRESET, LAYER_RANGE), description="a ws layer range")
OPTIONAL_LAYERS = Either((LAYER_PRESET, LAYER_RANGE), nullable=True, description="a ws layer range (null: all)")
SEFA_K = Integer(1, MAX_SEFA_VECTORS, default=5, description="how many directions (the top k)")
PROMPT = Text(MAX_PROMPT_CHARS, pattern=r"\S", description="what to change (surrounding spaces are stripped)")
FACE_ID = Text(MAX_ID_CHARS)
FACE_REF = Shape({"session_id": FACE_ID, "token": FACE_ID}, required=("session_id", "token"), title="FaceRef",
                 description="a prepared session and its token")
MIX_FACES = ListOf(FACE_REF, 2, 2, description="[A, B]")
MIX_PERCENT = Number(-200.0, 300.0, description="make A this many percent more like B (instead of mixing layers)")
MIX_LAYERS = Either((LAYER_PRESET, LAYER_RANGE), default="coarse", description="the layers of A that take B's styles")
MORPH_FACES = ListOf(FACE_REF, 2, MAX_MORPH_FACES)
FRAMES_PER_TRANSITION = Integer(2, 120, default=24)
MORPH_LOOP = Boolean(False, "morph back from the last face to the first")
VIDEO_FORMAT = Choice(tuple(VIDEO_TYPES), default="mp4")
LOOP_FRAMES = Integer(8, MAX_VIDEO_FRAMES, default=48)
LOOP_AMPLITUDE = Number(0.0, 5.0, default=1.0)
LOOP_SEED = Integer(0, 2**31 - 1, default=0)

SEFA_BODY = Shape({"layers": LAYERS, "k": SEFA_K}, required=("layers",), title="SefaRequest")
TEXT_BODY = Shape({"prompt": PROMPT, "layers": OPTIONAL_LAYERS}, required=("prompt",), title="TextRequest")
MIX_BODY = Shape({"faces": MIX_FACES, "percent": MIX_PERCENT, "layers": MIX_LAYERS}, required=("faces",),
                 title="MixRequest")
MORPH_BODY = Shape({"faces": MORPH_FACES, "frames_per_transition": FRAMES_PER_TRANSITION, "loop": MORPH_LOOP,
                    "format": VIDEO_FORMAT}, required=("faces",), title="MorphRequest")
LOOP_BODY = Shape({"face": FACE_REF, "layers": OPTIONAL_LAYERS, "frames": LOOP_FRAMES, "amplitude": LOOP_AMPLITUDE,
                   "seed": LOOP_SEED, "format": VIDEO_FORMAT}, required=("face",), title="LoopRequest")
REQUEST_BODIES = {shape.title: shape for shape in (FACE_CHOICE, STAGE_SWITCH, SEFA_BODY, TEXT_BODY, MIX_BODY,
                                                   MORPH_BODY, LOOP_BODY)}
"""Every JSON request body of the REST API, by name, as its parser reads it (the OpenAPI document's schemas)."""


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


def parse_layer_spec(raw: Any) -> LayerSpec:
    """Parse ``[start, stop]`` or a preset name; the range is checked against num_ws by the service."""
    spec: LayerSpec | None = LAYERS.check(raw)
    if spec is not None:
        return spec
    raise bad_request('"layers" must be [start, stop] (0 <= start < stop <= the generator\'s num_ws), or a preset',
                      "bad_layers")


def _bounded_int(data: dict[str, Any], key: str, spec: Integer) -> int:
    value = spec.check(data.get(key, spec.default))
    if value is None:
        raise bad_request(f'"{key}" must be an integer in [{spec.low}, {spec.high}]')
    return value


def _bounded_float(data: dict[str, Any], key: str, spec: Number) -> float:
    number = spec.check(data.get(key, spec.default))
    if number is None:
        raise bad_request(f'"{key}" must be a number within [{spec.low:g}, {spec.high:g}]')
    return number


def _video_type(data: dict[str, Any]) -> str:
    kind = VIDEO_FORMAT.check(data.get("format", VIDEO_FORMAT.default))
    if kind is None:
        raise bad_request(f'"format" must be one of {", ".join(VIDEO_FORMAT.values)}')
    return kind


def parse_face_ref(raw: Any) -> FaceRef:
    """Parse ``{"session_id": ..., "token": ...}``."""
    session_id = FACE_ID.check(raw.get("session_id")) if isinstance(raw, dict) else None
    token = FACE_ID.check(raw.get("token")) if isinstance(raw, dict) else None
    if session_id is None or token is None:
        raise bad_request('each face must be {"session_id": "...", "token": "..."}', "bad_face")
    return FaceRef(session_id, token)


def parse_sefa_request(data: Any) -> SefaRequest:
    """Parse the body of ``POST .../directions/sefa``."""
    body = _object(data)
    return SefaRequest(parse_layer_spec(body.get("layers")), _bounded_int(body, "k", SEFA_K))


def parse_text_request(data: Any) -> TextRequest:
    """Parse the body of ``POST .../directions/text``."""
    body = _object(data)
    prompt = PROMPT.check(body.get("prompt"))
    if prompt is None or not 0 < len(prompt.strip()) <= MAX_PROMPT_CHARS:
        raise bad_request(f'"prompt" must be a non-empty string of at most {MAX_PROMPT_CHARS} characters')
    layers = body.get("layers")
    return TextRequest(prompt.strip(), None if layers is None else parse_layer_spec(layers))


def parse_mix_request(data: Any) -> MixRequest:
    """Parse the body of ``POST /api/tools/mix``."""
    body = _object(data)
    faces = body.get("faces")
    if not isinstance(faces, list) or not MIX_FACES.allows(len(faces)):
        raise bad_request('"faces" must list exactly two faces', "bad_face")
    pair = (parse_face_ref(faces[0]), parse_face_ref(faces[1]))
    if "percent" in body:
        return MixRequest(pair, percent=_bounded_float(body, "percent", MIX_PERCENT))
    return MixRequest(pair, layers=parse_layer_spec(body.get("layers", MIX_LAYERS.default)))


def parse_morph_request(data: Any) -> MorphRequest:
    """Parse the body of ``POST /api/tools/morph``."""
    body = _object(data)
    faces = body.get("faces")
    if not isinstance(faces, list) or not MORPH_FACES.allows(len(faces)):
        raise bad_request(f'"faces" must list 2 to {MAX_MORPH_FACES} faces', "bad_face")
    per_transition = _bounded_int(body, "frames_per_transition", FRAMES_PER_TRANSITION)
    loop = MORPH_LOOP.check(body.get("loop", MORPH_LOOP.default))
    if loop is None:
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
        frames=_bounded_int(body, "frames", LOOP_FRAMES),
        amplitude=_bounded_float(body, "amplitude", LOOP_AMPLITUDE),
        seed=_bounded_int(body, "seed", LOOP_SEED),
        format=_video_type(body),
    )
