"""The four stage deployments of the Ray Serve application (the ingress is :mod:`fluidsrv.cli.serve_ray`).

Every stage replica runs :class:`~fluidsrv.backends.local.LocalStages` on its own runtime and device executor;
what a replica needs of a session it reads from the shared storage (PostgreSQL + S3), never from another
process. The preview and finalize replicas keep a session's tuned models in a ``@serve.multiplexed`` cache keyed
``session_id:version`` -- only a cache: a replica that does not hold a session loads it from storage.

Each deployment's replicas, autoscaling and ``ray_actor_options`` come from a YAML file
(:data:`DEFAULT_DEPLOYMENTS`, or ``FLUIDSRV_RAY_CONFIG``); see docs/scale-out.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from ray import serve

from fluidsrv import pipeline
from fluidsrv.backends import open_storage
from fluidsrv.backends.local import LocalStages
from fluidsrv.backends.ray_stages import StaleSessionError
from fluidsrv.backends.storage import SessionStorage
from fluidsrv.executor import GpuExecutor, Priority
from fluidsrv.image_io import DecodedImage
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.pipeline import FinalRenders
from fluidsrv.runtime import Runtime
from fluidsrv.session import spill
from fluidsrv.session.model import Prepared, Session
from fluidsrv.settings import Settings, SettingsError
from fluidsrv.stages import Face, PreviewRenderer, Progress

log = logging.getLogger(__name__)

DEPLOYMENTS = ("ingress", "detect", "prepare", "preview", "finalize")
DEFAULT_DEPLOYMENTS = Path(__file__).with_name("ray_deployments.yaml")
"""Each deployment's options for one machine; copy it, change it and point ``FLUIDSRV_RAY_CONFIG`` at it."""
_SERVE_OPTIONS = {"num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests",
                  "max_queued_requests", "health_check_period_s", "health_check_timeout_s",
                  "graceful_shutdown_timeout_s"}
_OUR_OPTIONS = {"models_per_replica"}


def deployment_options(path: Path | None) -> dict[str, dict[str, Any]]:
    """Each deployment's options from the YAML file at ``path`` (default: :data:`DEFAULT_DEPLOYMENTS`), checked."""
    source = path or DEFAULT_DEPLOYMENTS
    try:
        loaded = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SettingsError(f"FLUIDSRV_RAY_CONFIG: cannot read {source}: {error}") from None
    if not isinstance(loaded, dict) or not set(loaded) <= set(DEPLOYMENTS):
        raise SettingsError(f"{source}: expected a mapping of {', '.join(DEPLOYMENTS)}")
    options: dict[str, dict[str, Any]] = {}
    for name in DEPLOYMENTS:
        entry = loaded.get(name) or {}
        unknown = set(entry) - _SERVE_OPTIONS - _OUR_OPTIONS
        if not isinstance(entry, dict) or unknown:
            raise SettingsError(f"{source}: {name}: unknown options {sorted(unknown)}")
        options[name] = dict(entry)
    return options


def serve_options(entry: dict[str, Any]) -> dict[str, Any]:
    """The options of one deployment's entry that Ray Serve takes (the rest are ours)."""
    return {key: value for key, value in entry.items() if key in _SERVE_OPTIONS}


def read_session(storage: SessionStorage, session_id: str, device: torch.device) -> Session:
    """A session as its last write left it in the shared storage (tensors on ``device``)."""
    stored = storage.read(session_id)
    if stored is None:
        raise StaleSessionError("this session is not in storage (deleted, or not written yet)")
    return spill.decode(stored.meta, stored.arrays, stored.tensors, device=device, history_limit=1)


class _Replica:
    """What every stage replica holds: a runtime on its device, its executor, the local stages and the storage."""

    def __init__(self, settings: Settings) -> None:
        logging.basicConfig(level=logging.INFO)
        self.settings = settings
        self.runtime = Runtime.build(settings)
        self.executor = GpuExecutor(self.runtime.device, long_job_share=settings.long_job_share)
        self.executor.start()
        self.stages = LocalStages(self.runtime, self.executor)
        self.storage = open_storage(settings)


@dataclass(frozen=True)
class SessionModels:
    """A session version's models on a replica: its prepared face, tuned generator and preview renderer."""

    prepared: Prepared
    generator: Generator
    renderer: PreviewRenderer


