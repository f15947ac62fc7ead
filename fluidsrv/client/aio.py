"""The asynchronous client: :class:`AsyncClient` (the server) and :class:`AsyncSession` (one session, its token).

REST goes through ``httpx.AsyncClient``, the live previews through :class:`~fluidsrv.client.live.AsyncLiveSession`.
Every refusal is raised as its typed exception (:mod:`fluidsrv.client.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from fluidsrv.client.errors import NotReadyError, ProtocolError, error_from_body
from fluidsrv.client.live import AsyncLiveSession, Message, SliderStates
from fluidsrv.client.values import Direction, Face, Frame, Progress, SessionState

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 600.0  # finalize answers once the photo is made
Photo = bytes | str | os.PathLike[str]
LayerRange = str | tuple[int, int]
"""A layer range: a preset ("coarse", "middle", "fine") or (start, stop)."""


class AsyncClient:
    """A fluidsrv server at ``base_url``: its config, directions, sessions and latent tools.

    ``admin_token`` is sent to the admin routes (``stats``, ``switch_stage``); ``timeout`` bounds each request
    (finalize answers once the photo is made); ``transport`` may replace httpx's network (e.g. a mock in tests).
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, admin_token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        if "://" not in self.base_url:
            self.base_url = "http://" + self.base_url
        self.admin_token = admin_token
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, *, token: str | None = None, admin: bool = False,
                      **options: Any) -> httpx.Response:
        """Send one request (``token``: a session's, ``admin``: the admin token); raise the refusal typed."""
        headers = dict(options.pop("headers", {}))
        bearer = self.admin_token if admin else token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            response = await self.http.request(method, path, headers=headers, **options)
        except httpx.TimeoutException:
            raise ProtocolError(f"{method} {path} got no answer within {self.http.timeout.read} s", 504,
                                "timeout") from None
        except httpx.TransportError as error:
            raise ProtocolError(f"cannot reach {self.base_url}: {error}", 503, "unreachable") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise error_from_body(response.status_code, body)
        return response

    async def get_json(self, path: str, **options: Any) -> Any:
        """``GET path`` as JSON."""
        return _json(await self.request("GET", path, **options))

    def websocket_url(self, path: str) -> str:
        """The ``ws://`` (or ``wss://``) URL of a server path."""
        return "ws" + self.base_url.removeprefix("http") + path

    # ---- the server ---------------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """``GET /api/health``: ``{"status": "ok", "version": ...}``."""
        return dict(await self.get_json("/api/health"))

    async def config(self) -> dict[str, Any]:
        """``GET /api/config``: the generator, plugins, active stages, features and limits."""
        return dict(await self.get_json("/api/config"))

    async def directions(self) -> list[Direction]:
        """The shared sliders (``GET /api/directions``)."""
        return [Direction.from_json(item) for item in (await self.get_json("/api/directions"))["directions"]]

    async def stats(self) -> dict[str, Any]:
        """Executor and session-store counters (needs the admin token)."""
        return dict(await self.get_json("/api/stats", admin=True))

    async def switch_stage(self, stage: str, name: str) -> dict[str, Any]:
        """Switch a stage's plugin at run time (needs the admin token); returns the active plugins."""
        response = await self.request("POST", "/api/config/stages", admin=True, json={"stage": stage, "name": name})
        return dict(_json(response)["active"])

    # ---- sessions -----------------------------------------------------------------------------------------

    async def create_session(self, photo: Photo, filename: str | None = None) -> AsyncSession:
        """Upload a photo (bytes or a path); the session that comes back lists its faces, left to right."""
        if isinstance(photo, bytes):
            data, name = photo, filename or "photo.jpg"
        else:
            path = Path(photo)
            data, name = await asyncio.to_thread(path.read_bytes), filename or path.name
        response = await self.request("POST", "/api/sessions",
                                      files={"file": (name, data, "application/octet-stream")})
        body = _json(response)
        return AsyncSession(self, str(body["session_id"]), str(body["token"]), SessionState.from_json(body))

    async def session(self, session_id: str, token: str) -> AsyncSession:
        """Open a session made earlier, by its id and token."""
        session = AsyncSession(self, session_id, token, None)
        await session.refresh()
        return session

    # ---- the latent tools ---------------------------------------------------------------------------------

    async def tools(self) -> dict[str, bool]:
        """Which latent tools the server offers."""
        return dict(await self.get_json("/api/tools"))

    async def mix(self, a: AsyncSession, b: AsyncSession, *, layers: LayerRange = "coarse",
                  percent: float | None = None) -> bytes:
        """B's styles on a layer range of A, or (``percent``) A made that much more like B; a PNG."""
        body: dict[str, Any] = {"faces": [a.ref(), b.ref()]}
        body.update({"percent": percent} if percent is not None else {"layers": _layers(layers)})
        return (await self.request("POST", "/api/tools/mix", json=body)).content

    async def morph(self, faces: Sequence[AsyncSession], *, frames_per_transition: int = 24, loop: bool = False,
                    video_format: str = "mp4") -> bytes:
        """A video morphing through 2–8 prepared faces (MP4 or GIF bytes)."""
        body = {"faces": [face.ref() for face in faces], "frames_per_transition": frames_per_transition,
                "loop": loop, "format": video_format}
        return (await self.request("POST", "/api/tools/morph", json=body)).content

    async def loop(self, face: AsyncSession, *, layers: LayerRange | None = None, frames: int = 48,
                   amplitude: float = 1.0, seed: int = 0, video_format: str = "mp4") -> bytes:
        """A seamless "deform loop" video of one prepared face (MP4 or GIF bytes)."""
        body = {"face": face.ref(), "layers": None if layers is None else _layers(layers), "frames": frames,
                "amplitude": amplitude, "seed": seed, "format": video_format}
        return (await self.request("POST", "/api/tools/loop", json=body)).content


