"""The per-session websocket: slider states in; preview frames, job progress and events out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.websockets import WebSocket, WebSocketDisconnect

from fluidsrv.errors import UserError
from fluidsrv.protocol import HistoryMessage, PingMessage, SliderMessage, encode_frame, event, parse_client_message
from fluidsrv.service import (
    PREVIEW_FORMAT,
    DeletedEvent,
    EditService,
    Event,
    FailedEvent,
    FinalizedEvent,
    IdentityEvent,
    ProgressEvent,
    ReadyEvent,
    Session,
    Status,
)
from fluidsrv.web.paths import hide_request_paths
from fluidsrv.web.requests import TokenBucket, service_of, token_of
from fluidsrv.web.views import progress_view, session_view

log = logging.getLogger(__name__)

DELETED_CLOSE_CODE = 4410


@dataclass(eq=False)
class Connection:
    """One open websocket of a session.

    Preview frames go out through one slot: while a frame is being sent, only the newest next frame waits
    (older ones are dropped), so a client that reads slowly never makes the server queue frames.
    """

    socket: WebSocket
    service: EditService
    session: Session
    messages: TokenBucket  # the message rate limit
    last_sent: int = -1  # arrival number of the newest preview sent (older ones are dropped)
    arrivals: int = 0
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting_frame: tuple[int, bytes] | None = None  # (arrival, frame) not sent yet
    sending: bool = False
    origin: str = field(default_factory=lambda: uuid.uuid4().hex)  # tells this socket's previews from others'

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

    async def send_text_and_frame(self, text: str, frame: bytes | None) -> None:
        """Send a JSON event and its frame back to back, so no other message comes between them."""
        async with self.send_lock:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self.socket.send_text(text)
                if frame is not None:
                    await self.socket.send_bytes(frame)

    async def send_error(self, code: str, message: str, **fields: int | None) -> None:
        """Send an error event (the socket stays open); ``seq=`` names the message it answers."""
        await self.send_text(event("error", code=code, message=hide_request_paths(self.socket, message), **fields))

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

    def on_event(self, happened: Event) -> None:
        """Forward a service event to this client (on the event loop, without waiting)."""
        self.service.spawn(self._forward(happened))

    async def _forward(self, happened: Event) -> None:
        if isinstance(happened, ProgressEvent):
            progress = happened.progress
            text = event("progress", **progress_view(progress.stage, progress.step, progress.total, progress.message,
                                                     progress.queued))
            frame = None
            if happened.frame is not None:
                frame = encode_frame(happened.frame_step, happened.frame, PREVIEW_FORMAT, kind="progress")
            await self.send_text_and_frame(text, frame)
        elif isinstance(happened, ReadyEvent):
            await self.send_text(event("ready", **session_view(happened.session)))
        elif isinstance(happened, FailedEvent):
            await self.send_error(happened.code, happened.message)
        elif isinstance(happened, FinalizedEvent):
            await self.send_text(event("finalized", result=f"/api/sessions/{happened.session_id}/result"))
        elif isinstance(happened, IdentityEvent):
            await self.send_text(event("identity", **happened.reading.describe()))
        elif isinstance(happened, DeletedEvent):
            await self.send_error("session_deleted", "this session was deleted")
            with contextlib.suppress(RuntimeError):
                await self.socket.close(code=DELETED_CLOSE_CODE)


async def session_socket(socket: WebSocket) -> None:
    """The per-session websocket: slider states in, preview frames and job events out."""
    service = service_of(socket)
    await socket.accept()
    try:
        session = await service.open(socket.path_params["session_id"], token_of(socket))
        release = service.attach_socket(session)
    except UserError as error:  # no such session, or too many sockets on it
        await socket.send_text(event("error", code=error.code, message=error.message))
        await socket.close(code=4000 + error.status)
        return
    rate = service.settings.max_ws_messages_per_second
    connection = Connection(socket, service, session, TokenBucket(rate, burst=rate, now=time.monotonic()))
    unsubscribe = service.subscribe(session.id, connection.on_event)
    try:
        await connection.send_text(event("state", **session_view(session), identity=service.identity.report(session)))
        service.identity.warm()  # an editor opened: the meter's worker starts before the first slider moves
        joined = service.latest_progress(session.id)
        if joined is not None:  # joined a running job: show where it is
            await connection._forward(joined)
        await _receive_loop(connection)
    finally:
        try:
            unsubscribe()
        finally:
            release()


async def _receive_loop(connection: Connection) -> None:
    service = connection.service
    while True:
        message = await connection.socket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            await connection.send_error("malformed_message", "send JSON text messages, not binary")
            continue
        if not connection.messages.take(time.monotonic()):
            await connection.send_error("rate_limited", "too many messages; slow down", seq=None)
            continue
        try:
            parsed = parse_client_message(text, service.settings.max_ws_message_bytes)
        except UserError as error:
            await connection.send_error(error.code, error.message, seq=None)
            continue
        if isinstance(parsed, PingMessage):
            await connection.send_text(event("pong"))
            continue
        try:
            if isinstance(parsed, SliderMessage):
                await _on_sliders(connection, parsed)
            else:
                await _on_history(connection, parsed)
        except UserError as error:
            await connection.send_error(error.code, error.message, seq=parsed.seq)
        except Exception:  # a bug must cost this message, never the connection
            log.exception("a websocket message of session %s failed", connection.session.id[:8])
            await connection.send_error("internal_error", "the server failed on this message; see its log",
                                        seq=parsed.seq)


async def _on_sliders(connection: Connection, message: SliderMessage) -> None:
    session = connection.session
    if session.status != Status.READY:
        await connection.send_error("not_ready", "the face is not ready yet", seq=message.seq)
        return
    connection.service.set_sliders(session, dict(message.values), commit=message.commit)
    _request_preview(connection, message.seq, dict(message.values))
    if message.commit:  # a committed state is on disk before the client hears it is saved
        await connection.service.save_edit(session)
        await connection.send_text(event("saved", seq=message.seq))


async def _on_history(connection: Connection, message: HistoryMessage) -> None:
    session = connection.session
    changed = await connection.service.step_history(session, message.action)
    history = session.edit.history
    await connection.send_text(event("sliders", seq=message.seq, values=session.edit.sliders, changed=changed,
                                     can_undo=bool(history.undo_stack), can_redo=bool(history.redo_stack)))
    if session.status == Status.READY:
        _request_preview(connection, message.seq, dict(session.edit.sliders))


def _request_preview(connection: Connection, seq: int, values: dict[str, float]) -> None:
    """Queue a preview of ``values``; only the newest queued state of this connection is rendered."""
    connection.arrivals += 1
    connection.service.spawn(_send_preview(connection, seq, connection.arrivals, values))


async def _send_preview(connection: Connection, seq: int, arrival: int, values: dict[str, float]) -> None:
    try:
        image = await connection.service.preview(connection.session, values, origin=connection.origin)
    except asyncio.CancelledError:
        return
    except UserError as error:
        await connection.send_error(error.code, error.message, seq=seq)
        return
    except Exception as error:
        log.exception("preview failed")
        await connection.send_error("preview_failed", str(error) or type(error).__name__, seq=seq)
        return
    if image is not None:
        await connection.offer_preview(arrival, encode_frame(seq, image, PREVIEW_FORMAT))
        connection.service.identity.offer(connection.session, values, image)  # measured later, off this path