class _SessionModelsReplica(_Replica):
    """A replica that serves sessions' tuned models from a ``@serve.multiplexed`` cache."""

    def __init__(self, settings: Settings, models_per_replica: int = 8) -> None:
        super().__init__(settings)
        self._just_loaded: set[str] = set()

        async def load(model_id: str) -> SessionModels:
            return await self._load(model_id)

        self.session_models = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)

    async def _load(self, model_id: str) -> SessionModels:
        session_id, _, version = model_id.rpartition(":")
        session = await asyncio.to_thread(read_session, self.storage, session_id, torch.device("cpu"))
        prepared = session.prepared
        if prepared is None or str(prepared.version) != version:
            raise StaleSessionError(f"storage holds another version of this session than {version}")
        on_device = prepared.on(self.runtime.device)
        generator, renderer = await self.executor.run(
            lambda: self.runtime.build_session_models(on_device), priority=Priority.PREVIEW, owner=session_id)
        self._just_loaded.add(model_id)
        return SessionModels(on_device, generator, renderer)

    async def _models(self) -> tuple[str, SessionModels, bool]:
        """The current request's session models, and whether this request loaded them."""
        target = serve.get_multiplexed_model_id()
        models = await self.session_models(target)
        loaded = target in self._just_loaded
        self._just_loaded.discard(target)
        return target, models, loaded


class DetectReplica(_Replica):
    """Decodes uploads and finds their faces (CPU)."""

    async def detect(self, data: bytes, max_pixels: int, max_bytes: int) -> tuple[DecodedImage, tuple[Face, ...]]:
        """The decoded upload and its faces."""
        return await self.stages.detect(data, max_pixels=max_pixels, max_bytes=max_bytes)


class PrepareReplica(_Replica):
    """Prepares faces (align, encode, fine-tune, distil) on its device, streaming progress."""

    async def prepare(self, session_id: str, face_index: int, version: int) -> AsyncIterator[tuple[str, Any]]:
        """Yield ("progress", Progress) events, then ("prepared", Prepared) with the tensors on the CPU."""
        session = await asyncio.to_thread(read_session, self.storage, session_id, torch.device("cpu"))
        events: asyncio.Queue[Progress] = asyncio.Queue()
        job = asyncio.ensure_future(
            self.stages.prepare(session_id, session.upload, face_index, version, events.put_nowait))
        waiter: asyncio.Future[Progress] | None = None
        try:
            while not job.done() or not events.empty():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait({job, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield "progress", waiter.result()
                else:
                    waiter.cancel()
            prepared = job.result()
        finally:
            if waiter is not None and not waiter.done():
                waiter.cancel()
            if not job.done():
                job.cancel()  # the client left: the executor stops the job at its next step
                with contextlib.suppress(BaseException):
                    await job
        self.runtime.tuned.forget(session_id)  # this replica does not preview: keep nothing
        yield "prepared", prepared.on("cpu")


class PreviewReplica(_SessionModelsReplica):
    """Renders previews of the sessions whose models it holds."""

    async def render(self, ws: torch.Tensor, side: int) -> tuple[bytes, bool]:
        """The preview of ``ws`` for the request's session version, laid over the photo's crop and encoded as
        PREVIEW_FORMAT (as the ingress would: only a few KB travel back, not the frame), and whether it had to
        load the session's models."""
        target, models, loaded = await self._models()
        session_id = target.rpartition(":")[0]
        frame = await self.executor.run(
            lambda: pipeline.render_preview(models.renderer, ws.to(self.runtime.device), side),
            priority=Priority.PREVIEW, owner=session_id)
        encoded = await asyncio.to_thread(  # host work, off the device worker (the next render starts meanwhile)
            pipeline.encode_composed_preview, models.prepared, frame, self.settings.photo_detail)
        return encoded, loaded


class FinalizeReplica(_SessionModelsReplica):
    """Renders final faces (the tuned generator, then parse and inpaint on the CPU)."""

    async def finalize(self, ws: torch.Tensor) -> tuple[FinalRenders, bool]:
        """The final renders of ``ws`` for the request's session version, and whether it had to load it."""
        target, models, loaded = await self._models()
        session_id = target.rpartition(":")[0]
        stages = self.runtime.stages()
        renders = await self.executor.run_job(
            lambda: pipeline.render_final(stages, models.generator, models.prepared, ws.to(self.runtime.device)),
            priority=Priority.FINALIZE, owner=session_id)
        return renders, loaded
