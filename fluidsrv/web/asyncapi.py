"""The AsyncAPI 3.0 document of the per-session websocket (``GET /api/asyncapi.json``), from :mod:`fluidsrv.protocol`.

It describes the server: the messages it receives (the client's slider states, undo / redo, ping, as
:func:`~fluidsrv.protocol.parse_client_message` reads them), the JSON events it sends and the binary frames
(the header as :func:`~fluidsrv.protocol.encode_frame` writes it). AsyncAPI rather than an OpenAPI extension:
it is the standard for message channels, so AsyncAPI tools (viewers, code generators) read it as they are.
"""

from __future__ import annotations

from typing import Any

from fluidsrv import __version__
from fluidsrv.protocol import (
    CLIENT_MESSAGES,
    FRAME_FORMATS,
    FRAME_HEADER_BYTES,
    FRAME_KINDS,
    FRAME_MAGIC,
    MAX_SEQ,
    responses,
)
from fluidsrv.settings import Settings
from fluidsrv.web.socket import DELETED_CLOSE_CODE

JsonSchema = dict[str, Any]
CHANNEL = "session"
ADDRESS = "/api/sessions/{session_id}/ws"


def _frame_layout() -> tuple[dict[str, Any], ...]:
    """The binary frame's header fields with their offsets, then the image."""
    header: list[dict[str, Any]] = [
        {"name": "magic", "bytes": len(FRAME_MAGIC), "value": FRAME_MAGIC.decode("ascii")},
        {"name": "kind", "bytes": 1, "values": {str(code): kind for kind, code in FRAME_KINDS.items()}},
        {"name": "format", "bytes": 1, "values": {str(code): kind for kind, code in FRAME_FORMATS.items()}},
        {"name": "seq", "bytes": 4, "encoding": "unsigned big-endian",
         "description": f"preview: the seq of the slider state it shows (at most {MAX_SEQ}); progress: the job's step"},
    ]
    offset = 0
    for item in header:
        item["offset"], offset = offset, offset + item["bytes"]
    assert offset == FRAME_HEADER_BYTES, "the documented frame header disagrees with protocol.encode_frame"
    image = {"name": "image", "offset": FRAME_HEADER_BYTES, "bytes": "the rest", "description": "the encoded image"}
    return (*header, image)


FRAME_LAYOUT = _frame_layout()
"""The binary frame, field by field (``tests/test_openapi.py`` reads a real frame with it)."""


def _message(name: str, payload: JsonSchema, summary: str, content_type: str = "application/json") -> JsonSchema:
    return {"name": name, "title": name, "summary": summary, "contentType": content_type, "payload": payload}


def _client_messages() -> dict[str, JsonSchema]:
    summaries = {"sliders": "the whole slider state; only the newest queued one is rendered",
                 "history": "undo or redo the committed slider history",
                 "ping": "keep-alive, answered by pong"}
    return {name: _message(name, shape.schema(), summaries[name]) for name, shape in CLIENT_MESSAGES.items()}


def _server_messages() -> dict[str, JsonSchema]:
    events = {f"{kind}Event": _message(kind, shape.schema(), f"the {kind} event")
              for kind, shape in responses.SERVER_EVENTS.items()}
    frame = _message("frame", {"type": "string", "format": "binary"},
                     "a preview of a slider state (kind 1) or an intermediate image of a running job (kind 2)",
                     "application/octet-stream")
    frame["description"] = (f"{FRAME_HEADER_BYTES}-byte header then the image: magic {FRAME_MAGIC!r}, kind, format, "
                            "seq (see x-frame-layout)")
    frame["x-frame-layout"] = list(FRAME_LAYOUT)
    return {**events, "frame": frame}


def asyncapi_document(settings: Settings) -> JsonSchema:
    """The AsyncAPI 3.0 document of the session websocket (with this server's message limits)."""
    incoming, outgoing = _client_messages(), _server_messages()
    messages = {**incoming, **outgoing}
    refs = {name: {"$ref": f"#/channels/{CHANNEL}/messages/{name}"} for name in messages}
    limits = (f"messages of at most {settings.max_ws_message_bytes} bytes and {settings.max_ws_messages_per_second:g} "
              f"a second; at most {settings.max_sockets_per_session} sockets per session")
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "fluidsrv session websocket", "version": __version__,
                 "description": "Live previews of one session. On connect the server sends a state event; a bad "
                                "message gets an error event and the connection stays open. Close codes: "
                                f"4000 + the HTTP status of a refusal at connect (4404 unknown session or token, "
                                f"4429 too many sockets), {DELETED_CLOSE_CODE} when the session is deleted. "
                                f"Limits: {limits}."},
        "defaultContentType": "application/json",
        "channels": {CHANNEL: {
            "address": ADDRESS, "title": "a session's websocket",
            "parameters": {"session_id": {"description": "the session's id (createSession)"}},
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            "bindings": {"ws": {"bindingVersion": "0.1.0", "method": "GET", "query": {
                "type": "object", "required": ["token"],
                "properties": {"token": {"type": "string", "description": "the session's token"}}}}},
        }},
        "operations": {
            "receiveClientMessages": {"action": "receive", "channel": {"$ref": f"#/channels/{CHANNEL}"},
                                      "summary": "what a client sends (JSON text)",
                                      "messages": [refs[name] for name in incoming]},
            "sendServerMessages": {"action": "send", "channel": {"$ref": f"#/channels/{CHANNEL}"},
                                   "summary": "what the server sends: JSON events and binary frames",
                                   "messages": [refs[name] for name in outgoing]},
        },
        "components": {"messages": messages},
    }
