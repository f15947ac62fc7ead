"""The Starlette application: the factory, the session routes, the lifespan and the error handlers.

Handlers parse requests with :mod:`fluidsrv.protocol`, call the :class:`~fluidsrv.service.EditService` and
render its answers with :mod:`fluidsrv.web.views`; every refusal is a JSON error with a code and a message.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from fluidsrv import __version__
from fluidsrv.errors import UserError
from fluidsrv.protocol import ApiError, parse_face_choice, parse_stage_switch, responses
from fluidsrv.service import EditService, Status
from fluidsrv.settings import REPO_ROOT, Settings
from fluidsrv.web import openapi, presets, tools
from fluidsrv.web.headers import SecurityHeaders
from fluidsrv.web.paths import hide_paths, path_labels
from fluidsrv.web.requests import (
    ClientRateLimiter,
    json_body,
    open_session,
    read_upload,
    require_admin,
    service_of,
    token_of,
)
from fluidsrv.web.socket import session_socket
from fluidsrv.web.views import direction_view, session_view

log = logging.getLogger(__name__)

STATIC_DIR = REPO_ROOT / "static"
async def health(request: Request) -> JSONResponse:
    """Report that the server is up."""
    return JSONResponse({"status": "ok", "version": __version__})


async def config(request: Request) -> JSONResponse:
    """Describe the models, every plugin with its availability, the active choices and the limits."""
    service = service_of(request)
    settings = service.settings
    text_reason = service.text_unavailable()
    body = {
        "version": __version__,
        "generator": service.generator_info(),
        "plugins": [info.as_dict() for info in await service.plugins()],
        "active": service.active_stages(),
        "skipped": service.skipped_stages(),
        "directions_unavailable": service.directions_unavailable(),
        "features": {"sefa": True, "text": text_reason is None, "text_reason": text_reason, "tools": True},
        "finetune": settings.finetune,
        "photo_detail": settings.photo_detail,
        "limits": {name: getattr(settings, name) for name in responses.CONFIG_LIMITS},
    }
    return JSONResponse(hide_paths(body, request.app.state.path_labels))


async def switch_stage(request: Request) -> JSONResponse:
    """Switch a stage to another plugin at run time; the old one stays active if the new one fails."""
    service = service_of(request)
    require_admin(service.settings.admin_token, request)
    stage, name = parse_stage_switch(await json_body(request))
    return JSONResponse({"active": await service.switch_stage(stage, name)})


async def stats(request: Request) -> JSONResponse:
    """Report executor and session-store counters (needs the admin token)."""
    service = service_of(request)
    require_admin(service.settings.admin_token, request)
    return JSONResponse(service.stats())


async def directions(request: Request) -> JSONResponse:
    """List the edit directions (sliders) of the loaded generator."""
    service = service_of(request)
    body = {"directions": [direction_view(direction) for direction in service.directions().values()]}
    return JSONResponse(hide_paths(body, request.app.state.path_labels))  # a file's provenance names its path


async def create_session(request: Request) -> JSONResponse:
    """Create a session from an uploaded photo and return its token and the faces found."""
    service = service_of(request)
    limiter: ClientRateLimiter = request.app.state.uploads
    client = request.client.host if request.client else "unknown"
    if not limiter.allow(client, time.monotonic()):
        limit = service.settings.max_uploads_per_minute
        raise ApiError(429, "rate_limited", f"at most {limit} uploads a minute from one address; try again soon")
    data, filename = await read_upload(request, service.settings.max_upload_bytes)
    session, token = await service.create(data, filename, client=client)
    body = session_view(session, await service.face_thumbnails(session))
    body["token"] = token
    return JSONResponse(body, status_code=201)


async def get_session(request: Request) -> JSONResponse:
    """Return a session's state."""
    session = await open_session(request)
    thumbnails = await service_of(request).face_thumbnails(session) if request.query_params.get(
        "thumbnails") == "1" else None
    return JSONResponse({**session_view(session, thumbnails), "identity": service_of(request).identity.report(session)})


async def delete_session(request: Request) -> Response:
    """Delete a session, its jobs, sockets and everything it stored."""
    session = await open_session(request)
    await service_of(request).delete(session, token_of(request))
    return Response(status_code=204)


async def original(request: Request) -> Response:
    """Return the uploaded photo, byte for byte."""
    session = await open_session(request)
    return Response(session.upload.data, media_type="application/octet-stream")


