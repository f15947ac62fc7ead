"""The OpenAPI 3.1 document of the REST API (``GET /api/openapi.json``), built from :mod:`fluidsrv.protocol`.

Request bodies are the protocol's own field declarations (the parsers check with the same bounds), response
bodies its response shapes, limits the settings' values. The websocket is described by the AsyncAPI document of
:mod:`fluidsrv.web.asyncapi`; this document names it under ``x-websocket``. ``tests/test_openapi.py`` checks
that every route of the app is here and that the document is valid; ``tests/test_schemathesis.py`` checks the
live server's answers against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fluidsrv import __version__
from fluidsrv.protocol import FACE_QUERY, REQUEST_BODIES, responses
from fluidsrv.settings import Settings
from fluidsrv.web.asyncapi import asyncapi_document
from fluidsrv.web.requests import MAX_JSON_BYTES

JsonSchema = dict[str, Any]
OPENAPI_PATH = "/api/openapi.json"
ASYNCAPI_PATH = "/api/asyncapi.json"
SESSION_PATH = "/api/sessions/{session_id}"
SESSION_AUTH: list[dict[str, list[str]]] = [{"sessionBearer": []}, {"sessionQuery": []}, {"sessionHeader": []}]
ADMIN_AUTH: list[dict[str, list[str]]] = [{"adminBearer": []}]
JPEG, PNG, BINARY = "image/jpeg", "image/png", "application/octet-stream"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/heic", "image/avif", BINARY)
"""Media types a raw upload may declare (the server reads the bytes whatever the header says)."""


@dataclass(frozen=True)
class Answer:
    """The success answer of an operation: its status, and a JSON shape's name or binary media types."""

    status: int
    json: str | None = None
    media: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Operation:
    """One route and method: what it takes and what it answers."""

    method: str
    path: str
    operation_id: str
    summary: str
    answer: Answer
    body: str | None = None  # a request body's name in protocol.REQUEST_BODIES
    upload: bool = False  # the photo: multipart field "file" or the raw body
    auth: str = "none"  # "none", "session" or "admin"
    query: Mapping[str, JsonSchema] = field(default_factory=dict)
    links: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _token_link(operation_id: str, token: str = "$response.body#/token", **more: Any) -> dict[str, Any]:
    """A link to a session route, passing the session's id and its token (as ``?token=``)."""
    source = "$response.body#/session_id"
    return {"operationId": operation_id, "parameters": {"path.session_id": source, "query.token": token}, **more}


_TOKEN_OF_REQUEST = "$request.query.token"
_PICK_FIRST_FACE = {"index": "$response.body#/faces/0/index"}

