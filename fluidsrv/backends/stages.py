"""Where the stages run: the interface the service calls for detect, prepare, preview and finalize.

Two implementations: :class:`fluidsrv.backends.local.LocalStages` (this process: the one device executor and
threads; the single-box default) and :class:`fluidsrv.backends.ray_stages.RayStages` (Ray Serve deployments,
each with its own replicas). The service keeps everything else: sessions, status, events, history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import torch

from fluidsrv.executor import Superseded
from fluidsrv.image_io import DecodedImage
from fluidsrv.pipeline import FinalRenders
from fluidsrv.session.model import Prepared, Upload
from fluidsrv.stages import Face, Progress

EditedWs = Callable[[Mapping[str, float]], torch.Tensor]
"""Slider values -> the edited w+ ``[1, num_ws, w_dim]`` of a session (cheap; runs where the backend says)."""


class StageBackend(Protocol):
    """The four stages of a session's life, run somewhere; every method may be awaited concurrently."""

    name: str  # "local" or "ray"

    async def detect(self, data: bytes, *, max_pixels: int, max_bytes: int) -> tuple[DecodedImage, tuple[Face, ...]]:
        """Decode an upload and find its faces, numbered left to right."""

    async def prepare(self, session_id: str, upload: Upload, face_index: int, version: int,
                      on_progress: Callable[[Progress], None]) -> Prepared:
        """Align, encode, fine-tune and distil one face; progress goes to ``on_progress`` on the event loop."""

    async def preview(self, session_id: str, prepared: Prepared, values: Mapping[str, float], edited_ws: EditedWs,
                      side: int) -> np.ndarray | bytes | Superseded:
        """The preview frame (uint8 [side, side, 3]) of ``values``, or the preview already laid over the photo's
        crop and encoded as PREVIEW_FORMAT (bytes: a remote backend does that where it rendered); SUPERSEDED when
        a newer state replaced it."""

    async def finalize(self, session_id: str, prepared: Prepared, values: Mapping[str, float], edited_ws: EditedWs,
                       on_progress: Callable[[Progress], None]) -> FinalRenders:
        """Render ``values`` at full quality with the session's tuned generator."""

    def cancel_previews(self, session_id: str) -> None:
        """Drop the session's queued preview (its last socket left)."""

    def forget(self, session_id: str) -> None:
        """Drop everything held for a session that is gone (queued work, cached models)."""

    def stats(self) -> dict[str, object]:
        """Counters of this backend (for /api/stats)."""

    async def close(self) -> None:
        """Release what the backend holds (the service closes the executor itself)."""
