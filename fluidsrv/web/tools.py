"""REST routes for a session's on-demand directions (SeFa by layer range, text prompts) and the latent tools
(mix, morph, loop) of prepared sessions.

On-demand directions belong to the session that asked for them (its token is required): they become sliders
of that session only. The tools work in the base generator's latent space (see
:meth:`fluidsrv.service.EditService.mix`).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fluidsrv.protocol import (
    VIDEO_TYPES,
    parse_loop_request,
    parse_mix_request,
    parse_morph_request,
    parse_sefa_request,
    parse_text_request,
)
from fluidsrv.web.paths import hide_request_paths
from fluidsrv.web.requests import json_body, open_session, service_of
from fluidsrv.web.views import direction_view


async def session_directions(request: Request) -> JSONResponse:
    """List a session's sliders: the shared directions and the ones it added."""
    session = await open_session(request)
    sliders = service_of(request).session_directions(session)
    body = {"directions": [direction_view(direction) for direction in sliders.values()]}
    return JSONResponse(hide_request_paths(request, body))  # a direction file's provenance names its path


async def sefa_directions(request: Request) -> JSONResponse:
    """Compute the top-k SeFa directions of a layer range and add them as sliders of this session."""
    session = await open_session(request)
    found = await service_of(request).add_sefa_directions(session, parse_sefa_request(await json_body(request)))
    return JSONResponse({"directions": [direction_view(direction) for direction in found]})


async def text_direction(request: Request) -> JSONResponse:
    """Find the direction of a text prompt (CLIP) and add it as a slider of this session."""
    session = await open_session(request)
    service = service_of(request)
    service.require_text_prompts()  # say so before complaining about the body
    found = await service.add_text_direction(session, parse_text_request(await json_body(request)))
    return JSONResponse({"directions": [direction_view(direction) for direction in found]})


async def tools(request: Request) -> JSONResponse:
    """List the latent tools this server offers."""
    return JSONResponse({"mix": True, "morph": True, "loop": True})


async def mix(request: Request) -> Response:
    """Mix two faces: B's styles on a layer range of A, or A made ``percent`` % more like B; returns a PNG."""
    png = await service_of(request).mix(parse_mix_request(await json_body(request)))
    return Response(png, media_type="image/png")


async def morph(request: Request) -> Response:
    """A video morphing through 2–8 faces (MP4 or GIF)."""
    parsed = parse_morph_request(await json_body(request))
    video = await service_of(request).morph(parsed)
    return Response(video, media_type=VIDEO_TYPES[parsed.format], headers=_attachment(f"morph.{parsed.format}"))


async def loop_video(request: Request) -> Response:
    """A seamless "deform loop" of one face: sine-modulated random offsets on a layer range (MP4 or GIF)."""
    parsed = parse_loop_request(await json_body(request))
    video = await service_of(request).loop(parsed)
    return Response(video, media_type=VIDEO_TYPES[parsed.format], headers=_attachment(f"loop.{parsed.format}"))


def _attachment(filename: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{filename}"'}


SESSION = "/api/sessions/{session_id:str}"
ROUTES = [
    Route(f"{SESSION}/directions", session_directions),
    Route(f"{SESSION}/directions/sefa", sefa_directions, methods=["POST"]),
    Route(f"{SESSION}/directions/text", text_direction, methods=["POST"]),
    Route("/api/tools", tools),
    Route("/api/tools/mix", mix, methods=["POST"]),
    Route("/api/tools/morph", morph, methods=["POST"]),
    Route("/api/tools/loop", loop_video, methods=["POST"]),
]
"""The routes of this module, mounted by :func:`fluidsrv.web.app.create_app`."""
