"""The Starlette application: REST routes, the per-session websocket, static files and the lifespan.

Handlers parse requests with :mod:`fluidsrv.protocol`, run device work through the single
:class:`~fluidsrv.executor.GpuExecutor` and touch sessions through the
:class:`~fluidsrv.sessions.SessionStore`; every refusal is a JSON error with a code and a message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from fluidsrv import __version__, app_tools, pipeline
from fluidsrv.app_tools import direction_dict, features
from fluidsrv.convert import encode_preview
from fluidsrv.errors import UserError
from fluidsrv.executor import SUPERSEDED, ExecutorError, GpuExecutor, Priority
from fluidsrv.image_io import decode_image, encode_image, face_thumbnail
from fluidsrv.plugins import PluginError
from fluidsrv.protocol import (
    ApiError,
    HistoryMessage,
    PingMessage,
    SliderMessage,
    encode_frame,
    event,
    parse_client_message,
    parse_face_choice,
    parse_stage_switch,
)
from fluidsrv.runtime import Runtime, session_directions
from fluidsrv.sessions import Session, SessionError, SessionStore, TooManySessionsError
from fluidsrv.settings import REPO_ROOT, Settings
from fluidsrv.stages import Face, Progress
from fluidsrv.web import ClientRateLimiter, TokenBucket, json_body, server_of, token_of

log = logging.getLogger(__name__)

STATIC_DIR = REPO_ROOT / "static"
EXPIRY_INTERVAL_SECONDS = 60.0
MULTIPART_OVERHEAD_BYTES = 64 * 1024
PREVIEW_FORMAT = "webp"
ABANDONED_UPLOAD_SECONDS = 120.0  # a full server may delete uploads idle this long whose face was never picked


@dataclass(eq=False)
class Connection:
    """One open websocket of a session.

    Preview frames go out through one slot: while a frame is being sent, only the newest next frame waits
    (older ones are dropped), so a client that reads slowly never makes the server queue frames.
    """

    socket: WebSocket
    session_id: str
    owner: str  # the executor owner of this connection's previews
    messages: TokenBucket  # the message rate limit
    last_sent: int = -1  # arrival number of the newest preview sent (older ones are dropped)
    arrivals: int = 0
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting_frame: tuple[int, bytes] | None = None  # (arrival, frame) not sent yet
    sending: bool = False

    async def send_text(self, text: str) -> None:
        """Send a JSON event; a closed socket is ignored."""
        async with self.send_lock:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.socket.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame; a closed socket is ignored."""
        async with self.send_lock:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.socket.send_bytes(data)

    async def offer_preview(self, arrival: int, frame: bytes) -> None:
        """Send a preview frame, or leave it as the one waiting frame while an earlier one is being sent."""
        if arrival <= self.last_sent or (self.waiting_frame is not None and arrival <= self.waiting_frame[0]):
            return
        self.waiting_frame = (arrival, frame)
        if self.sending:
            return
        self.sending = True
        try:
            while self.waiting_frame is not None:
                arrival, frame = self.waiting_frame
                self.waiting_frame = None
                self.last_sent = arrival
                await self.send_bytes(frame)
        finally:
            self.sending = False


