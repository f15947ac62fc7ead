"""One open websocket of a session: slider states out; preview frames, job progress and events in.

The wire format is :mod:`fluidsrv.protocol`'s. Every slider state sent gets the next ``seq`` of this connection
and its send time, so each preview frame says which state it shows and how long it took.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from fluidsrv.client.errors import ClientError, PrepareFailedError, ProtocolError, error_for
from fluidsrv.client.values import FAILED_STATUSES, Event, Frame, HistoryStep, Progress, SessionState
from fluidsrv.protocol import MAX_SEQ, decode_frame

MAX_FRAME_BYTES = 64 * 1024 * 1024
Message = Frame | Progress | SessionState | Event
"""What :meth:`AsyncLiveSession.receive` returns: a frame, a job's progress, the session (``state``, ``ready``) or
another event (``saved``, ``sliders``, ``finalized``, ``identity``, ``pong``)."""
SliderStates = Iterable[Mapping[str, float]] | AsyncIterable[Mapping[str, float]]


class AsyncLiveSession:
    """A session's open websocket (use :meth:`AsyncSession.connect`); ``state`` is the session as last described."""

    def __init__(self, socket: ClientConnection, state: SessionState) -> None:
        self._socket = socket
        self.state = state
        self._seq = 0
        self._sent: dict[int, float] = {}  # seq -> when that state was sent, until its frame arrived

    @classmethod
    async def open(cls, url: str, token: str, open_timeout: float = 60.0) -> AsyncLiveSession:
        """Connect to a session's websocket ``url`` and read its ``state`` (typed errors: unknown session...)."""
        try:
            socket = await connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                   max_size=MAX_FRAME_BYTES, open_timeout=open_timeout)
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as error:
            raise ProtocolError(f"cannot open the websocket {url.split('?')[0]}: {error}", 503,
                                "unreachable") from None
        live = cls(socket, SessionState(session_id="", status="", width=0, height=0, faces=()))
        try:
            first = await live.receive()
        except BaseException:
            await live.close()
            raise
        if not isinstance(first, SessionState):
            await live.close()
            raise ProtocolError(f"the websocket began with {first!r} instead of the session's state")
        return live

    async def close(self) -> None:
        """Close the websocket."""
        await self._socket.close()

    async def __aenter__(self) -> AsyncLiveSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- reading ------------------------------------------------------------------------------------------

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message; an ``error`` event is raised as its typed exception (``seq``: what it answers)."""
        try:
            raw = await asyncio.wait_for(self._socket.recv(), timeout)
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else 1006
            status = code - 4000 if 4400 <= code < 4600 else 502  # the server closes with 4000 + an HTTP status
            raise ProtocolError(f"the websocket closed (code {code})", status, "socket_closed") from None
        if isinstance(raw, bytes):
            return self._frame(raw)
        return self._event(raw)

    def _frame(self, raw: bytes) -> Frame:
        try:
            frame = decode_frame(raw)
        except (ValueError, KeyError) as error:
            raise ProtocolError(f"a binary message is not a fluidsrv frame: {error}") from None
        sent_at = self._sent.get(frame.seq) if frame.kind == "preview" else None
        return Frame(frame.kind, frame.image_format, frame.seq, frame.image, time.perf_counter(), sent_at)

    def _event(self, raw: str) -> Message:
        try:
            data = json.loads(raw)
            kind = data["type"]
        except (ValueError, KeyError, TypeError):
            raise ProtocolError(f"the server sent a text message that is not an event: {raw[:80]!r}") from None
        if kind == "error":
            raise error_for(str(data.get("code", "error")), str(data.get("message", "")), seq=data.get("seq"))
        if kind == "progress":
            return Progress.from_json(data)
        if kind in ("state", "ready"):
            self.state = SessionState.from_json(data)
            return self.state
        return Event(str(kind), data)

    # ---- the prepare --------------------------------------------------------------------------------------

    async def wait_ready(self, on_progress: Callable[[Progress], object] | None = None,
                         on_image: Callable[[Frame], object] | None = None,
                         timeout: float | None = None) -> SessionState:
        """Wait until the face is prepared; ``on_progress`` gets each step, ``on_image`` each intermediate image.

        Raises :class:`PrepareFailedError` when the prepare fails (or had failed), :class:`TimeoutError` after
        ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not self.state.ready:
                if self.state.status in FAILED_STATUSES:
                    raise PrepareFailedError(500, f"prepare_{self.state.status}",
                                             self.state.error or f"preparing the face ended {self.state.status}")
                message = await self.receive()
                if isinstance(message, Progress) and on_progress is not None:
                    on_progress(message)
                elif isinstance(message, Frame) and message.kind == "progress" and on_image is not None:
                    on_image(message)
        return self.state

    async def follow_progress(self, on_progress: Callable[[Progress], object]) -> None:
        """Call ``on_progress`` with every progress event until the socket closes (run it as a task)."""
        while True:
            try:
                message = await self.receive()
            except ProtocolError:
                return
            except ClientError:
                continue
            if isinstance(message, Progress):
                on_progress(message)

    # ---- sliders and history ------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = self._seq + 1 if self._seq < MAX_SEQ else 1
        return self._seq

    async def _send(self, message: dict[str, Any]) -> int:
        seq = self._next_seq()
        self._sent[seq] = time.perf_counter()
        await self._socket.send(json.dumps({**message, "seq": seq}))
        return seq

    async def sliders(self, states: SliderStates, *, rate: float | None = None, commit: bool = False,
                      on_event: Callable[[Message], object] | None = None) -> AsyncIterator[Frame]:
        """Send each slider state (the whole state, {name: value}) and yield the preview frames as they arrive.

        ``rate``: states per second (default: as fast as they come); the server renders only the newest waiting
        state, so some states get no frame. The iteration ends with the frame of the last state; with ``commit``
        the last state is recorded in the undo history, and the iteration ends once it is on disk too.
        ``on_event`` gets every other message that arrives meanwhile (e.g. ``identity`` events, job progress).
        """
        last: list[int] = []  # the last seq, once every state is sent
        sender = asyncio.ensure_future(self._send_states(states, rate, commit, last))
        answered = 0  # the newest seq answered (by its frame, or superseded)
        saved: set[object] = set()  # the seqs of committed states on disk
        try:
            while not (sender.done() and (not last or (answered >= last[0] and (not commit or last[0] in saved)))):
                message = await self._receive_while(sender)
                if message is None:
                    continue
                if isinstance(message, BaseException):
                    if isinstance(message, ClientError) and message.code == "superseded" and message.seq:
                        answered = max(answered, message.seq)  # another socket's newer state was rendered
                        continue
                    raise message
                if isinstance(message, Frame) and message.kind == "preview" and message.seq in self._sent:
                    answered = max(answered, message.seq)
                    self._forget_sent(message.seq)
                    yield message
                elif isinstance(message, Event) and message.type == "saved":
                    saved.add(message.data.get("seq"))
                elif on_event is not None:
                    on_event(message)
        finally:
            if not sender.done():
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        sender.result()  # a failure of the states' iterator

    async def _send_states(self, states: SliderStates, rate: float | None, commit: bool, last: list[int]) -> None:
        """Send the states (paced at ``rate``); the last seq goes into ``last`` once every state is sent.

        A list or another plain iterable is read one state ahead, so its last state carries ``commit``; the
        states of an async iterable go out as they come, and ``commit`` sends the last one again, committed.
        """
        began, sent = time.perf_counter(), 0

        async def send(values: dict[str, float], final: bool = False) -> int:
            nonlocal sent
            if rate:
                await asyncio.sleep(max(0.0, began + sent / rate - time.perf_counter()))
            sent += 1
            return await self._send({"type": "sliders", "values": values, "commit": final and commit})

        held: dict[str, float] | None = None
        if isinstance(states, AsyncIterable):
            async for values in states:
                held = dict(values)
                seq = await send(held)
            if held is not None and commit:
                seq = await send(held, final=True)
        else:
            for values in states:
                if held is not None:
                    await send(held)
                held = dict(values)
            if held is not None:
                seq = await send(held, final=True)
        if held is not None:
            last.append(seq)

    async def _receive_while(self, sender: asyncio.Future[None]) -> Message | BaseException | None:
        """The next message (an error as its exception), or None when ``sender`` ended first."""
        receiving = asyncio.ensure_future(self.receive())
        if not sender.done():
            either: set[asyncio.Future[Any]] = {receiving, sender}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not receiving.done():
                receiving.cancel()
                await asyncio.gather(receiving, return_exceptions=True)
                return None
        try:
            return await receiving
        except ClientError as error:
            return error

    def _forget_sent(self, seq: int) -> None:
        for old in [old for old in self._sent if old <= seq]:
            del self._sent[old]

    async def preview(self, values: Mapping[str, float], commit: bool = False) -> Frame:
        """Send one slider state and return its preview frame (with ``commit``: recorded and saved first)."""
        frames = [frame async for frame in self.sliders([values], commit=commit)]
        if not frames:
            raise ProtocolError("the server answered a slider state without a frame")
        return frames[-1]

    async def undo(self) -> HistoryStep:
        """Step back in the committed slider history; returns the state now and its preview frame."""
        return await self._history("undo")

    async def redo(self) -> HistoryStep:
        """Step forward in the committed slider history; returns the state now and its preview frame."""
        return await self._history("redo")

    async def _history(self, action: str) -> HistoryStep:
        seq = await self._send({"type": action})
        answer: Event | None = None
        while True:
            message = await self.receive()
            if isinstance(message, Event) and message.type == "sliders" and message.data.get("seq") == seq:
                answer = message
                if not self.state.ready:
                    break
            elif isinstance(message, Frame) and message.kind == "preview" and message.seq == seq and answer:
                self._forget_sent(seq)
                break
        data = answer.data
        frame = message if isinstance(message, Frame) else None
        return HistoryStep(bool(data.get("changed")), dict(data.get("values") or {}), bool(data.get("can_undo")),
                           bool(data.get("can_redo")), frame)

    async def ping(self) -> float:
        """Send a ping; return the seconds until its pong."""
        began = time.perf_counter()
        await self._socket.send(json.dumps({"type": "ping"}))
        while not (isinstance(message := await self.receive(), Event) and message.type == "pong"):
            pass
        return time.perf_counter() - began

