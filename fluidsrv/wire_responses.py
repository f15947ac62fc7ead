"""The shapes of what the server answers: REST response bodies and the websocket's server events.

They describe :mod:`fluidsrv.web.views` and the route handlers (the OpenAPI and AsyncAPI documents publish
them); ``tests/test_openapi.py`` and ``tests/test_schemathesis.py`` check real answers against them. Objects are
open (a client must ignore keys it does not know), the keys listed are always there unless marked optional.
"""

from __future__ import annotations

from fluidsrv.wire_fields import (
    Boolean,
    Choice,
    Described,
    Field,
    Integer,
    ListOf,
    MapOf,
    Number,
    Shape,
    Text,
    nullable,
)

SESSION_STATUSES = ("uploaded", "preparing", "ready", "failed", "cancelled", "interrupted")
"""Every ``status`` a session reports (``fluidsrv.session.model.Status``)."""

CONFIG_LIMITS = ("max_upload_bytes", "max_pixels", "max_sessions", "max_ws_message_bytes",
                 "max_ws_messages_per_second", "max_sockets_per_session", "max_concurrent_prepares",
                 "prepare_grace_seconds", "client_pixels_per_minute")
"""The settings ``GET /api/config`` reports under ``limits`` (each the setting of that name)."""

def _text(description: str = "") -> Text:
    return Text(description=description)


def _object_of(value: Field, description: str = "") -> Field:
    return MapOf(_text(), value, description=description)


def _free(description: str) -> Field:
    return Described({"type": "object"}, description)


ERROR = Shape({"error": Shape({"code": _text("a stable machine code, e.g. not_ready"),
                               "message": _text("what went wrong, for people")}, required=("code", "message"))},
              required=("error",), title="Error", description="every refusal (4xx) and server failure (500)")

HEALTH = Shape({"status": Choice(("ok",)), "version": _text()}, required=("status", "version"), title="Health")

PROGRESS = Shape({"stage": _text("align, encode, finetune, distill, finalize... or queued"), "step": Integer(0),
                  "total": Integer(0), "message": _text(),
                  "queued": Integer(1, description="optional: the job's place in line while it waits (1 = next)")},
                 required=("stage", "step", "total", "message"), title="Progress")

POINT = ListOf(Number(), 2, 2)
FACE = Shape({"index": Integer(0), "box": ListOf(Number(), 4, 4, description="[x0, y0, x1, y1]"),
              "score": Number(), "landmarks": ListOf(POINT, 5, 5, description="eyes, nose, mouth corners"),
              "thumbnail": Text(pattern="^data:image/jpeg;base64,",
                                description="optional: a JPEG data URL (on create, and on GET with ?thumbnails=1)")},
             required=("index", "box", "score", "landmarks"), title="Face")

DIRECTION = Shape({"name": _text("the slider's id"), "label": _text(), "group": _text(),
                   "min": Number(), "max": Number(),
                   "layers": nullable(ListOf(Integer(0), 2, 2, description="[start, stop) ws layers; null: all")),
                   "provenance": _text(), "unit": _text("optional: the attribute unit of a value, e.g. years")},
                  required=("name", "label", "group", "min", "max", "layers", "provenance"), title="Direction")
DIRECTIONS = Shape({"directions": ListOf(DIRECTION)}, required=("directions",), title="Directions")

SLIDER_STATE = _object_of(Number(), "slider name → value")

READING = Shape({"distance": Number(0), "threshold": Number(0), "same_person": Boolean(),
                 "embedder": _text(), "source": Choice(("preview", "final")), "values": _object_of(Number())},
                required=("distance", "threshold", "same_person", "embedder", "source"), title="IdentityReading")
IDENTITY = Shape({"available": Boolean(), "reason": nullable(_text("why the meter is off")), "embedder": _text(),
                  "threshold": Number(0), "preview": nullable(READING), "final": nullable(READING)},
                 required=("available",), title="Identity",
                 description="the identity meter: whether the edited face is still the same person")

_SESSION_FIELDS: dict[str, Field] = {
    "session_id": _text(), "status": Choice(SESSION_STATUSES),
    "error": nullable(_text("why preparing failed")), "progress": nullable(PROGRESS),
    "width": Integer(1), "height": Integer(1), "filename": nullable(_text()), "faces": ListOf(FACE),
    "face_index": nullable(Integer(0)), "sliders": SLIDER_STATE, "can_undo": Boolean(), "can_redo": Boolean(),
    "result": nullable(_text("the URL of the finalized JPEG")), "websocket": _text("the URL of the session's socket"),
    "custom_directions": ListOf(DIRECTION),
}
_SESSION_REQUIRED = tuple(_SESSION_FIELDS)