async def choose_face(request: Request) -> JSONResponse:
    """Pick a face: starts align → encode → fine-tune → distill as one job (progress on the websocket)."""
    service = service_of(request)
    session = await open_session(request)
    index = parse_face_choice(await json_body(request), len(session.faces))
    await service.prepare(session, index)
    return JSONResponse(session_view(session), status_code=202)


async def history(request: Request) -> JSONResponse:
    """Undo or redo the slider history (``/undo`` or ``/redo``)."""
    session = await open_session(request)
    changed = await service_of(request).step_history(session, "undo" if request.url.path.endswith("/undo") else "redo")
    body = session_view(session)
    body["changed"] = changed
    return JSONResponse(body)


async def finalize(request: Request) -> JSONResponse:
    """Render the edit at full quality, paste it into the photo and keep the JPEG for download."""
    session = await open_session(request)
    if session.status != Status.READY:
        raise ApiError(409, "not_ready", "pick a face and wait until it is ready before finalizing")
    service = service_of(request)
    await service.finalize(session)
    return JSONResponse({**session_view(session), "identity": service.identity.report(session)})


async def result(request: Request) -> Response:
    """Download the finalized photo (JPEG at the upload's resolution)."""
    session = await open_session(request)
    if session.result is None:
        raise ApiError(404, "no_result", "this session has not been finalized yet")
    stem = str(session.upload.filename or "photo").rsplit(".", 1)[0] or "photo"
    safe_stem = "".join(ch for ch in stem if ch.isalnum() or ch in "-_ ")[:80] or "photo"
    return Response(session.result, media_type="image/jpeg",
                    headers={"Content-Disposition": f'attachment; filename="{safe_stem}-edited.jpg"'})


async def _user_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UserError)
    # e.g. a plugin that cannot be switched to says which of the server's files it misses
    return JSONResponse(hide_paths(exc.as_dict(), request.app.state.path_labels), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route or file, wrong method): the error envelope under /api/, else text."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    if not request.url.path.startswith("/api/"):
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    body = {"error": {"code": code, "message": f"{exc.detail}: {request.method} {request.url.path[:200]}"}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse(
        {"error": {"code": "internal_error", "message": "the server failed on this request; see its log"}},
        status_code=500,
    )


class _App(Starlette):
    """Starlette with the security headers outside its whole stack, so the 500 handler's answers get them too."""

    def build_middleware_stack(self) -> ASGIApp:
        """The usual stack wrapped in :class:`~fluidsrv.web.headers.SecurityHeaders`."""
        return SecurityHeaders(super().build_middleware_stack())


def create_app(settings: Settings | None = None, runtime: Any = None, stages: Any = None) -> Starlette:
    """Return the fluidsrv web application for ``settings`` (``runtime`` may be prebuilt, e.g. in tests).

    ``stages(runtime, executor)`` builds where the service runs its stages (default: in this process).
    """
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service = await EditService.start(settings, runtime, stages)
        app.state.service = service
        try:
            yield
        finally:
            await service.close()

    session = "/api/sessions/{session_id:str}"
    routes = [
        Route("/api/health", health),
        Route("/api/config", config),
        Route("/api/config/stages", switch_stage, methods=["POST"]),
        Route("/api/stats", stats),
        Route("/api/directions", directions),
        Route("/api/sessions", create_session, methods=["POST"]),
        Route(session, get_session, methods=["GET"]),
        Route(session, delete_session, methods=["DELETE"]),
        Route(f"{session}/original", original),
        Route(f"{session}/face", choose_face, methods=["POST"]),
        Route(f"{session}/undo", history, methods=["POST"]),
        Route(f"{session}/redo", history, methods=["POST"]),
        Route(f"{session}/finalize", finalize, methods=["POST"]),
        Route(f"{session}/result", result),
        WebSocketRoute(f"{session}/ws", session_socket),
        *tools.ROUTES,
        *presets.ROUTES,
        *openapi.ROUTES,
        Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static"),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        UserError: _user_error,
        HTTPException: _http_error,
        Exception: _internal_error,
    }
    app = _App(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.settings = settings
    app.state.path_labels = path_labels(settings)
    app.state.uploads = ClientRateLimiter(settings.max_uploads_per_minute)
    return app
