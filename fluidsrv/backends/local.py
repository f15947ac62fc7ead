"""The stages in this process: device work on the one :class:`~fluidsrv.executor.GpuExecutor`, CPU work on threads.

This is the single-box backend, and also what every Ray Serve replica runs inside (see
:mod:`fluidsrv.backends.ray_replicas`): one implementation of the stages, two places to run it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import numpy as np

from fluidsrv import pipeline
from fluidsrv.backends.stages import EditedWs
from fluidsrv.executor import GpuExecutor, Priority, Superseded
from fluidsrv.image_io import DecodedImage, decode_image
from fluidsrv.pipeline import FinalRenders
from fluidsrv.runtime import Runtime
from fluidsrv.session.model import Prepared, Upload
from fluidsrv.stages import Face, Progress


class LocalStages:
    """:class:`~fluidsrv.backends.stages.StageBackend` on ``runtime``'s models and ``executor``'s worker."""

    name = "local"

    def __init__(self, runtime: Runtime, executor: GpuExecutor) -> None:
        self.runtime = runtime
        self.executor = executor

    async def detect(self, data: bytes, *, max_pixels: int, max_bytes: int) -> tuple[DecodedImage, tuple[Face, ...]]:
        """Decode and detect on a thread (detection never touches the generator)."""
        detector = self.runtime.stage("detector")

        def decode_and_detect() -> tuple[DecodedImage, tuple[Face, ...]]:
            decoded = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
            return decoded, pipeline.detect_faces(detector, decoded.pixels)

        work = asyncio.ensure_future(asyncio.to_thread(decode_and_detect))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:  # the caller's pixel budget stays reserved until the thread lets go
            await asyncio.wait({work})
            raise

    async def prepare(self, session_id: str, upload: Upload, face_index: int, version: int,
                      on_progress: Callable[[Progress], None]) -> Prepared:
        """Prepare on the device worker and keep the tuned models cached for the session's previews."""
        stages = self.runtime.stages()
        made = await self.executor.run_job(
            lambda: pipeline.prepare(stages, upload.pixels, upload.faces, face_index, version=version),
            priority=Priority.ENCODE, owner=session_id, on_progress=on_progress)
        self.runtime.tuned.put(session_id, version, made.generator, made.renderer)
        return made.prepared

    async def preview(self, session_id: str, prepared: Prepared, values: Mapping[str, float], edited_ws: EditedWs,
                      side: int) -> np.ndarray | Superseded:
        """Render on the worker at preview priority; a newer state of the session replaces a queued one."""
        runtime = self.runtime

        def render(state: Mapping[str, float]) -> np.ndarray:
            _, renderer = runtime.session_models(session_id, prepared)
            return pipeline.render_preview(renderer, edited_ws(state), side)

        return await self.executor.submit_preview(session_id, values, render)

    async def finalize(self, session_id: str, prepared: Prepared, values: Mapping[str, float], edited_ws: EditedWs,
                       on_progress: Callable[[Progress], None]) -> FinalRenders:
        """Render the final face on the worker at finalize priority."""
        runtime = self.runtime
        stages = runtime.stages()

        def job() -> pipeline.StepJob[FinalRenders]:
            generator, _ = runtime.session_models(session_id, prepared)
            return pipeline.render_final(stages, generator, prepared, edited_ws(values))

        return await self.executor.run_job(job, priority=Priority.FINALIZE, owner=session_id, on_progress=on_progress)

    def cancel_previews(self, session_id: str) -> None:
        """Drop the session's queued preview."""
        self.executor.cancel_previews(session_id)

    def forget(self, session_id: str) -> None:
        """Cancel the session's device work and drop its cached models."""
        self.executor.cancel_owner(session_id)
        self.runtime.tuned.forget(session_id)

    def stats(self) -> dict[str, object]:
        """Nothing beyond the executor's counters, which the service reports."""
        return {}

    async def close(self) -> None:
        """Nothing to release: the service stops the executor."""
