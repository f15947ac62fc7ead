"""The presets of the editing service: list the presets of the weights folder and apply one to an uploaded photo.

Applying a preset is one request, with no session: the upload is decoded and searched for faces under the same
budgets as a new session's (:meth:`decoding_share`), the preset's network and the segmenter run on the device
executor at finalize priority, and laying the edits into the photo and the JPEG encode run on a thread. The base
generator is never used. :class:`PresetTools` is a part of :class:`fluidsrv.service.EditService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from fluidsrv import pipeline, presets
from fluidsrv.backends.stages import StageBackend
from fluidsrv.errors import NoFaceError, UserError
from fluidsrv.executor import ExecutorError, GpuExecutor, Priority
from fluidsrv.runtime import Runtime
from fluidsrv.settings import Settings

log = logging.getLogger(__name__)
MAX_PRESET_FACES = 16  # faces one preset request edits at most (a crowd photo would hold the device long)


class PresetLibrary:
    """The preset files of one folder: their facts (from the headers) and the loaded networks, each kept until its
    file changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._facts: dict[Path, tuple[float, presets.PresetFacts | None]] = {}
        self._loaded: dict[Path, tuple[float, str, presets.Preset]] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[dict[str, Any]]:
        """The facts of every readable preset, by name (a broken file is logged and left out)."""
        listed = []
        for path in presets.find_presets(self.folder).values():
            facts = self._read(path)
            if facts is not None:
                listed.append(facts.describe())
        return listed

    def _read(self, path: Path) -> presets.PresetFacts | None:
        try:
            stamp = path.stat().st_mtime
        except OSError:  # removed since the folder was listed
            return None
        with self._lock:
            cached = self._facts.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            facts: presets.PresetFacts | None = presets.read_facts(path)[0]
        except presets.PresetError as error:
            log.warning("preset %s left out: %s", path.name, error)
            facts = None
        with self._lock:
            self._facts[path] = (stamp, facts)
        return facts

    def path(self, name: str) -> Path:
        """The file of the preset ``name``; a 404 ``unknown_preset`` naming the known ones when there is none."""
        found = presets.find_presets(self.folder)
        if name not in found:
            known = ", ".join(found) or "none"
            raise UserError(f"there is no preset {name[:48]!r} (presets: {known})", status=404,
                            code="unknown_preset")
        return found[name]

    def load(self, path: Path, device: torch.device) -> presets.Preset:
        """Device: the preset of ``path`` on ``device``, loaded once per version of its file."""
        try:
            stamp = path.stat().st_mtime
        except OSError as error:  # removed since it was listed
            raise presets.PresetError(f"its file cannot be read: {error}") from None
        with self._lock:
            cached = self._loaded.get(path)
        if cached is not None and cached[0] == stamp and cached[1] == str(device):
            return cached[2]
        try:
            preset = presets.load_preset(path, device)
        except presets.PresetError:
            raise
        except Exception as error:  # a torn or foreign file (safetensors' own errors)
            raise presets.PresetError(f"its file is not a readable preset: {error}") from None
        with self._lock:
            self._loaded[path] = (stamp, str(device), preset)
        return preset


class PresetTools:
    """List and apply presets (the service provides ``decoding_share`` and the attributes below)."""

    runtime: Runtime
    executor: GpuExecutor
    settings: Settings
    stages: StageBackend

    def decoding_share(self, data: bytes, client: str | None) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold a share of the decode budget for ``data`` (provided by the service)."""
        raise NotImplementedError

    @functools.cached_property
    def preset_library(self) -> PresetLibrary:
        """The presets of the weights folder's ``presets/``."""
        return PresetLibrary(Path(self.runtime.settings.weights_dir) / presets.PRESETS_FOLDER)

    async def preset_list(self) -> list[dict[str, Any]]:
        """Every preset with its facts (direction, strength, generator, fidelity), off the event loop."""
        return await asyncio.to_thread(self.preset_library.describe)

    async def apply_preset(self, name: str, data: bytes, *, face: int | None = None,
                           client: str | None = None) -> bytes:
        """Apply the preset ``name`` to every face of an uploaded photo (or face ``face``); return the JPEG.

        The result has the photo's size and metadata; only pixels on the edited faces' heads change.
        """
        library, settings = self.preset_library, self.settings
        path = library.path(name)
        async with self.decoding_share(data, client):  # held until the photo has been laid out and encoded
            decoded, faces = await self.stages.detect(data, max_pixels=settings.max_pixels,
                                                      max_bytes=settings.max_upload_bytes)
            if not faces:
                raise NoFaceError()
            if face is not None and not 0 <= face < len(faces):
                raise UserError(f"face index {face} is out of range (found {len(faces)} faces)", status=422,
                                code="bad_face_index")
            chosen = presets.choose_faces(faces, face)
            if len(chosen) > MAX_PRESET_FACES:
                raise UserError(f"this photo has {len(chosen)} faces; a preset edits at most {MAX_PRESET_FACES} at "
                                "once: choose one with ?face=N", status=422, code="too_many_faces")
            segmenter, device, pixels = self.runtime.stage("segmenter"), self.runtime.device, decoded.pixels

            def edit() -> list[presets.FaceEdit]:
                return presets.edit_faces(library.load(path, device), segmenter, pixels, chosen)

            try:
                edits = await self.executor.run(edit, priority=Priority.FINALIZE)
            except ExecutorError as error:
                raise UserError(str(error), status=503, code="out_of_memory") from None
            except presets.PresetError as error:
                log.error("preset %s cannot be applied: %s", name, error)
                raise UserError(f"the preset {name!r} is broken on this server: {error}", status=503,
                                code="preset_broken") from None
            photo = await asyncio.to_thread(presets.lay_edits_into_photo, pixels, edits)
            return await asyncio.to_thread(pipeline.encode_result, photo, decoded.metadata)
