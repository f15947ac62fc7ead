"""A typed Python client of a fluidsrv server: upload → pick a face → wait until ready → slide → finalize.

Blocking::

    from fluidsrv.client import Client

    with Client("http://127.0.0.1:8000") as server:
        session = server.create_session("photo.jpg")            # NoFaceError, UnsupportedMediaError, ...
        session.prepare(0, on_progress=lambda step: print(step.stage, step.step, step.total))
        slider = server.directions()[0].name
        for frame in session.sliders([{slider: value} for value in (0.5, 1.0, 2.0)], commit=True):
            print(frame.seq, frame.latency, len(frame.image))    # WebP previews, newest state last
        session.finalize()
        open("edited.jpg", "wb").write(session.result())

Asynchronous: :class:`AsyncClient` and :class:`AsyncSession` take the same calls with ``await`` (``async for`` over
``sliders``); ``async with session.connect() as live`` keeps one websocket open for previews, ``undo`` / ``redo``.
Every refusal of the server is raised as a subclass of :class:`fluidsrv.protocol.ApiError` with its ``status``,
``code`` and ``message``. Only :mod:`fluidsrv.protocol` is shared with the server.
"""

from fluidsrv.client.aio import AsyncClient, AsyncSession
from fluidsrv.client.errors import (
    ApiError,
    BadRequestError,
    BusyError,
    ClientError,
    ConflictError,
    NoFaceError,
    NotFoundError,
    NotReadyError,
    PrepareFailedError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    TokenError,
    TooLargeError,
    UnknownSessionError,
    UnsupportedMediaError,
)
from fluidsrv.client.live import AsyncLiveSession
from fluidsrv.client.sync import Client, LiveSession, Session
from fluidsrv.client.values import Direction, Event, Face, Frame, HistoryStep, Progress, SessionState

__all__ = [
    "ApiError", "AsyncClient", "AsyncLiveSession", "AsyncSession", "BadRequestError", "BusyError", "Client",
    "ClientError", "ConflictError", "Direction", "Event", "Face", "Frame", "HistoryStep", "LiveSession",
    "NoFaceError", "NotFoundError", "NotReadyError", "PrepareFailedError", "Progress", "ProtocolError",
    "RateLimitedError", "ServerError", "Session", "SessionState", "TokenError", "TooLargeError",
    "UnknownSessionError", "UnsupportedMediaError",
]
