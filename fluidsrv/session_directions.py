"""The on-demand directions of the editing service: SeFa of a layer range and CLIP text prompts, per session.

A session's own sliders are added to its edit state (at most ``MAX_SESSION_DIRECTIONS``, the oldest dropped) and
written through to disk like every committed edit. :class:`SessionDirections` is a part of
:class:`fluidsrv.service.EditService`.
"""

from __future__ import annotations

from fluidsrv import latents
from fluidsrv.errors import UserError
from fluidsrv.executor import GpuExecutor, Priority
from fluidsrv.plugins import PluginError
from fluidsrv.protocol import LayerSpec, SefaRequest, TextRequest
from fluidsrv.runtime import Runtime
from fluidsrv.session.model import Session
from fluidsrv.stages import Direction


class SessionDirections:
    """SeFa and text-prompt sliders added to one session (the service provides ``save_edit``)."""

    runtime: Runtime
    executor: GpuExecutor

    async def save_edit(self, session: Session) -> None:
        """Write the session's edit state through to disk (provided by the service)."""
        raise NotImplementedError

    def layer_range(self, spec: LayerSpec) -> tuple[int, int]:
        """Resolve a layer range as sent (preset or [start, stop)) against the generator's num_ws."""
        num_ws = self.runtime.generator.num_ws
        if isinstance(spec, str):
            try:
                return latents.parse_layers(spec, num_ws)
            except ValueError as error:
                raise UserError(str(error), status=422, code="bad_layers") from None
        start, stop = spec
        if not 0 <= start < stop <= num_ws:
            raise UserError(f'"layers" must be [start, stop] with 0 <= start < stop <= {num_ws}, or a preset',
                            status=422, code="bad_layers")
        return start, stop

    async def add_sefa_directions(self, session: Session, request: SefaRequest) -> list[Direction]:
        """Compute the top-k SeFa directions of a layer range and add them as sliders of this session."""
        layers = self.layer_range(request.layers)
        found = await self.executor.run(lambda: self.runtime.sefa_directions(layers, request.k),
                                        priority=Priority.FINALIZE, owner=session.id)
        return await self._add_directions(session, found)

    def require_text_prompts(self) -> None:
        """Raise a 404 UserError unless text-prompt directions can be made here."""
        reason = self.runtime.text_unavailable()
        if reason is not None:
            raise UserError(f"text prompts need the CLIP plugin: {reason}", status=404, code="feature_unavailable")

    async def add_text_direction(self, session: Session, request: TextRequest) -> list[Direction]:
        """Find the direction of a text prompt (CLIP) and add it as a slider of this session."""
        self.require_text_prompts()
        layers = None if request.layers is None else self.layer_range(request.layers)
        try:
            found = await self.executor.run(lambda: self.runtime.text_direction(request.prompt, layers),
                                            priority=Priority.FINALIZE, owner=session.id)
        except PluginError as error:
            raise UserError(str(error), status=422, code="plugin_unavailable") from None
        return await self._add_directions(session, [found])

    async def _add_directions(self, session: Session, found: list[Direction]) -> list[Direction]:
        session.edit.add_directions(found)
        await self.save_edit(session)
        return found