class AsyncSession:
    """One session of the server: its id, its token and its ``state`` as last read."""

    def __init__(self, client: AsyncClient, session_id: str, token: str, state: SessionState | None) -> None:
        self.client, self.session_id, self.token = client, session_id, token
        self._state = state

    def __repr__(self) -> str:
        return f"AsyncSession({self.session_id!r}, status={self._state.status if self._state else None!r})"

    @property
    def state(self) -> SessionState:
        """The session as last read (created, refreshed, picked, finalized...)."""
        if self._state is None:
            raise RuntimeError("the session has not been read yet; await refresh()")
        return self._state

    @property
    def faces(self) -> tuple[Face, ...]:
        """The faces found in the photo, left to right."""
        return self.state.faces

    def ref(self) -> dict[str, str]:
        """The session as the latent tools name it."""
        return {"session_id": self.session_id, "token": self.token}

    @property
    def path(self) -> str:
        """The session's REST path."""
        return f"/api/sessions/{self.session_id}"

    async def _call(self, method: str, suffix: str = "", **options: Any) -> httpx.Response:
        return await self.client.request(method, self.path + suffix, token=self.token, **options)

    async def _update(self, method: str, suffix: str = "", **options: Any) -> SessionState:
        self._state = SessionState.from_json(_json(await self._call(method, suffix, **options)))
        return self._state

    async def refresh(self, thumbnails: bool = False) -> SessionState:
        """Read the session's state again (with the faces' thumbnails when asked)."""
        return await self._update("GET", params={"thumbnails": "1"} if thumbnails else None)

    async def pick_face(self, index: int = 0) -> SessionState:
        """Start preparing face ``index`` (align → encode → fine-tune → distil); :meth:`wait_ready` waits for it."""
        return await self._update("POST", "/face", json={"index": index})

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncLiveSession]:
        """The session's websocket, open for the ``async with`` block."""
        live = await self.open_socket()
        try:
            yield live
        finally:
            await live.close()

    async def open_socket(self) -> AsyncLiveSession:
        """Open the session's websocket (close it with ``await live.close()``)."""
        return await AsyncLiveSession.open(self.client.websocket_url(self.path + "/ws"), self.token)

    async def wait_ready(self, on_progress: Callable[[Progress], object] | None = None,
                         on_image: Callable[[Frame], object] | None = None,
                         timeout: float | None = None) -> SessionState:
        """Wait until the picked face is ready; ``on_progress`` gets each step, ``on_image`` each job image.

        Raises :class:`NotReadyError` when no face was picked, :class:`PrepareFailedError` when the prepare fails.
        """
        async with self.connect() as live:
            if live.state.status == "uploaded":
                raise NotReadyError(409, "not_ready", "pick a face before waiting for it to be ready")
            self._state = await live.wait_ready(on_progress, on_image, timeout)
        return self._state

    async def prepare(self, index: int = 0, on_progress: Callable[[Progress], object] | None = None,
                      timeout: float | None = None) -> SessionState:
        """Pick face ``index`` and wait until it is ready."""
        await self.pick_face(index)
        return await self.wait_ready(on_progress, timeout=timeout)

    async def sliders(self, states: SliderStates, *, rate: float | None = None, commit: bool = False,
                      on_event: Callable[[Message], object] | None = None) -> AsyncIterator[Frame]:
        """Send slider states over a websocket of its own and yield their preview frames (see
        :meth:`AsyncLiveSession.sliders`)."""
        async with self.connect() as live:
            async for frame in live.sliders(states, rate=rate, commit=commit, on_event=on_event):
                yield frame

    async def undo(self) -> SessionState:
        """Step back in the committed slider history (REST; ``state.raw["changed"]`` says whether it moved)."""
        return await self._update("POST", "/undo")

    async def redo(self) -> SessionState:
        """Step forward in the committed slider history (REST)."""
        return await self._update("POST", "/redo")

    async def finalize(self, on_progress: Callable[[Progress], object] | None = None) -> SessionState:
        """Render the edit at full quality into the photo (waits; ``on_progress`` gets its steps)."""
        if on_progress is None:
            return await self._update("POST", "/finalize")
        async with self.connect() as live:
            follower = asyncio.ensure_future(live.follow_progress(on_progress))
            try:
                return await self._update("POST", "/finalize")
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)

    async def result(self) -> bytes:
        """The finalized photo: a JPEG at the upload's resolution."""
        return (await self._call("GET", "/result")).content

    async def original(self) -> bytes:
        """The uploaded photo, byte for byte."""
        return (await self._call("GET", "/original")).content

    async def delete(self) -> None:
        """Delete the session and everything it stored."""
        await self._call("DELETE")

    async def directions(self) -> list[Direction]:
        """This session's sliders: the shared ones and the ones it added."""
        return [Direction.from_json(item) for item in _json(await self._call("GET", "/directions"))["directions"]]

    async def add_sefa(self, layers: LayerRange, k: int = 5) -> list[Direction]:
        """Add SeFa's top ``k`` directions of a layer range as sliders of this session."""
        response = await self._call("POST", "/directions/sefa", json={"layers": _layers(layers), "k": k})
        return [Direction.from_json(item) for item in _json(response)["directions"]]

    async def add_text(self, prompt: str, layers: LayerRange | None = None) -> list[Direction]:
        """Add the CLIP direction of a text prompt as a slider (NotFoundError without the CLIP plugin)."""
        body = {"prompt": prompt, "layers": None if layers is None else _layers(layers)}
        return [Direction.from_json(item) for item in _json(await self._call("POST", "/directions/text",
                                                                             json=body))["directions"]]


def _layers(layers: LayerRange) -> str | list[int]:
    return layers if isinstance(layers, str) else [int(layers[0]), int(layers[1])]


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ProtocolError(f"{response.request.method} {response.request.url.path} answered "
                            f"{response.status_code} without JSON") from None
