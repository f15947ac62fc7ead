"""The stages on Ray Serve, seen from the ingress: each call is a handle call to its deployment.

- **detect** goes to the detect deployment with the upload's bytes;
- **prepare** streams from the prepare deployment: progress events, then the prepared face (the replica reads the
  upload from the shared storage; the ingress writes the result, so it stays the one writer of sessions);
- **preview** goes to the preview deployment with ``multiplexed_model_id = "session_id:version"``, so a session's
  tuned models stay loaded on one replica; only the edited w+ travels, and the frame comes back as the call's
  result (no queue on the preview path). Like the local executor, a session has one preview slot: a newer slider
  state replaces one still waiting, and at most one call per session is in flight;
- **finalize** goes to the finalize deployment, multiplexed the same way.

A replica that died (killed, out of memory, its node gone) is answered by a retry: the next replica loads the
session from storage, so the client sees no error and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import ray.exceptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from fluidsrv.backends.stages import EditedWs
from fluidsrv.errors import UserError
from fluidsrv.executor import SUPERSEDED, ExecutorError, Superseded
from fluidsrv.image_io import DecodedImage
from fluidsrv.pipeline import FinalRenders
from fluidsrv.session.model import Prepared, Upload
from fluidsrv.stages import Face, Progress

log = logging.getLogger(__name__)

T = TypeVar("T")

PREVIEWS_PER_REPLICA = 2
"""Preview calls on their way to one preview replica at once, all sessions together (one rendering, one being
composed and encoded). More would wait in the replica's queue with a slider state that is old by the time it
renders; held back at the ingress, a session's waiting state is still replaced by its newest."""
RETRIES = 4  # attempts of a call whose replica died
RETRY_PAUSE_SECONDS = 0.25  # doubled after each failed attempt
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError,
    DeploymentUnavailableError, BackPressureError)
"""Errors of the cluster, not of the work: the call is sent again (to another replica)."""


class StaleSessionError(UserError):
    """A replica was asked for a session version that storage does not hold (yet, or any more)."""

    status = 409
    code = "stale_session"


@dataclass(frozen=True)
class StageHandles:
    """The handles of the four stage deployments."""

    detect: DeploymentHandle
    prepare: DeploymentHandle
    preview: DeploymentHandle
    finalize: DeploymentHandle


def model_id(session_id: str, version: int) -> str:
    """The multiplexed model id of a session's tuned models: changes whenever the face is prepared again."""
    return f"{session_id}:{version}"


