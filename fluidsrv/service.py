"""The editing service: every use case of the product, with no HTTP in sight.

:class:`EditService` owns a session's life: creating it from an upload, preparing a face as a background
job, previews, slider history, finalize, on-demand directions and the latent tools. It moves the status
(:class:`~fluidsrv.session.model.Status`), persists sessions when a stage completes, keeps the table of
running jobs, cancels a session's job when its last subscriber has been gone for a grace period, and expires idle
sessions; committed edits are written through to disk before they are acknowledged. What happens is
published as :data:`Event` values to the subscribers of a session (the web's websockets, the CLI's progress
bar). Device work goes through the one :class:`~fluidsrv.executor.GpuExecutor`; image composition and
encoding run on threads off its worker, so they never delay another session's preview.

The web layer imports this module (and :mod:`fluidsrv.protocol`) only; the names it needs from the layers
below are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal

import torch

from fluidsrv import pipeline
from fluidsrv.admission import AdmissionQueue
from fluidsrv.backends import open_storage
from fluidsrv.backends.local import LocalStages
from fluidsrv.backends.stages import StageBackend
from fluidsrv.backends.storage import StorageUnavailableError
from fluidsrv.convert import PREVIEW_FORMAT, encode_preview
from fluidsrv.decode_budget import ClientPixelBudget, PixelBudget, decode_share
from fluidsrv.errors import NoFaceError, UserError
from fluidsrv.events import (
    DeletedEvent,
    Event,
    FailedEvent,
    FinalizedEvent,
    IdentityEvent,
    ProgressEvent,
    ReadyEvent,
    Subscriber,
    Subscriptions,
)
from fluidsrv.executor import SUPERSEDED, ExecutorError, GpuExecutor, Priority
from fluidsrv.identity_meter import IdentityMeters
from fluidsrv.image_io import encode_image, face_thumbnail
from fluidsrv.latent_tools import LatentTools
from fluidsrv.plugins import PluginError, PluginInfo
from fluidsrv.preset_tools import PresetTools
from fluidsrv.runtime import Runtime
from fluidsrv.session.model import JobProgress, Session, Status, Upload
from fluidsrv.session.store import SessionError, SessionStore, StoreStats, TooManySessionsError
from fluidsrv.session_directions import SessionDirections
from fluidsrv.settings import Settings
from fluidsrv.stages import Direction, Face, Progress

__all__ = [
    "PREVIEW_FORMAT",
    "DeletedEvent",
    "Direction",
    "EditService",
    "Event",
    "Face",
    "FailedEvent",
    "FinalizedEvent",
    "IdentityEvent",
    "PluginInfo",
    "ProgressEvent",
    "ReadyEvent",
    "Session",
    "SessionError",
    "Status",
    "StoreStats",
]

log = logging.getLogger(__name__)

EXPIRY_INTERVAL_SECONDS = 60.0
ABANDONED_UPLOAD_SECONDS = 120.0  # a full server may delete uploads idle this long whose face was never picked
THUMBNAIL_SIDE = 96


def _user_message(error: BaseException) -> str:
    return str(error) or type(error).__name__


class EditService(SessionDirections, LatentTools, PresetTools):
    """The use cases of the product over one runtime, one session store and one device executor."""

    def __init__(self, runtime: Runtime, store: SessionStore, executor: GpuExecutor,
                 settings: Settings | None = None, stages: StageBackend | None = None) -> None:
        self.runtime = runtime
        self.settings: Settings = settings or runtime.settings  # the server's limits (models: runtime.settings)
        self.store = store
        self.executor = executor  # this process's device work: the local stages' and the latent tools'
        self.stages: StageBackend = stages if stages is not None else LocalStages(runtime, executor)
        self._jobs: dict[str, asyncio.Task[Any]] = {}
        self._latest_progress: dict[str, ProgressEvent] = {}
        self._subscriptions = Subscriptions(self._on_last_subscriber_left)
        self._abandon_timers: dict[str, asyncio.TimerHandle] = {}  # jobs whose last client left, by session
        self._admission = AdmissionQueue(self.settings.max_concurrent_prepares)
        self._sockets: Counter[str] = Counter()  # open websockets per session
        self._preview_origins: dict[str, str] = {}  # who sent each session's newest preview request
        self._decoding = PixelBudget(self.settings.decode_pixel_budget)
        self._client_pixels = ClientPixelBudget(self.settings.client_pixels_per_minute)
        self._background: set[asyncio.Task[Any]] = set()
        self.identity = IdentityMeters(self.settings, self._publish)  # measured off the preview path
        self._expiry: asyncio.Task[None] | None = None
        self._closing = False

    # ---- lifecycle -----------------------------------------------------------------------------------------

    @classmethod
    async def start(cls, settings: Settings, runtime: Runtime | None = None,
                    stages: Callable[[Runtime, GpuExecutor], StageBackend] | None = None) -> EditService:
        """Load the runtime (unless given), open the session store and start the device executor.

        ``stages`` builds where the stages run (default: :class:`~fluidsrv.backends.local.LocalStages` in this
        process); sessions are stored where the settings say (:func:`fluidsrv.backends.open_storage`).
        """
        loaded = runtime if runtime is not None else await asyncio.to_thread(Runtime.build, settings)
        storage = await asyncio.to_thread(open_storage, settings)
        store = await asyncio.to_thread(
            functools.partial(
                SessionStore, settings.data_dir, device=loaded.device, storage=storage,
                memory_budget_bytes=settings.session_memory_budget_bytes,
                host_budget_bytes=settings.session_host_budget_bytes, ttl_seconds=settings.session_ttl_seconds,
                max_sessions=settings.max_sessions))
        executor = GpuExecutor(loaded.device, on_out_of_memory=functools.partial(_free_memory, loaded, store),
                               long_job_share=settings.long_job_share)
        executor.start()
        service = cls(loaded, store, executor, settings, stages(loaded, executor) if stages is not None else None)
        service._expiry = asyncio.create_task(service._expire_periodically())
        return service

    async def close(self) -> None:
        """Cancel the running jobs, stop the executor and write every session to disk."""
        self._closing = True  # a prepare cancelled now was interrupted, not abandoned
        if self._expiry is not None:
            self._expiry.cancel()
        for timer in self._abandon_timers.values():
            timer.cancel()
        for job in list(self._jobs.values()):
            job.cancel()
        await self.identity.close()
        await self.stages.close()
        await self.executor.shutdown()
        await asyncio.to_thread(self.store.close)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run ``coroutine`` in the background, holding a reference until it finishes."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- events --------------------------------------------------------------------------------------------

    def subscribe(self, session_id: str, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every event of the session; returns the unsubscribe function.

        When the last subscriber of a session leaves while a job of it runs (prepare, finalize), the job keeps
        running for ``prepare_grace_seconds`` (a reloaded tab joins it again); then it is cancelled.
        """
        self._forget_abandon_timer(session_id)
        return self._subscriptions.subscribe(session_id, subscriber)

    def _on_last_subscriber_left(self, session_id: str) -> None:
        if session_id not in self._jobs:
            return
        grace = self.settings.prepare_grace_seconds
        if grace <= 0:
            self._cancel_if_abandoned(session_id)
            return
        self._forget_abandon_timer(session_id)
        self._abandon_timers[session_id] = asyncio.get_running_loop().call_later(
            grace, self._cancel_if_abandoned, session_id)

    def _forget_abandon_timer(self, session_id: str) -> None:
        """Drop the session's grace timer (a client came back, the job ended, or the session is gone)."""
        timer = self._abandon_timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()

    def _cancel_if_abandoned(self, session_id: str) -> None:
        """Cancel the session's job if nobody has subscribed again since its last client left."""
        self._abandon_timers.pop(session_id, None)
        job = self._jobs.get(session_id)
        if job is not None and not job.done() and self._subscriptions.count(session_id) == 0:
            log.info("cancelling the job of session %s: no client came back", session_id[:8])
            job.cancel()

    def latest_progress(self, session_id: str) -> ProgressEvent | None:
        """The last progress event of the session's running job (for a client that joins it), or None."""
        return self._latest_progress.get(session_id)

    def _publish(self, session_id: str, event: Event) -> None:
        self._subscriptions.publish(session_id, event)

    def _progress_handler(self, session: Session) -> Callable[[Progress], None]:
        def forward(progress: Progress) -> None:
            facts = JobProgress(progress.stage, progress.step, progress.total, progress.message)
            session.progress = facts
            if progress.frame is not None:
                event = ProgressEvent(session.id, facts, encode_preview(progress.frame, PREVIEW_FORMAT), progress.step)
                self._latest_progress[session.id] = event
            else:
                event = ProgressEvent(session.id, facts)
                previous = self._latest_progress.get(session.id)  # a client that joins still sees the last image
                self._latest_progress[session.id] = ProgressEvent(
                    session.id, facts, previous.frame if previous else None, previous.frame_step if previous else 0)
            self._publish(session.id, event)

        return forward

    # ---- sessions ------------------------------------------------------------------------------------------

    async def create(self, data: bytes, filename: str | None = None, *,
                     client: str | None = None) -> tuple[Session, str]:
        """Create a session from an uploaded photo; return it and its token. Refuses photos without a face.

        Decoding is bounded: ``client`` (an address) may have ``client_pixels_per_minute`` pixels decoded a
        minute, and at most ``decode_pixel_budget`` pixels are decoded at once server-wide (the rest wait).
        """
        settings = self.settings
        async with self.decoding_share(data, client):  # held until the decode has let go of the pixels
            decoded, faces = await self.stages.detect(data, max_pixels=settings.max_pixels,
                                                      max_bytes=settings.max_upload_bytes)
        if not faces:
            raise NoFaceError()
        upload = Upload(data=bytes(data), pixels=decoded.pixels, metadata=decoded.metadata, filename=filename,
                        faces=faces)
        session, token = await asyncio.to_thread(self._create_room_for, upload)
        await asyncio.to_thread(self.store.persist, session)
        return session, token

    def decoding_share(self, data: bytes, client: str | None) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the pixels of ``data`` in the server's decode budget for the block, charged to ``client``."""
        return decode_share(self._decoding, self._client_pixels, data, client, self.settings.max_pixels)

    def _create_room_for(self, upload: Upload) -> tuple[Session, str]:
        """Create a session; when the server is full, first delete the oldest abandoned upload (no face picked)."""
        try:
            return self.store.create(upload)
        except TooManySessionsError:
            deadline = time.time() - ABANDONED_UPLOAD_SECONDS
            removed = self.store.remove_oldest(
                lambda session: session.status == Status.UPLOADED and session.last_used < deadline)
            if removed is None:
                raise
            log.info("the server is full: deleted abandoned upload %s", removed[:8])
            return self.store.create(upload)

    async def open(self, session_id: str, token: str) -> Session:
        """Return the session, authorised by its token (restored from disk when it was spilled)."""
        self.store.check(session_id, token)
        session = await asyncio.to_thread(self.store.get, session_id, token)
        if session.status == Status.PREPARING and session_id not in self._jobs:
            # the server stopped while this face was being prepared: the client must pick it again
            session.move_to(Status.INTERRUPTED)
        return session

    def attach_socket(self, session: Session) -> Callable[[], None]:
        """Count a websocket of the session (at most ``max_sockets_per_session``) and pin the session.

        Returns the release function; when the session's last socket goes, its queued preview is dropped.
        """
        limit = self.settings.max_sockets_per_session
        if self._sockets[session.id] >= limit:
            raise UserError(f"at most {limit} connections to one session at once; close another tab first",
                            status=429, code="too_many_sockets")
        self._sockets[session.id] += 1
        self.store.pin(session)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.store.unpin(session)
            self._sockets[session.id] -= 1
            if self._sockets[session.id] <= 0:
                del self._sockets[session.id]
                self._preview_origins.pop(session.id, None)
                self.stages.cancel_previews(session.id)

        return release

    async def delete(self, session: Session, token: str) -> None:
        """Delete a session, its jobs and everything it stored; subscribers get a DeletedEvent."""
        job = self._jobs.pop(session.id, None)
        if job is not None:
            job.cancel()
        self._forget(session.id)
        self._publish(session.id, DeletedEvent(session.id))
        await asyncio.to_thread(self.store.delete, session.id, token)

    def _forget(self, session_id: str) -> None:
        """Drop what the service holds for a session that is gone: its device work, timer, models, preview slot."""
        self.stages.forget(session_id)
        self.executor.cancel_owner(session_id)  # the latent tools' jobs
        self._forget_abandon_timer(session_id)
        self.runtime.tuned.forget(session_id)
        self._preview_origins.pop(session_id, None)
        self.identity.forget(session_id)

    async def face_thumbnails(self, session: Session) -> list[bytes]:
        """JPEG thumbnails of the session's faces, in face order."""
        def encode_all() -> list[bytes]:
            pixels = session.upload.pixels
            return [encode_image(face_thumbnail(pixels, face.box, size=THUMBNAIL_SIDE), "jpeg", quality=85)
                    for face in session.faces]

        return await asyncio.to_thread(encode_all)

    def is_busy(self, session: Session) -> bool:
        """Whether a job of the session is running."""
        job = self._jobs.get(session.id)
        return job is not None and not job.done()

    def _refuse_if_busy(self, session: Session) -> None:
        if self.is_busy(session):
            raise UserError("this session is already working; wait for the current job to finish", status=409,
                            code="busy")

    # ---- prepare -------------------------------------------------------------------------------------------

    async def prepare(self, session: Session, face_index: int) -> None:
        """Start preparing a face (align → encode → fine-tune → distil) as a job; progress goes to subscribers."""
        if not 0 <= face_index < len(session.faces):
            raise UserError(f"face index {face_index} is out of range (found {len(session.faces)} faces)",
                            status=422, code="bad_face_index")
        self._refuse_if_busy(session)
        session.move_to(Status.PREPARING)
        self._jobs[session.id] = asyncio.create_task(self._prepare(session, face_index))

    async def wait(self, session: Session) -> None:
        """Wait until the session's running job (if any) has ended."""
        job = self._jobs.get(session.id)
        if job is not None:
            await asyncio.gather(job, return_exceptions=True)

    async def _prepare(self, session: Session, face_index: int) -> None:
        version = (session.prepared.version if session.prepared is not None else 0) + 1
        upload = session.upload
        forward = self._progress_handler(session)
        with self.store.pinned(session):
            try:
                async with self._admission.admit(functools.partial(self._report_place, session)):
                    self._leave_line(session)
                    prepared = await self.stages.prepare(session.id, upload, face_index, version, forward)
            except asyncio.CancelledError:
                session.move_to(Status.INTERRUPTED if self._closing else Status.CANCELLED)
                return
            except Exception as error:
                log.exception("preparing session %s failed", session.id)
                session.move_to(Status.FAILED, error=_user_message(error))
                self._publish(session.id, FailedEvent(session.id, "prepare_failed", _user_message(error)))
                return
            finally:
                self._jobs.pop(session.id, None)
                self._forget_abandon_timer(session.id)
                self._latest_progress.pop(session.id, None)
            session.prepared = prepared
            session.edit.reset()
            session.result = None
            remote = self.stages.name != "local"  # the replicas read the prepared face from storage: store it first
            if remote and not await self._persist_prepared(session):
                return
            session.move_to(Status.READY)
            try:
                await asyncio.to_thread(self.store.persist, session)
            except SessionError:
                return  # deleted while it was being prepared
            except Exception:
                log.exception("session %s is ready but could not be written to disk", session.id)
            self._publish(session.id, ReadyEvent(session))

    async def _persist_prepared(self, session: Session) -> bool:
        """Store a just-prepared session before it is ready (remote replicas load it from there); False: failed."""
        try:
            await asyncio.to_thread(self.store.persist, session)
        except SessionError:
            return False  # deleted while it was being prepared
        except Exception as error:
            log.exception("the prepared face of session %s could not be stored", session.id)
            message = f"the prepared face could not be stored: {_user_message(error)}"
            session.move_to(Status.FAILED, error=message)
            self._publish(session.id, FailedEvent(session.id, "prepare_failed", message))
            return False
        return True

    def _report_place(self, session: Session, place: int) -> None:
        """Tell the clients of a waiting prepare its place in line (1 = next) and how many faces go first."""
        ahead = place - 1 + self._admission.running
        faces = "1 face is" if ahead == 1 else f"{ahead} faces are"
        facts = JobProgress("queued", 0, 0, f"waiting in line (place {place}): {faces} being prepared first",
                            queued=place)
        session.progress = facts
        self._latest_progress[session.id] = ProgressEvent(session.id, facts)
        self._publish(session.id, ProgressEvent(session.id, facts))

    def _leave_line(self, session: Session) -> None:
        """The prepare got its place: a client that joins now must not be told it is still waiting."""
        if session.progress is not None and session.progress.queued:
            session.progress = None
            self._latest_progress.pop(session.id, None)

    # ---- sliders and previews ------------------------------------------------------------------------------

    def directions(self) -> dict[str, Direction]:
        """The shared edit directions (sliders) of the loaded generator."""
        return self.runtime.directions

    def session_directions(self, session: Session) -> dict[str, Direction]:
        """A session's sliders: the shared directions and the ones it added."""
        return self.runtime.directions_for(session.id, session.edit)

    def set_sliders(self, session: Session, values: dict[str, float], *, commit: bool) -> None:
        """Make ``values`` the session's slider state (``commit`` records it in the undo history)."""
        session.require_ready()
        unknown = sorted(set(values) - set(self.session_directions(session)))
        if unknown:
            raise UserError(f"unknown sliders: {', '.join(unknown[:5])}", status=422, code="unknown_slider")
        session.edit.set_sliders(values, record=commit)

    async def step_history(self, session: Session, action: Literal["undo", "redo"]) -> bool:
        """Undo or redo the slider history; return whether the state changed (written to disk before returning)."""
        changed = session.edit.undo() if action == "undo" else session.edit.redo()
        if changed:
            await self.save_edit(session)
        return changed

    async def save_edit(self, session: Session) -> None:
        """Write the session's edit state (sliders, history, added directions) through to disk now.

        Only the small edit record is written, without the store's lock, so this never waits behind another
        session's spill; the store's bookkeeping (last use, budgets) follows in the background.
        """
        snapshot = session.edit.snapshot()  # taken here, where the state changes: the write cannot tear it
        try:
            await asyncio.to_thread(self.store.record_edit, session.id, snapshot)
        except StorageUnavailableError as error:
            log.error("the edit of session %s was not saved: %s", session.id[:8], error)
            raise UserError("the session storage is unavailable right now; this edit was not saved", status=503,
                            code="storage_unavailable") from None
        except RuntimeError:  # the store closed: the server is shutting down
            raise UserError("the server is shutting down; this edit was not saved", status=503,
                            code="shutting_down") from None
        self.spawn(asyncio.to_thread(self._update_quietly, session))

    def _update_quietly(self, session: Session) -> None:
        with contextlib.suppress(SessionError, RuntimeError):  # deleted meanwhile, or the server is shutting down
            self.store.update(session)

    async def preview(self, session: Session, values: dict[str, float], *, origin: str = "") -> bytes | None:
        """Render the preview of ``values`` as PREVIEW_FORMAT bytes; None when a newer one of ``origin`` replaced it.

        A session has one preview slot: a newer state (from any of its sockets) replaces a queued one. When the
        newer state came from another ``origin`` (another socket), this one is refused with a 409 ``superseded``
        so that its client stops waiting for it. Only the render runs on the device worker; laying it over the
        photo's crop and encoding run on a thread.
        """
        prepared = session.require_ready()
        runtime, session_id = self.runtime, session.id
        directions, side = self.session_directions(session), pipeline.frame_side(prepared)

        def edited_ws(state: Mapping[str, float]) -> torch.Tensor:
            return pipeline.edited_ws(prepared.ws, directions, dict(state), runtime.spread)

        self._preview_origins[session_id] = origin
        frame = await self.stages.preview(session_id, prepared, values, edited_ws, side)
        if frame is SUPERSEDED:
            if self._preview_origins.get(session_id, origin) != origin:
                raise UserError("a newer slider state from another connection of this session replaced this one",
                                status=409, code="superseded")
            return None
        if isinstance(frame, bytes):  # composed and encoded where it was rendered (the ray preview replicas)
            return frame
        return await asyncio.to_thread(pipeline.encode_composed_preview, prepared, frame, runtime.settings.photo_detail)

    # ---- finalize ------------------------------------------------------------------------------------------

    async def finalize(self, session: Session) -> bytes:
        """Render the edit at full quality, lay it into the photo and keep the JPEG; return its bytes."""
        session.require_ready()
        self._refuse_if_busy(session)
        task = asyncio.create_task(self._finalize(session))
        self._jobs[session.id] = task
        result = await task
        await self.identity.measure_final(session)  # the finalize answer reports the kept photo's identity
        return result

    async def _finalize(self, session: Session) -> bytes:
        prepared = session.require_ready()
        runtime = self.runtime
        directions, sliders = self.session_directions(session), dict(session.edit.sliders)
        forward = self._progress_handler(session)
        with self.store.pinned(session):
            try:
                def edited_ws(state: Mapping[str, float]) -> torch.Tensor:
                    return pipeline.edited_ws(prepared.ws, directions, dict(state), runtime.spread)

                renders = await self.stages.finalize(session.id, prepared, sliders, edited_ws, forward)
                photo = await asyncio.to_thread(pipeline.lay_into_photo, session.upload.pixels, prepared, renders)
                forward(Progress("finalize", 2, 3, "laid into the photo"))
                result = await asyncio.to_thread(pipeline.encode_result, photo, session.upload.metadata)
                forward(Progress("finalize", 3, 3, "encoded"))
            except asyncio.CancelledError:
                raise UserError("finalizing was cancelled", status=409, code="cancelled") from None
            except ExecutorError as error:
                raise UserError(str(error), status=503, code="out_of_memory") from None
            except Exception as error:
                log.exception("finalizing session %s failed", session.id)
                raise UserError(f"finalizing failed: {_user_message(error)}", status=500,
                                code="finalize_failed") from None
            finally:
                self._jobs.pop(session.id, None)
                self._forget_abandon_timer(session.id)
                self._latest_progress.pop(session.id, None)
            session.result = result
            session.progress = None
            await asyncio.to_thread(self.store.persist, session)
            self._publish(session.id, FinalizedEvent(session.id))
            return result

    # ---- server facts and administration -------------------------------------------------------------------

    async def plugins(self) -> list[PluginInfo]:
        """Every stage implementation with its availability (and import failures), off the event loop."""
        return await asyncio.to_thread(self.runtime.catalog.describe)

    def generator_info(self) -> dict[str, Any]:
        """The loaded generator's description (source, resolution, device...)."""
        return self.runtime.describe()

    def active_stages(self) -> dict[str, Any]:
        """The active plugin name of every stage."""
        return self.runtime.active_stages()

    def skipped_stages(self) -> dict[str, dict[str, str]]:
        """Per stage, the preferred plugins passed over when it was chosen, with why (e.g. no weights for this
        generator)."""
        return self.runtime.skipped_stages()

    def directions_unavailable(self) -> dict[str, str]:
        """The direction sources asked for that give no sliders, with the reason."""
        return self.runtime.direction_status()

    def text_unavailable(self) -> str | None:
        """Why text-prompt directions cannot be made, or None."""
        return self.runtime.text_unavailable()

    async def switch_stage(self, stage: str, name: str) -> dict[str, Any]:
        """Switch a stage to another plugin at run time; the old one stays active if the new one fails."""
        if self.stages.name != "local":  # the replicas run their own runtimes: one process cannot switch them all
            raise UserError(f"stages cannot be switched at run time on the {self.stages.name} backend; set "
                            f"FLUIDSRV_{stage.upper()} and deploy again", status=409, code="switch_unsupported")
        try:
            await self.executor.run(lambda: self.runtime.switch_stage(stage, name), priority=Priority.FINALIZE)
        except PluginError as error:
            raise UserError(str(error), status=422, code="plugin_unavailable") from None
        return self.active_stages()

    def stats(self) -> dict[str, Any]:
        """Executor and session-store counters."""
        decoding = {"pixels_in_use": self._decoding.in_use, "peak_pixels": self._decoding.peak,
                    "waiting": self._decoding.waiting, "budget_pixels": self._decoding.total}
        prepares = {"running": self._admission.running, "waiting": self._admission.waiting}
        return {"executor": vars(self.executor.stats()), "sessions": vars(self.store.stats()), "decoding": decoding,
                "prepares": prepares, "finetune": self.runtime.finetune_figures(),
                "backend": {"name": self.stages.name, **self.stages.stats()}}

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_SECONDS)
            try:
                expired = await asyncio.to_thread(self.store.expire)
            except Exception:
                log.exception("session expiry failed")
                continue
            for session_id in expired:
                self._forget(session_id)


def _free_memory(runtime: Runtime, store: SessionStore) -> int:
    """The executor's out-of-memory hook: drop cached tuned models and spill idle sessions."""
    runtime.tuned.clear()
    return store.evict_idle()