def session_shape(title: str, **more: Field) -> Shape:
    """The session view with ``more`` fields (required too), as one route answers it."""
    return Shape({**_SESSION_FIELDS, **more}, required=(*_SESSION_REQUIRED, *more), title=title)


SESSION = session_shape("Session")
NEW_SESSION = session_shape("NewSession", token=_text("the session's secret: send it as Authorization: Bearer"))
SESSION_WITH_IDENTITY = session_shape("SessionWithIdentity", identity=IDENTITY)
HISTORY_STEP = session_shape("HistoryStep", changed=Boolean(description="whether there was a step to take"))

PLUGIN = Shape({"stage": _text(), "name": _text(), "description": _text(), "plugin": _text(),
                "available": Boolean(), "reason": nullable(_text())},
               required=("stage", "name", "description", "plugin", "available", "reason"), title="Plugin")
ACTIVE = _free("the active plugin of every stage (directions: the list of sources)")
CONFIG = Shape({
    "version": _text(),
    "generator": Shape({"source": _text(), "trained": Boolean(), "resolution": Integer(1), "num_ws": Integer(1),
                        "w_dim": Integer(1), "device": _text()},
                       required=("source", "trained", "resolution", "num_ws", "w_dim", "device")),
    "plugins": ListOf(PLUGIN), "active": ACTIVE,
    "skipped": _object_of(_object_of(_text()), "stage → plugin passed over → why"),
    "directions_unavailable": _object_of(_text(), "direction source → why it gives no sliders"),
    "features": Shape({"sefa": Boolean(), "text": Boolean(), "text_reason": nullable(_text()), "tools": Boolean()},
                      required=("sefa", "text", "text_reason", "tools")),
    "finetune": Choice(("lowrank", "full", "none")), "photo_detail": Choice(("transfer", "replace")),
    "limits": Described({"type": "object"}, "filled in from the settings by the document builder"),
}, required=("version", "generator", "plugins", "active", "skipped", "directions_unavailable", "features",
             "finetune", "photo_detail", "limits"), title="Config")
STAGE_SWITCHED = Shape({"active": ACTIVE}, required=("active",), title="StageSwitched")
STATS = Shape({name: _free(name) for name in ("executor", "sessions", "decoding", "prepares", "finetune", "backend")},
              required=("executor", "sessions", "decoding", "prepares", "finetune", "backend"), title="Stats")
TOOLS = Shape({"mix": Boolean(), "morph": Boolean(), "loop": Boolean()}, required=("mix", "morph", "loop"),
              title="Tools")

PRESET = Shape({"name": _text(), "label": _text(), "direction": _text("the slider it distils"),
                "strength": Number(description="the slider value it bakes in"), "generator_sha256": _text(),
                "resolution": Integer(1), "fidelity": _free("held-out figures of its training run"),
                "training": _free("steps, seconds, pairs")},
               required=("name", "label", "direction", "strength", "generator_sha256", "resolution", "fidelity",
                         "training"), title="Preset")
PRESETS = Shape({"presets": ListOf(PRESET)}, required=("presets",), title="Presets")

RESPONSES = {shape.title: shape for shape in (ERROR, HEALTH, CONFIG, STAGE_SWITCHED, STATS, DIRECTIONS, SESSION,
                                              NEW_SESSION, SESSION_WITH_IDENTITY, HISTORY_STEP, TOOLS, PRESETS)}
"""Every JSON response body of the REST API, by name."""


def _event(kind: str, fields: dict[str, Field], required: tuple[str, ...] = ()) -> Shape:
    return Shape({"type": Choice((kind,)), **fields}, required=("type", *required), title=kind)


_SEQ = Integer(0, description="the seq of the client's message this answers")
SERVER_EVENTS = {
    "state": _event("state", {**_SESSION_FIELDS, "identity": IDENTITY}, (*_SESSION_REQUIRED, "identity")),
    "progress": _event("progress", dict(PROGRESS.fields), tuple(PROGRESS.required)),
    "ready": _event("ready", _SESSION_FIELDS, _SESSION_REQUIRED),
    "saved": _event("saved", {"seq": _SEQ}, ("seq",)),
    "sliders": _event("sliders", {"seq": _SEQ, "values": SLIDER_STATE, "changed": Boolean(), "can_undo": Boolean(),
                                  "can_redo": Boolean()}, ("seq", "values", "changed", "can_undo", "can_redo")),
    "finalized": _event("finalized", {"result": _text("the URL of the finalized JPEG")}, ("result",)),
    "identity": _event("identity", dict(READING.fields), tuple(READING.required)),
    "error": _event("error", {"code": _text(), "message": _text(),
                              "seq": nullable(Integer(0, description="optional: the message it answers"))},
                    ("code", "message")),
    "pong": _event("pong", {}),
}
"""The server's JSON text events on the websocket, by ``type``."""