OPERATIONS = (
    Operation("get", "/api/health", "health", "Liveness and the server's version", Answer(200, "Health")),
    Operation("get", "/api/config", "config", "Models, plugins (with availability), active choices and limits",
              Answer(200, "Config")),
    Operation("post", "/api/config/stages", "switchStage", "Switch a stage to another plugin at run time",
              Answer(200, "StageSwitched"), body="StageSwitch", auth="admin"),
    Operation("get", "/api/stats", "stats", "Executor, session-store, decoding and prepare-line counters",
              Answer(200, "Stats"), auth="admin"),
    Operation("get", "/api/directions", "directions", "The shared edit directions (sliders)",
              Answer(200, "Directions")),
    Operation("post", "/api/sessions", "createSession", "Upload a photo: decode it and detect its faces",
              Answer(201, "NewSession"), upload=True,
              query={"filename": {"type": "string", "description": "the photo's name (raw uploads)"}},
              links={"ChooseFace": _token_link("chooseFace", requestBody=_PICK_FIRST_FACE),
                     "GetSession": _token_link("getSession"), "DeleteSession": _token_link("deleteSession")}),
    Operation("get", SESSION_PATH, "getSession", "A session's state", Answer(200, "SessionWithIdentity"),
              auth="session", query={"thumbnails": {"type": "string", "description": "1: with the faces' thumbnails"}}),
    Operation("delete", SESSION_PATH, "deleteSession", "Delete a session and everything it stored",
              Answer(204, description="deleted"), auth="session"),
    Operation("get", f"{SESSION_PATH}/original", "getOriginal", "The upload, byte for byte",
              Answer(200, media=(BINARY,)), auth="session"),
    Operation("post", f"{SESSION_PATH}/face", "chooseFace",
              "Pick a face: align → encode → fine-tune → distill as one job (progress on the websocket)",
              Answer(202, "Session"), body="FaceChoice", auth="session",
              links={"Finalize": _token_link("finalize", _TOKEN_OF_REQUEST),
                     "SefaDirections": _token_link("sefaDirections", _TOKEN_OF_REQUEST)}),
    Operation("post", f"{SESSION_PATH}/undo", "undo", "Step back through the committed slider states",
              Answer(200, "HistoryStep"), auth="session"),
    Operation("post", f"{SESSION_PATH}/redo", "redo", "Step forward through the committed slider states",
              Answer(200, "HistoryStep"), auth="session"),
    Operation("post", f"{SESSION_PATH}/finalize", "finalize",
              "Render the edit at full quality and paste it into the photo (409 until the face is ready)",
              Answer(200, "SessionWithIdentity"), auth="session",
              links={"GetResult": _token_link("getResult", _TOKEN_OF_REQUEST),
                     "GetOriginal": _token_link("getOriginal", _TOKEN_OF_REQUEST),
                     "Undo": _token_link("undo", _TOKEN_OF_REQUEST),
                     "DeleteSession": _token_link("deleteSession", _TOKEN_OF_REQUEST)}),
    Operation("get", f"{SESSION_PATH}/result", "getResult", "The finalized JPEG at the upload's resolution",
              Answer(200, media=(JPEG,)), auth="session"),
    Operation("get", f"{SESSION_PATH}/directions", "sessionDirections",
              "This session's sliders: the shared ones and the ones it added", Answer(200, "Directions"),
              auth="session"),
    Operation("post", f"{SESSION_PATH}/directions/sefa", "sefaDirections",
              "SeFa's top-k directions of a layer range, added as sliders of this session",
              Answer(200, "Directions"), body="SefaRequest", auth="session"),
    Operation("post", f"{SESSION_PATH}/directions/text", "textDirection",
              "A CLIP text direction, added as a slider of this session (404 without the CLIP plugin)",
              Answer(200, "Directions"), body="TextRequest", auth="session"),
    Operation("get", "/api/tools", "tools", "Which latent tools exist", Answer(200, "Tools")),
    Operation("post", "/api/tools/mix", "mix", "B's styles on a layer range of A, or A made more like B",
              Answer(200, media=(PNG,)), body="MixRequest"),
    Operation("post", "/api/tools/morph", "morph", "A video morphing through 2–8 prepared faces",
              Answer(200, media=("video/mp4", "image/gif")), body="MorphRequest"),
    Operation("post", "/api/tools/loop", "loop", 'A seamless "deform loop" video of one prepared face',
              Answer(200, media=("video/mp4", "image/gif")), body="LoopRequest"),
    Operation("get", "/api/presets", "presets", "The single-edit presets and what each distils",
              Answer(200, "Presets")),
    Operation("post", "/api/presets/{name}/apply", "applyPreset",
              "Apply a preset to the uploaded photo's faces (no session); the edited JPEG",
              Answer(200, media=(JPEG,)), upload=True, query={"face": FACE_QUERY.schema()}),
    Operation("get", OPENAPI_PATH, "openapi", "This document", Answer(200, media=("application/json",))),
    Operation("get", ASYNCAPI_PATH, "asyncapi", "The websocket protocol as an AsyncAPI 3.0 document",
              Answer(200, media=("application/json",))),
)
"""Every REST operation of the server."""


_BODY_SCHEMAS: dict[str, JsonSchema] = {"application/json": {"type": "object", "description": "a JSON document"}}


def _schema_ref(name: str) -> JsonSchema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(name: str) -> JsonSchema:
    return {"application/json": {"schema": _schema_ref(name)}}


def _parameters(operation: Operation) -> list[JsonSchema]:
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                  for name in ("session_id", "name") if f"{{{name}}}" in operation.path]
    parameters += [{"name": name, "in": "query", "required": False, "schema": schema,
                    "description": schema.get("description", "")} for name, schema in operation.query.items()]
    return parameters


