"""The editing service's live identity meter: previews and finalized photos measured against the upload's face.

Measuring is kept off the preview path: a preview frame, once sent, is *offered* to the meter and the call returns
at once. Each session has one slot (a newer offer replaces a waiting one, the newest state wins) and is measured at
most ``identity_rate`` times a second while a slider moves; the last state offered is always measured, so the
state at a slider's release is. Measurements run in :class:`~fluidsrv.identity.IdentityMeter`'s low-priority
worker process and are published as :class:`~fluidsrv.events.IdentityEvent` to the session's subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fluidsrv.events import Event, IdentityEvent
from fluidsrv.identity import IdentityMeter, IdentityReading, PhotoCrop, Reference, choose_embedder
from fluidsrv.session.model import Session
from fluidsrv.settings import Settings

log = logging.getLogger(__name__)

FINAL_TIMEOUT_SECONDS = 10.0  # finalize waits at most this long for the final photo's reading


@dataclass
class _SessionMeter:
    """A session's measuring slot, the time its last measurement started and its newest readings."""

    pending: tuple[Reference, bytes, dict[str, float], int] | None = None
    task: asyncio.Future[None] | None = None
    started: float = -float("inf")
    readings: dict[str, IdentityReading] = field(default_factory=dict)  # by source: "preview", "final"


def reference_of(session: Session) -> tuple[Reference, int]:
    """The session's aligned upload face (the crop previews are laid over, with its five landmarks) and version."""
    prepared = session.prepared
    assert prepared is not None, "the session has no prepared face"
    alignment, crop = prepared.alignment, prepared.preview_crop
    points = alignment.to_crop_points(session.faces[prepared.face_index].landmarks5)
    points = np.asarray(points) * (crop.shape[0] / alignment.inner.size)  # [5, 2] in the crop's pixels
    return Reference(f"{session.id}:{prepared.version}", crop, points), prepared.version


class IdentityMeters:
    """The live identity meter of every session of a service (off, or unavailable, when no embedder can run)."""

    def __init__(self, settings: Settings, publish: Callable[[str, Event], None]) -> None:
        self.meter = IdentityMeter(choose_embedder(settings.identity_meter, settings.cache_dir,
                                                   settings.identity_model))
        self.interval = 1.0 / settings.identity_rate
        self._publish = publish
        self._sessions: dict[str, _SessionMeter] = {}
        self._warned = False
        self._background: asyncio.Future[None] | None = None  # the last final measurement left to run alone

    def offer(self, session: Session, values: dict[str, float], frame: bytes) -> None:
        """Measure ``frame`` (a preview of ``values``, encoded) soon, unless a newer one is offered first."""
        if not self.meter.available or session.prepared is None:
            return
        reference, version = reference_of(session)
        slot = self._sessions.setdefault(session.id, _SessionMeter())
        slot.pending = (reference, frame, dict(values), version)
        if slot.task is None or slot.task.done():
            slot.task = asyncio.ensure_future(self._drain(session.id, slot))

    async def _drain(self, session_id: str, slot: _SessionMeter) -> None:
        while slot.pending is not None:
            wait = slot.started + self.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # offers meanwhile replace the pending state
            if slot.pending is None:
                return
            reference, frame, values, version = slot.pending
            slot.pending = None
            slot.started = time.monotonic()
            reading = await self._measure(reference, frame, values, version, "preview")
            if reading is not None and self._sessions.get(session_id) is slot:
                slot.readings["preview"] = reading
                self._publish(session_id, IdentityEvent(session_id, reading))

    async def _measure(self, reference: Reference, image: bytes | PhotoCrop, values: dict[str, float],
                       version: int, source: str) -> IdentityReading | None:
        choice = self.meter.choice
        try:
            distance = await self.meter.distance(reference, image)
        except asyncio.CancelledError:
            raise
        except Exception:
            if not self._warned:  # once: the meter must never flood the log or fail an edit
                log.exception("the identity meter failed (later failures are not logged)")
                self._warned = True
            return None
        assert choice.name is not None
        return IdentityReading(distance, choice.threshold, choice.name, source, values, version)

    async def measure_final(self, session: Session) -> None:
        """Measure the finalized photo's face and publish the reading.

        When the worker runs (an editor was opened), this waits for the reading (at most FINAL_TIMEOUT_SECONDS), so
        the finalize answer carries it; else the worker is started and the reading follows in the background.
        """
        prepared = session.prepared
        if not self.meter.available or prepared is None or session.result is None:
            return
        if not self.meter.started:
            self.meter.start()
            self._background = asyncio.ensure_future(self.measure_final(session))
            return
        reference, version = reference_of(session)
        side = reference.image.shape[0]
        photo = PhotoCrop(session.result, np.asarray(prepared.alignment.inner.quad), side)
        try:
            reading = await asyncio.wait_for(
                self._measure(reference, photo, dict(session.edit.sliders), version, "final"), FINAL_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning("the identity meter took over %.0f s on a finalized photo", FINAL_TIMEOUT_SECONDS)
            return
        if reading is not None:
            self._sessions.setdefault(session.id, _SessionMeter()).readings["final"] = reading
            self._publish(session.id, IdentityEvent(session.id, reading))

    def warm(self) -> None:
        """Start the worker process now (a client opened an editor), so the first reading comes without its start."""
        if self.meter.available:
            self.meter.start()

    def report(self, session: Session) -> dict[str, Any]:
        """The meter's state for the session: available (or why not), the threshold and the newest readings of
        the current prepared face (``preview``: the last slider state measured, ``final``: the finalized photo)."""
        choice = self.meter.choice
        if not self.meter.available or choice.name is None:
            return {"available": False, "reason": self.meter.unavailable_reason}
        slot = self._sessions.get(session.id)
        version = session.prepared.version if session.prepared is not None else -1
        readings = {source: reading.describe() for source, reading in (slot.readings if slot else {}).items()
                    if reading.version == version}
        return {"available": True, "embedder": choice.name, "threshold": choice.threshold,
                "preview": readings.get("preview"), "final": readings.get("final")}

    def forget(self, session_id: str) -> None:
        """Drop a session that is gone (a measurement in flight is dropped when it ends)."""
        slot = self._sessions.pop(session_id, None)
        if slot is not None:
            slot.pending = None

    async def close(self) -> None:
        """Stop measuring and the worker process."""
        for slot in self._sessions.values():
            slot.pending = None
            if slot.task is not None:
                slot.task.cancel()
        if self._background is not None:
            self._background.cancel()
        await self.meter.close()
