"""The latent tools of the editing service: mix, morph and loop, in the base generator's latent space.

The faces are prepared sessions' inverted ``ws``, rendered with the shared base generator (each session's
fine-tuning only fits its own face, so it is not used here); videos render a batch of frames per executor step,
so previews interleave. :class:`LatentTools` is a part of :class:`fluidsrv.service.EditService`.
"""

from __future__ import annotations

import asyncio

import torch

from fluidsrv import latents
from fluidsrv.errors import UserError
from fluidsrv.executor import GpuExecutor, Priority
from fluidsrv.image_io import encode_image
from fluidsrv.protocol import MAX_VIDEO_FRAMES, FaceRef, LayerSpec, LoopRequest, MixRequest, MorphRequest
from fluidsrv.runtime import Runtime
from fluidsrv.session.model import Session
from fluidsrv.session.store import SessionError
from fluidsrv.videos import encode_video, render_frames, render_job


class LatentTools:
    """Mix, morph and loop over prepared sessions (the service provides ``open`` and ``layer_range``)."""

    runtime: Runtime
    executor: GpuExecutor

    async def open(self, session_id: str, token: str) -> Session:
        """Return the session, authorised by its token (provided by the service)."""
        raise NotImplementedError

    def layer_range(self, spec: LayerSpec) -> tuple[int, int]:
        """Resolve a layer range against the generator (provided by the service)."""
        raise NotImplementedError

    async def _face_ws(self, reference: FaceRef) -> torch.Tensor:
        """The ws [1, num_ws, w_dim] of a prepared session named by id and token."""
        try:
            session = await self.open(reference.session_id, reference.token)
        except SessionError as error:
            raise UserError(f"face {reference.session_id[:8]}…: {error}", status=error.status,
                            code=error.code) from None
        if session.prepared is None:
            raise UserError("every face must be picked and prepared before it can be used here", status=409,
                            code="not_ready")
        return session.prepared.ws

    async def mix(self, request: MixRequest) -> bytes:
        """Mix two faces (styles by layer range, or "more like" by percent); return a PNG."""
        ws_a, ws_b = [await self._face_ws(face) for face in request.faces]
        if request.percent is not None:
            mixed = latents.more_like(ws_a, ws_b, request.percent)
        else:
            mixed = latents.mix_styles(ws_a, ws_b, *self.layer_range(request.layers))
        runtime = self.runtime

        frames = await self.executor.run(lambda: render_frames(runtime.generator, mixed), priority=Priority.FINALIZE)
        image = frames[0]  # [H, W, 3]
        return await asyncio.to_thread(encode_image, image, "png")

    async def morph(self, request: MorphRequest) -> bytes:
        """A video morphing through the faces (MP4 or GIF bytes)."""
        keyframes = torch.cat([await self._face_ws(face) for face in request.faces])  # [K, num_ws, w_dim]
        path = latents.morph_path(keyframes, request.frames_per_transition, loop=request.loop)
        if path.shape[0] > MAX_VIDEO_FRAMES:
            raise UserError(f"that would be {path.shape[0]} frames; at most {MAX_VIDEO_FRAMES}", status=422,
                            code="bad_request")
        return await self._video(path, request.format)

    async def loop(self, request: LoopRequest) -> bytes:
        """A seamless "deform loop" video of one face (MP4 or GIF bytes)."""
        ws = await self._face_ws(request.face)
        layers = None if request.layers is None else self.layer_range(request.layers)
        path = latents.deform_loop(ws, request.frames, layers=layers, amplitude=request.amplitude,
                                   spread=self.runtime.spread, seed=request.seed)
        return await self._video(path, request.format)

    async def _video(self, path: torch.Tensor, kind: str) -> bytes:
        """Render on the executor batch by batch (previews interleave), then encode on a thread."""
        runtime = self.runtime
        frames = await self.executor.run_job(lambda: render_job(runtime.generator, path, runtime.device),
                                             priority=Priority.ENCODE)
        return await asyncio.to_thread(encode_video, frames, kind)