def _upload_body() -> JsonSchema:
    raw = {"schema": {"type": "string", "format": "binary"}}
    multipart = {"schema": {"type": "object", "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}}}}
    return {"required": True, "description": "the photo: the multipart field file, or the raw bytes as the body",
            "content": {"multipart/form-data": multipart, **{media: raw for media in IMAGE_TYPES}}}


def _responses(operation: Operation) -> JsonSchema:
    answer = operation.answer
    success: JsonSchema = {"description": answer.description or operation.summary}
    if answer.json is not None:
        success["content"] = _json_content(answer.json)
    elif answer.media:
        success["content"] = {media: {"schema": _BODY_SCHEMAS.get(media, {"type": "string", "format": "binary"})}
                              for media in answer.media}
    if operation.links:
        success["links"] = {name: dict(link) for name, link in operation.links.items()}
    error = {"description": "refused: the error envelope (a wrong or missing token answers 404, as an unknown id)",
             "content": _json_content("Error")}
    failure = {"description": "the server failed: the error envelope (code internal_error)",
               "content": _json_content("Error")}
    return {str(answer.status): success, "4XX": error, "500": failure}


def _operation(operation: Operation) -> JsonSchema:
    document: JsonSchema = {"operationId": operation.operation_id, "summary": operation.summary,
                            "responses": _responses(operation)}
    parameters = _parameters(operation)
    if parameters:
        document["parameters"] = parameters
    if operation.body is not None:
        document["requestBody"] = {"required": True, "content": _json_content(operation.body)}
    elif operation.upload:
        document["requestBody"] = _upload_body()
    document["security"] = {"session": SESSION_AUTH, "admin": ADMIN_AUTH}.get(operation.auth, [])
    return document


def _config_schema(settings: Settings) -> JsonSchema:
    """The Config response with ``limits`` spelt out from the settings (types from their declarations)."""
    schema = responses.CONFIG.schema()
    types = {item.name: item.type for item in dataclasses.fields(settings)}
    limits = {name: {"type": "integer" if types[name] in (int, "int") else "number", "minimum": 0,
                     "description": f"the setting {name} (FLUIDSRV_{name.upper()})"}
              for name in responses.CONFIG_LIMITS}
    schema["properties"]["limits"] = {"type": "object", "properties": limits, "required": list(limits)}
    return schema


def openapi_document(settings: Settings) -> JsonSchema:
    """The OpenAPI 3.1 document of this server (with its configured limits)."""
    schemas = {name: shape.schema() for name, shape in {**REQUEST_BODIES, **responses.RESPONSES}.items()}
    schemas["Config"] = _config_schema(settings)
    paths: dict[str, JsonSchema] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method] = _operation(operation)
    limits = (f"uploads up to {settings.max_upload_bytes} bytes and {settings.max_pixels} pixels, at most "
              f"{settings.max_uploads_per_minute} uploads a minute per client address, JSON bodies up to "
              f"{MAX_JSON_BYTES} bytes")
    return {
        "openapi": "3.1.0",
        "info": {"title": "fluidsrv", "version": __version__, "license": {"name": "MIT", "identifier": "MIT"},
                 "description": "Self-hosted real-time face editing. Every session route needs the session's token "
                                "(returned once by createSession). Refusals are "
                                '{"error": {"code": ..., "message": ...}} with a matching status. Limits: '
                                f"{limits}. The live previews run over the session's websocket: see "
                                f"{ASYNCAPI_PATH} (x-websocket)."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "sessionBearer": {"type": "http", "scheme": "bearer", "description": "the session's token"},
            "sessionQuery": {"type": "apiKey", "in": "query", "name": "token",
                             "description": "the session's token as ?token= (links, the websocket)"},
            "sessionHeader": {"type": "apiKey", "in": "header", "name": "X-Session-Token"},
            "adminBearer": {"type": "http", "scheme": "bearer",
                            "description": "FLUIDSRV_ADMIN_TOKEN (403 while the server has none)"}}},
        "x-websocket": {"description": "the per-session websocket (previews, progress); messages and the binary "
                                       "frame header are described by the AsyncAPI document",
                        "address": f"{SESSION_PATH}/ws", "query": {"token": "the session's token"},
                        "asyncapi": ASYNCAPI_PATH},
    }


async def openapi_json(request: Request) -> JSONResponse:
    """The OpenAPI document of this server."""
    return JSONResponse(openapi_document(request.app.state.settings))


async def asyncapi_json(request: Request) -> JSONResponse:
    """The AsyncAPI document of the session websocket."""
    return JSONResponse(asyncapi_document(request.app.state.settings))


ROUTES = [Route(OPENAPI_PATH, openapi_json), Route(ASYNCAPI_PATH, asyncapi_json)]
"""The documents' routes, mounted by :func:`fluidsrv.web.app.create_app`."""