class Server:
    """The running server's state: runtime, executor, sessions, open sockets and running jobs."""

    def __init__(self, settings: Settings, runtime: Runtime, store: SessionStore, executor: GpuExecutor) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.executor = executor
        self.connections: dict[str, set[Connection]] = {}
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.latest_progress: dict[str, tuple[str, bytes | None]] = {}  # session -> (event, frame) of a running job
        self.uploads = ClientRateLimiter(settings.max_uploads_per_minute)
        self._background: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` in the background, holding a reference until it finishes."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def broadcast(self, session_id: str, text: str) -> None:
        """Send a JSON event to every socket of a session (fire and forget, on the event loop)."""
        for connection in list(self.connections.get(session_id, ())):
            self.spawn(connection.send_text(text))

    def broadcast_frame(self, session_id: str, frame: bytes) -> None:
        """Send a binary frame to every socket of a session."""
        for connection in list(self.connections.get(session_id, ())):
            self.spawn(connection.send_bytes(frame))

    def progress_handler(self, session_id: str) -> Callable[[Progress], None]:
        """Return a callback that forwards a job's progress (and intermediate frames) to the session's sockets."""

        def forward(progress: Progress) -> None:
            session = self.store.peek(session_id)
            if session is not None:
                session.meta = {**session.meta, "progress": _progress_dict(progress)}
            text = event("progress", **_progress_dict(progress))
            self.broadcast(session_id, text)
            frame = self.latest_progress.get(session_id, ("", None))[1]
            if progress.frame is not None:
                image = encode_preview(progress.frame, PREVIEW_FORMAT)
                frame = encode_frame(progress.step, image, PREVIEW_FORMAT, kind="progress")
                self.broadcast_frame(session_id, frame)
            self.latest_progress[session_id] = (text, frame)

        return forward

    async def open_session(self, request_or_socket: Request | WebSocket) -> Session:
        """Return the session named in the path, authorised by its token."""
        session_id = request_or_socket.path_params["session_id"]
        token = token_of(request_or_socket)
        self.store.check(session_id, token)
        session = await asyncio.to_thread(self.store.get, session_id, token)
        if session.meta.get("status") == "preparing" and session_id not in self.jobs:
            # the server stopped while this face was being prepared: the client must pick it again
            session.meta = {**session.meta, "status": "interrupted", "progress": None}
        return session


# ---- JSON views ------------------------------------------------------------------------------------


def _progress_dict(progress: Progress) -> dict[str, Any]:
    return {"stage": progress.stage, "step": progress.step, "total": progress.total, "message": progress.message}


def _face_dict(index: int, face: Face, image: Any = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "index": index,
        "box": [round(float(value), 2) for value in face.box],
        "score": float(face.score),
        "landmarks": face.landmarks5.round(2).tolist(),
    }
    if image is not None:
        thumbnail = encode_image(face_thumbnail(image, face.box, size=96), "jpeg", quality=85)
        data["thumbnail"] = "data:image/jpeg;base64," + base64.b64encode(thumbnail).decode("ascii")
    return data


def _session_dict(session: Session, *, thumbnails: bool = False) -> dict[str, Any]:
    height, width = session.image.shape[:2] if session.image is not None else (0, 0)
    base = f"/api/sessions/{session.id}"
    return {
        "session_id": session.id,
        "status": session.meta.get("status", "uploaded"),
        "error": session.meta.get("error"),
        "progress": session.meta.get("progress"),
        "width": width,
        "height": height,
        "filename": session.meta.get("filename"),
        "faces": [
            _face_dict(index, face, session.image if thumbnails else None) for index, face in enumerate(session.faces)
        ],
        "face_index": session.face_index,
        "sliders": session.sliders,
        "can_undo": bool(session.history.undo_stack),
        "can_redo": bool(session.history.redo_stack),
        "result": f"{base}/result" if "result" in session.extra_arrays else None,
        "websocket": f"{base}/ws",
        "custom_directions": [direction_dict(direction) for direction in session_directions(session).values()],
    }


# ---- REST handlers ---------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    """Report that the server is up."""
    return JSONResponse({"status": "ok", "version": __version__})


async def config(request: Request) -> JSONResponse:
    """Describe the models, every plugin with its availability, the active choices and the limits."""
    server = server_of(request)
    settings = server.settings
    plugins = await asyncio.to_thread(server.runtime.catalog.describe)
    return JSONResponse(
        {
            "version": __version__,
            "generator": server.runtime.describe(),
            "plugins": [info.as_dict() for info in plugins],
            "active": server.runtime.active_stages(),
            "directions_unavailable": server.runtime.direction_status(),
            "features": features(server.runtime),
            "finetune": settings.finetune,
            "photo_detail": settings.photo_detail,
            "limits": {
                "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels,
                "max_sessions": settings.max_sessions,
                "max_ws_message_bytes": settings.max_ws_message_bytes,
                "max_ws_messages_per_second": settings.max_ws_messages_per_second,
            },
        }
    )


async def switch_stage(request: Request) -> JSONResponse:
    """Switch a stage to another plugin at run time; the old one stays active if the new one fails."""
    server = server_of(request)
    _require_admin(server.settings, request)
    stage, name = parse_stage_switch(await json_body(request))
    try:
        await server.executor.run(lambda: server.runtime.switch_stage(stage, name), priority=Priority.FINALIZE)
    except PluginError as error:
        raise ApiError(422, "plugin_unavailable", str(error)) from None
    return JSONResponse({"active": server.runtime.active_stages()})


def _require_admin(settings: Settings, request: Request) -> None:
    """Refuse unless the request carries the configured admin token (server-wide changes need it)."""
    if not settings.admin_token:
        raise ApiError(403, "admin_disabled", "set FLUIDSRV_ADMIN_TOKEN to allow switching plugins at run time")
    if not hmac.compare_digest(token_of(request).encode(), settings.admin_token.encode()):
        raise ApiError(401, "bad_admin_token", "this needs the server's admin token (Authorization: Bearer ...)")


async def stats(request: Request) -> JSONResponse:
    """Report executor and session-store counters."""
    server = server_of(request)
    return JSONResponse({"executor": vars(server.executor.stats()), "sessions": vars(server.store.stats())})


async def directions(request: Request) -> JSONResponse:
    """List the edit directions (sliders) of the loaded generator."""
    runtime = server_of(request).runtime
    return JSONResponse({"directions": [direction_dict(direction) for direction in runtime.directions.values()]})


async def create_session(request: Request) -> JSONResponse:
    """Create a session from an uploaded photo and return its token and the faces found."""
    server = server_of(request)
    settings = server.settings
    client = request.client.host if request.client else "unknown"
    if not server.uploads.allow(client, time.monotonic()):
        limit = settings.max_uploads_per_minute
        raise ApiError(429, "rate_limited", f"at most {limit} uploads a minute from one address; try again soon")
    data, filename = await _read_upload(request, settings.max_upload_bytes)
    decoded = await asyncio.to_thread(
        decode_image, data, max_pixels=settings.max_pixels, max_bytes=settings.max_upload_bytes
    )
    faces = await asyncio.to_thread(pipeline.detect_faces, server.runtime, decoded.pixels)
    if not faces:
        raise ApiError(422, "no_face", "no face was found in this photo; try a photo where a face is clearly visible")
    session, token = await asyncio.to_thread(_create_room_for, server, data, decoded.pixels)
    session.faces = faces
    session.meta = {"status": "uploaded", "filename": filename}
    await asyncio.to_thread(server.store.persist, session)
    body = _session_dict(session, thumbnails=True)
    body["token"] = token
    return JSONResponse(body, status_code=201)


def _create_room_for(server: Server, upload: bytes, image: Any) -> tuple[Session, str]:
    """Create a session; when the server is full, first delete the oldest abandoned upload (no face picked)."""
    try:
        return server.store.create(upload=upload, image=image)
    except TooManySessionsError:
        deadline = time.time() - ABANDONED_UPLOAD_SECONDS
        removed = server.store.remove_oldest(
            lambda session: session.meta.get("status", "uploaded") == "uploaded" and session.last_used < deadline
        )
        if removed is None:
            raise
        log.info("the server is full: deleted abandoned upload %s", removed[:8])
        return server.store.create(upload=upload, image=image)


async def get_session(request: Request) -> JSONResponse:
    """Return a session's state."""
    session = await server_of(request).open_session(request)
    return JSONResponse(_session_dict(session, thumbnails=request.query_params.get("thumbnails") == "1"))


async def delete_session(request: Request) -> Response:
    """Delete a session, its jobs, sockets and everything it stored."""
    server = server_of(request)
    session = await server.open_session(request)
    server.executor.cancel_owner(session.id)
    job = server.jobs.pop(session.id, None)
    if job is not None:
        job.cancel()
    for connection in list(server.connections.get(session.id, ())):
        await connection.send_text(event("error", code="session_deleted", message="this session was deleted"))
        with contextlib.suppress(RuntimeError):
            await connection.socket.close(code=4410)
    server.runtime.tuned.forget(session.id)
    await asyncio.to_thread(server.store.delete, session.id, token_of(request))
    return Response(status_code=204)


async def original(request: Request) -> Response:
    """Return the uploaded photo, byte for byte."""
    session = await server_of(request).open_session(request)
    return Response(session.upload, media_type="application/octet-stream")


async def choose_face(request: Request) -> JSONResponse:
    """Pick a face: starts align → encode → fine-tune → distill as one job (progress on the websocket)."""
    server = server_of(request)
    session = await server.open_session(request)
    index = parse_face_choice(await json_body(request), len(session.faces))
    _refuse_if_busy(server, session)
    session.meta = {**session.meta, "status": "preparing", "error": None, "progress": None}
    server.jobs[session.id] = asyncio.create_task(_prepare(server, session, index))
    return JSONResponse(_session_dict(session), status_code=202)


async def history(request: Request) -> JSONResponse:
    """Undo or redo the slider history (``/undo`` or ``/redo``)."""
    server = server_of(request)
    session = await server.open_session(request)
    action = request.url.path.rsplit("/", 1)[-1]
    changed = session.undo() if action == "undo" else session.redo()
    if changed:
        await asyncio.to_thread(server.store.update, session)
    body = _session_dict(session)
    body["changed"] = changed
    return JSONResponse(body)


async def finalize(request: Request) -> JSONResponse:
    """Render the edit at full quality, paste it into the photo and keep the JPEG for download."""
    server = server_of(request)
    session = await server.open_session(request)
    if session.meta.get("status") != "ready":
        raise ApiError(409, "not_ready", "pick a face and wait until it is ready before finalizing")
    _refuse_if_busy(server, session)
    task = asyncio.create_task(_finalize(server, session))
    server.jobs[session.id] = task
    await task
    return JSONResponse(_session_dict(session))


async def result(request: Request) -> Response:
    """Download the finalized photo (JPEG at the upload's resolution)."""
    session = await server_of(request).open_session(request)
    if "result" not in session.extra_arrays:
        raise ApiError(404, "no_result", "this session has not been finalized yet")
    stem = str(session.meta.get("filename") or "photo").rsplit(".", 1)[0] or "photo"
    safe_stem = "".join(ch for ch in stem if ch.isalnum() or ch in "-_ ")[:80] or "photo"
    return Response(
        session.extra_arrays["result"].tobytes(),
        media_type="image/jpeg",
        headers={"Content-Disposition": f'attachment; filename="{safe_stem}-edited.jpg"'},
    )


def _refuse_if_busy(server: Server, session: Session) -> None:
    job = server.jobs.get(session.id)
    if job is not None and not job.done():
        raise ApiError(409, "busy", "this session is already working; wait for the current job to finish")


async def _prepare(server: Server, session: Session, index: int) -> None:
    with server.store.pinned(session):
        try:
            await server.executor.run_job(
                lambda: pipeline.prepare(server.runtime, session, index),
                priority=Priority.ENCODE,
                owner=session.id,
                on_progress=server.progress_handler(session.id),
            )
        except asyncio.CancelledError:
            session.meta = {**session.meta, "status": "cancelled"}
            return
        except Exception as error:
            log.exception("preparing session %s failed", session.id)
            session.meta = {**session.meta, "status": "failed", "error": _user_message(error)}
            server.broadcast(session.id, event("error", code="prepare_failed", message=_user_message(error)))
            return
        finally:
            server.jobs.pop(session.id, None)
            server.latest_progress.pop(session.id, None)
        session.meta = {**session.meta, "status": "ready", "progress": None}
        await asyncio.to_thread(server.store.persist, session)
        server.broadcast(session.id, event("ready", **_session_dict(session)))


async def _finalize(server: Server, session: Session) -> None:
    with server.store.pinned(session):
        try:
            jpeg = await server.executor.run_job(
                lambda: pipeline.finalize(server.runtime, session),
                priority=Priority.FINALIZE,
                owner=session.id,
                on_progress=server.progress_handler(session.id),
            )
        except asyncio.CancelledError:
            raise ApiError(409, "cancelled", "finalizing was cancelled") from None
        except ExecutorError as error:
            raise ApiError(503, "out_of_memory", str(error)) from None
        except pipeline.PipelineError as error:
            raise ApiError(409, "not_ready", str(error)) from None
        except Exception as error:
            log.exception("finalizing session %s failed", session.id)
            raise ApiError(500, "finalize_failed", f"finalizing failed: {_user_message(error)}") from None
        finally:
            server.jobs.pop(session.id, None)
            server.latest_progress.pop(session.id, None)
        session.extra_arrays = {**session.extra_arrays, "result": np.frombuffer(jpeg, dtype=np.uint8)}
        await asyncio.to_thread(server.store.persist, session)
        server.broadcast(session.id, event("finalized", result=f"/api/sessions/{session.id}/result"))


def _user_message(error: BaseException) -> str:
    return str(error) or type(error).__name__


async def _read_upload(request: Request, max_bytes: int) -> tuple[bytes, str | None]:
    """Return the uploaded file (raw body or the multipart field "file") and its name, within ``max_bytes``."""
    too_large = ApiError(413, "upload_too_large", f"uploads are limited to {max_bytes // (1024 * 1024)} MiB")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise too_large
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        if not (declared and declared.isdigit()):
            raise ApiError(411, "length_required", "multipart uploads need a Content-Length header")
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=max_bytes)
        except Exception as error:  # starlette raises its own parse errors for malformed multipart bodies
            raise ApiError(422, "bad_upload", f"could not read the multipart upload: {error}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_file", 'send the photo as the multipart field "file" or as the raw body')
        data = await upload.read(max_bytes + 1)
        filename = upload.filename
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
        data, filename = b"".join(chunks), request.query_params.get("filename")
    if len(data) > max_bytes:
        raise too_large
    return data, filename


# ---- websocket -------------------------------------------------------------------------------------


async def session_socket(socket: WebSocket) -> None:
    """The per-session websocket: slider states in, preview frames and job events out."""
    server = server_of(socket)
    await socket.accept()
    try:
        session = await server.open_session(socket)
    except SessionError as error:
        await socket.send_text(event("error", code=error.code, message=error.message))
        await socket.close(code=4000 + error.status)
        return
    rate = server.settings.max_ws_messages_per_second
    bucket = TokenBucket(rate, burst=rate, now=time.monotonic())
    connection = Connection(socket, session.id, f"{session.id}:{uuid.uuid4().hex}", bucket)
    server.connections.setdefault(session.id, set()).add(connection)
    server.store.pin(session)
    try:
        await connection.send_text(event("state", **_session_dict(session)))
        if session.id in server.latest_progress:  # joined a running job: show where it is
            text, frame = server.latest_progress[session.id]
            await connection.send_text(text)
            if frame is not None:
                await connection.send_bytes(frame)
        await _socket_loop(server, connection, session)
    finally:
        server.store.unpin(session)
        server.executor.cancel_owner(connection.owner)
        remaining = server.connections.get(session.id, set())
        remaining.discard(connection)
        if not remaining:
            server.connections.pop(session.id, None)
            if session.id in server.jobs:  # the last client left: its long job is no longer wanted
                server.executor.cancel_owner(session.id)


async def _socket_loop(server: Server, connection: Connection, session: Session) -> None:
    settings = server.settings
    while True:
        message = await connection.socket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            await connection.send_text(
                event("error", code="malformed_message", message="send JSON text messages, not binary")
            )
            continue
        if not connection.messages.take(time.monotonic()):
            await connection.send_text(
                event("error", code="rate_limited", message="too many messages; slow down", seq=None)
            )
            continue
        try:
            parsed = parse_client_message(text, settings.max_ws_message_bytes)
        except ApiError as error:
            await connection.send_text(event("error", code=error.code, message=error.message, seq=None))
            continue
        if isinstance(parsed, PingMessage):
            await connection.send_text(event("pong"))
        elif isinstance(parsed, SliderMessage):
            await _on_sliders(server, connection, session, parsed)
        elif isinstance(parsed, HistoryMessage):
            await _on_history(server, connection, session, parsed)


async def _on_sliders(server: Server, connection: Connection, session: Session, message: SliderMessage) -> None:
    if session.meta.get("status") != "ready":
        await connection.send_text(
            event("error", code="not_ready", message="the face is not ready yet", seq=message.seq)
        )
        return
    unknown = sorted(set(message.values) - set(server.runtime.directions_for(session)))
    if unknown:
        await connection.send_text(
            event("error", code="unknown_slider", message=f"unknown sliders: {', '.join(unknown[:5])}", seq=message.seq)
        )
        return
    session.set_sliders(message.values, record=message.commit)
    _request_preview(server, connection, session, message.seq, dict(message.values))


async def _on_history(server: Server, connection: Connection, session: Session, message: HistoryMessage) -> None:
    changed = session.undo() if message.action == "undo" else session.redo()
    await connection.send_text(
        event(
            "sliders",
            seq=message.seq,
            values=session.sliders,
            changed=changed,
            can_undo=bool(session.history.undo_stack),
            can_redo=bool(session.history.redo_stack),
        )
    )
    if session.meta.get("status") == "ready":
        _request_preview(server, connection, session, message.seq, dict(session.sliders))


def _request_preview(
    server: Server, connection: Connection, session: Session, seq: int, values: dict[str, float]
) -> None:
    """Queue a preview of ``values``; only the newest queued state of this connection is rendered."""
    connection.arrivals += 1
    arrival = connection.arrivals

    def render(state: dict[str, float]) -> bytes:
        return encode_preview(pipeline.render_preview(server.runtime, session, state), PREVIEW_FORMAT)

    future = server.executor.submit_preview(connection.owner, values, render)
    server.spawn(_send_preview(connection, future, seq, arrival))


async def _send_preview(connection: Connection, future: Awaitable[Any], seq: int, arrival: int) -> None:
    try:
        image = await future
    except asyncio.CancelledError:
        return
    except Exception as error:
        log.exception("preview failed")
        await connection.send_text(event("error", code="preview_failed", message=_user_message(error), seq=seq))
        return
    if image is SUPERSEDED:
        return
    await connection.offer_preview(arrival, encode_frame(seq, image, PREVIEW_FORMAT))


# ---- errors ------------------------------------------------------------------------------------------


async def _user_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UserError)
    return JSONResponse(exc.as_dict(), status_code=exc.status)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse(
        {"error": {"code": "internal_error", "message": "the server failed on this request; see its log"}},
        status_code=500,
    )


# ---- app ---------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Starlette:
    """Return the fluidsrv web application for ``settings`` (``runtime`` may be prebuilt, e.g. in tests)."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loaded: Runtime = runtime if runtime is not None else await asyncio.to_thread(Runtime.build, settings)
        store = SessionStore(
            settings.data_dir,
            device=loaded.device,
            memory_budget_bytes=settings.session_memory_budget_bytes,
            host_budget_bytes=settings.session_host_budget_bytes,
            ttl_seconds=settings.session_ttl_seconds,
            max_sessions=settings.max_sessions,
        )
        executor = GpuExecutor(loaded.device, on_out_of_memory=functools.partial(_free_memory, loaded, store))
        server = Server(settings, loaded, store, executor)
        executor.start()
        app.state.server = server
        expiry = asyncio.create_task(_expire_sessions(server))
        try:
            yield
        finally:
            expiry.cancel()
            for job in list(server.jobs.values()):
                job.cancel()
            await server.executor.shutdown()
            store.close()

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
        *app_tools.ROUTES,
        Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static"),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        UserError: _user_error,
        Exception: _internal_error,
    }
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.settings = settings
    return app


def _free_memory(runtime: Runtime, store: SessionStore) -> int:
    """The executor's out-of-memory hook: drop cached tuned models and spill idle sessions."""
    runtime.tuned.clear()
    return store.evict_idle()


async def _expire_sessions(server: Server) -> None:
    while True:
        await asyncio.sleep(EXPIRY_INTERVAL_SECONDS)
        try:
            expired = await asyncio.to_thread(server.store.expire)
        except Exception:
            log.exception("session expiry failed")
            continue
        for session_id in expired:
            server.executor.cancel_owner(session_id)
            server.runtime.tuned.forget(session_id)