class LatestWins:
    """One session's preview slot: one call in flight, and only the newest waiting state is sent next.

    With a ``gate`` (shared by every session's slot) a call is sent only once the gate lets it through; until then
    a newer state still replaces the waiting one, so what is rendered is as fresh as it can be.
    """

    def __init__(self, gate: asyncio.Semaphore | None = None) -> None:
        self._waiting: tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._gate = gate

    async def submit(self, call: Callable[[], Awaitable[T]]) -> T | Superseded:
        """Run ``call`` after the one in flight; SUPERSEDED if a newer call replaced it while it waited."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.drop_waiting()
        self._waiting = (call, future)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._run_waiting())
        result: T | Superseded = await future
        return result

    def drop_waiting(self) -> None:
        """Answer the waiting call (if any) with SUPERSEDED."""
        if self._waiting is not None:
            _, future = self._waiting
            self._waiting = None
            if not future.done():
                future.set_result(SUPERSEDED)

    async def close(self) -> None:
        """Answer the waiting call and cancel the one in flight."""
        self.drop_waiting()
        if self._drain is not None and not self._drain.done():
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)

    async def _run_waiting(self) -> None:
        while self._waiting is not None:
            async with self._gate or contextlib.nullcontext():
                if self._waiting is None:  # dropped while it waited for the gate
                    return
                await self._run_one(*self._waiting)

    async def _run_one(self, call: Callable[[], Awaitable[Any]], future: asyncio.Future[Any]) -> None:
        self._waiting = None
        if future.done():  # its caller gave up
            return
        try:
            result = await call()
        except asyncio.CancelledError:
            future.cancel()
            self.drop_waiting()
            raise
        except BaseException as error:
            if not future.done():
                future.set_exception(error)
        else:
            if not future.done():
                future.set_result(result)


class RayStages:
    """:class:`~fluidsrv.backends.stages.StageBackend` over the stage deployments' handles."""

    name = "ray"

    def __init__(self, handles: StageHandles, *, retries: int = RETRIES,
                 previews_in_flight: int = PREVIEWS_PER_REPLICA) -> None:
        self.handles = handles
        self.retries = retries
        self._slots: dict[str, LatestWins] = {}
        self._gate = asyncio.Semaphore(previews_in_flight)  # binds to the running loop on first use
        self._counters: Counter[str] = Counter()
        self._loads: Counter[str] = Counter()  # model loads reported by the replicas, per session version
        self._preview_seconds: deque[float] = deque(maxlen=512)  # recent preview calls that loaded nothing

    async def detect(self, data: bytes, *, max_pixels: int, max_bytes: int) -> tuple[DecodedImage, tuple[Face, ...]]:
        """Decode and detect on a detect replica."""
        found: tuple[DecodedImage, tuple[Face, ...]] = await self._call(
            "detect", lambda: self.handles.detect.detect.remote(data, max_pixels, max_bytes))
        return found

    async def prepare(self, session_id: str, upload: Upload, face_index: int, version: int,
                      on_progress: Callable[[Progress], None]) -> Prepared:
        """Stream the prepare replica's progress to ``on_progress``; return the prepared face (on the CPU)."""
        stream = self.handles.prepare.options(stream=True).prepare.remote(session_id, face_index, version)
        assert isinstance(stream, DeploymentResponseGenerator)
        try:
            async for kind, payload in stream:
                if kind == "progress":
                    on_progress(payload)
                elif kind == "prepared":
                    self._counters["prepares"] += 1
                    assert isinstance(payload, Prepared)
                    return payload
        except asyncio.CancelledError:
            stream.cancel()  # the replica stops the job at its next step
            raise
        except ray.exceptions.RayTaskError as error:
            raise _replica_error("prepare", error) from None
        except TRANSIENT_ERRORS as error:
            raise UserError(f"the prepare service went away while preparing this face ({type(error).__name__}); "
                            "pick the face again", status=503, code="stage_unavailable") from None
        raise UserError("the prepare service ended without a result; pick the face again", status=503,
                        code="stage_unavailable")

    async def preview(self, session_id: str, prepared: Prepared, values: Mapping[str, float], edited_ws: EditedWs,
                      side: int) -> bytes | Superseded:
        """The preview, composed and encoded by the preview replica that holds the session's models (or loads
        them)."""
        slot = self._slots.setdefault(session_id, LatestWins(self._gate))
        target = model_id(session_id, prepared.version)

        async def render() -> bytes:
            ws = edited_ws(values).detach().to("cpu")
            started = time.perf_counter()
            frame, loaded = await self._call("preview", lambda: self.handles.preview.options(
                multiplexed_model_id=target).render.remote(ws, side))
            if not loaded:
                self._preview_seconds.append(time.perf_counter() - started)
            self._counters["previews"] += 1
            if loaded:
                self._loads[target] += 1
            assert isinstance(frame, bytes)
            return frame

        return await slot.submit(render)

    async def finalize(self, session_id: str, prepared: Prepared, values: Mapping[str, float], edited_ws: EditedWs,
                       on_progress: Callable[[Progress], None]) -> FinalRenders:
        """Render the final face on a finalize replica (multiplexed by session version like previews)."""
        ws = edited_ws(values).detach().to("cpu")
        target = model_id(session_id, prepared.version)
        renders, loaded = await self._call("finalize", lambda: self.handles.finalize.options(
            multiplexed_model_id=target).finalize.remote(ws))
        if loaded:
            self._loads[f"finalize/{target}"] += 1
        on_progress(Progress("finalize", 1, 3, "rendered"))
        assert isinstance(renders, FinalRenders)
        return renders

    def cancel_previews(self, session_id: str) -> None:
        """Drop the session's waiting preview."""
        slot = self._slots.get(session_id)
        if slot is not None:
            slot.drop_waiting()

    def forget(self, session_id: str) -> None:
        """Drop the session's preview slot (the replicas' caches let its models go in time)."""
        slot = self._slots.pop(session_id, None)
        if slot is not None:
            slot.drop_waiting()

    def stats(self) -> dict[str, object]:
        """Calls, retries and model loads of the stage deployments."""
        loads = [count for key, count in self._loads.items() if not key.startswith("finalize/")]
        calls = sorted(self._preview_seconds)
        percentiles = {f"preview_call_p{p}_ms": round(1000 * calls[min(len(calls) - 1, len(calls) * p // 100)], 2)
                       for p in (50, 95)} if calls else {}
        return {**self._counters, "preview_model_loads": sum(loads), "preview_session_versions": len(loads),
                **percentiles}

    async def close(self) -> None:
        """Drop every waiting preview and stop the calls in flight."""
        for slot in self._slots.values():
            await slot.close()
        self._slots.clear()

    async def _call(self, stage: str, send: Callable[[], Any]) -> Any:
        """Await ``send()``'s response, sending it again (after a pause) when its replica died."""
        pause = RETRY_PAUSE_SECONDS
        for attempt in range(1, self.retries + 1):
            try:
                return await send()
            except ray.exceptions.RayTaskError as error:  # the work failed on the replica: its own error
                if isinstance(error.cause, StaleSessionError) and attempt < self.retries:
                    await asyncio.sleep(pause)  # storage does not show the newest version yet: in a moment
                    pause *= 2
                    continue
                raise _replica_error(stage, error) from None
            except TRANSIENT_ERRORS as error:
                self._counters["retries"] += 1
                if attempt == self.retries:
                    log.error("%s: no replica answered after %d attempts: %s", stage, attempt, error)
                    break
                log.warning("%s: replica unavailable (%s); trying again in %.2f s", stage, type(error).__name__,
                            pause)
                await asyncio.sleep(pause)
                pause *= 2
        raise UserError(f"the {stage} service is unavailable right now; try again in a moment", status=503,
                        code="stage_unavailable")


def _replica_error(stage: str, error: ray.exceptions.RayTaskError) -> BaseException:
    """What a replica's failure is to the service: its refusal or out-of-memory error itself, else a short error
    (never the remote traceback, which names server files)."""
    cause = error.cause
    if isinstance(cause, (UserError, ExecutorError)):
        return cause
    return RuntimeError(f"{stage} failed on its replica ({type(cause).__name__}: {cause})")
