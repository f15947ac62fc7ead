"""The blocking client: :class:`Client`, :class:`Session` and :class:`LiveSession` run the asynchronous ones on
an event loop of their own, in a background thread (callbacks such as ``on_progress`` are called there)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from fluidsrv.client.aio import DEFAULT_TIMEOUT, DEFAULT_URL, AsyncClient, AsyncSession, LayerRange, Photo
from fluidsrv.client.live import AsyncLiveSession, Message
from fluidsrv.client.values import Direction, Face, Frame, HistoryStep, Progress, SessionState

T = TypeVar("T")
ProgressCallback = Callable[[Progress], object] | None


class _Loop:
    """An event loop running in a daemon thread; :meth:`run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fluidsrv-client", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """Step an async iterator on the loop; leaving early closes it there."""
        try:
            while True:
                try:
                    yield self.run(anext(iterator))  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                self.run(aclose())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Client:
    """A fluidsrv server (blocking calls); see :class:`~fluidsrv.client.aio.AsyncClient` for the arguments."""

    def __init__(self, base_url: str = DEFAULT_URL, *, admin_token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._loop = _Loop()
        self.aio: AsyncClient = self._loop.run(_make_client(base_url, admin_token, timeout, transport))

    def close(self) -> None:
        """Close the connections and stop the background loop."""
        self._loop.run(self.aio.aclose())
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """The server's URL."""
        return self.aio.base_url

    def health(self) -> dict[str, Any]:
        """``GET /api/health``."""
        return self._loop.run(self.aio.health())

    def config(self) -> dict[str, Any]:
        """``GET /api/config``."""
        return self._loop.run(self.aio.config())

    def directions(self) -> list[Direction]:
        """The shared sliders."""
        return self._loop.run(self.aio.directions())

    def stats(self) -> dict[str, Any]:
        """Executor and session-store counters (needs the admin token)."""
        return self._loop.run(self.aio.stats())

    def switch_stage(self, stage: str, name: str) -> dict[str, Any]:
        """Switch a stage's plugin at run time (needs the admin token)."""
        return self._loop.run(self.aio.switch_stage(stage, name))

    def create_session(self, photo: Photo, filename: str | None = None) -> Session:
        """Upload a photo (bytes or a path) and return its session."""
        return Session(self._loop, self._loop.run(self.aio.create_session(photo, filename)))

    def session(self, session_id: str, token: str) -> Session:
        """Open a session made earlier, by its id and token."""
        return Session(self._loop, self._loop.run(self.aio.session(session_id, token)))

    def tools(self) -> dict[str, bool]:
        """Which latent tools the server offers."""
        return self._loop.run(self.aio.tools())

    def mix(self, a: Session, b: Session, *, layers: LayerRange = "coarse", percent: float | None = None) -> bytes:
        """B's styles on a layer range of A, or A made ``percent`` % more like B; a PNG."""
        return self._loop.run(self.aio.mix(a.aio, b.aio, layers=layers, percent=percent))

    def morph(self, faces: Sequence[Session], *, frames_per_transition: int = 24, loop: bool = False,
              video_format: str = "mp4") -> bytes:
        """A video morphing through 2–8 prepared faces."""
        return self._loop.run(self.aio.morph([face.aio for face in faces], frames_per_transition=frames_per_transition,
                                             loop=loop, video_format=video_format))

    def loop(self, face: Session, *, layers: LayerRange | None = None, frames: int = 48, amplitude: float = 1.0,
             seed: int = 0, video_format: str = "mp4") -> bytes:
        """A seamless "deform loop" video of one prepared face."""
        return self._loop.run(self.aio.loop(face.aio, layers=layers, frames=frames, amplitude=amplitude, seed=seed,
                                            video_format=video_format))


async def _make_client(base_url: str, admin_token: str | None, timeout: float,
                       transport: httpx.AsyncBaseTransport | None) -> AsyncClient:
    return AsyncClient(base_url, admin_token=admin_token, timeout=timeout, transport=transport)


class Session:
    """One session (blocking calls); see :class:`~fluidsrv.client.aio.AsyncSession`."""

    def __init__(self, loop: _Loop, session: AsyncSession) -> None:
        self._loop, self.aio = loop, session

    def __repr__(self) -> str:
        return f"Session({self.session_id!r}, status={self.state.status!r})"

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self.aio.session_id

    @property
    def token(self) -> str:
        """The session's token."""
        return self.aio.token

    @property
    def state(self) -> SessionState:
        """The session as last read."""
        return self.aio.state

    @property
    def faces(self) -> tuple[Face, ...]:
        """The faces found, left to right."""
        return self.aio.faces

    def refresh(self, thumbnails: bool = False) -> SessionState:
        """Read the session's state again."""
        return self._loop.run(self.aio.refresh(thumbnails))

    def pick_face(self, index: int = 0) -> SessionState:
        """Start preparing face ``index``."""
        return self._loop.run(self.aio.pick_face(index))

    def wait_ready(self, on_progress: ProgressCallback = None, on_image: Callable[[Frame], object] | None = None,
                   timeout: float | None = None) -> SessionState:
        """Wait until the picked face is ready (``on_progress`` is called on the client's loop thread)."""
        return self._loop.run(self.aio.wait_ready(on_progress, on_image, timeout))

    def prepare(self, index: int = 0, on_progress: ProgressCallback = None,
                timeout: float | None = None) -> SessionState:
        """Pick face ``index`` and wait until it is ready."""
        return self._loop.run(self.aio.prepare(index, on_progress, timeout))

    def connect(self) -> LiveSession:
        """The session's websocket (a context manager: ``with session.connect() as live: ...``)."""
        return LiveSession(self._loop, self._loop.run(self.aio.open_socket()))

    def sliders(self, states: Sequence[Mapping[str, float]], *, rate: float | None = None, commit: bool = False,
                on_event: Callable[[Message], object] | None = None) -> Iterator[Frame]:
        """Send slider states over a websocket of its own and yield their preview frames."""
        return self._loop.iterate(self.aio.sliders(states, rate=rate, commit=commit, on_event=on_event))

    def undo(self) -> SessionState:
        """Step back in the committed slider history (REST)."""
        return self._loop.run(self.aio.undo())

    def redo(self) -> SessionState:
        """Step forward in the committed slider history (REST)."""
        return self._loop.run(self.aio.redo())

    def finalize(self, on_progress: ProgressCallback = None) -> SessionState:
        """Render the edit at full quality into the photo (waits)."""
        return self._loop.run(self.aio.finalize(on_progress))

    def result(self) -> bytes:
        """The finalized JPEG."""
        return self._loop.run(self.aio.result())

    def original(self) -> bytes:
        """The uploaded photo, byte for byte."""
        return self._loop.run(self.aio.original())

    def delete(self) -> None:
        """Delete the session."""
        self._loop.run(self.aio.delete())

    def directions(self) -> list[Direction]:
        """This session's sliders."""
        return self._loop.run(self.aio.directions())

    def add_sefa(self, layers: LayerRange, k: int = 5) -> list[Direction]:
        """Add SeFa's top ``k`` directions of a layer range as sliders of this session."""
        return self._loop.run(self.aio.add_sefa(layers, k))

    def add_text(self, prompt: str, layers: LayerRange | None = None) -> list[Direction]:
        """Add the CLIP direction of a text prompt as a slider."""
        return self._loop.run(self.aio.add_text(prompt, layers))


class LiveSession:
    """A session's open websocket (blocking calls); see :class:`~fluidsrv.client.live.AsyncLiveSession`."""

    def __init__(self, loop: _Loop, live: AsyncLiveSession) -> None:
        self._loop, self.aio = loop, live

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @property
    def state(self) -> SessionState:
        """The session as the socket last described it."""
        return self.aio.state

    def close(self) -> None:
        """Close the websocket."""
        self._loop.run(self.aio.close())

    def wait_ready(self, on_progress: ProgressCallback = None, on_image: Callable[[Frame], object] | None = None,
                   timeout: float | None = None) -> SessionState:
        """Wait until the face is ready."""
        return self._loop.run(self.aio.wait_ready(on_progress, on_image, timeout))

    def sliders(self, states: Sequence[Mapping[str, float]], *, rate: float | None = None, commit: bool = False,
                on_event: Callable[[Message], object] | None = None) -> Iterator[Frame]:
        """Send slider states and yield their preview frames."""
        return self._loop.iterate(self.aio.sliders(states, rate=rate, commit=commit, on_event=on_event))

    def preview(self, values: Mapping[str, float], commit: bool = False) -> Frame:
        """Send one slider state and return its frame."""
        return self._loop.run(self.aio.preview(values, commit))

    def undo(self) -> HistoryStep:
        """Step back in the slider history; the state now and its frame."""
        return self._loop.run(self.aio.undo())

    def redo(self) -> HistoryStep:
        """Step forward in the slider history; the state now and its frame."""
        return self._loop.run(self.aio.redo())

    def ping(self) -> float:
        """Seconds for a ping's pong."""
        return self._loop.run(self.aio.ping())
