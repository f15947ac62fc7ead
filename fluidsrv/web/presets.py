"""REST routes of the single-edit presets: list them, and apply one to an uploaded photo (no session needed).

``POST /api/presets/{name}/apply`` takes the photo like ``POST /api/sessions`` (multipart field ``file`` or the raw
body, the same size limits and per-address upload rate) and answers the edited photo as a JPEG of its size; only
the faces' heads change. ``?face=N`` edits one face (numbered left to right) instead of all of them.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fluidsrv.protocol import ApiError, parse_face_query
from fluidsrv.web.requests import ClientRateLimiter, read_upload, service_of


async def list_presets(request: Request) -> JSONResponse:
    """List the presets with what each distils (direction, strength, generator) and its fidelity."""
    return JSONResponse({"presets": await service_of(request).preset_list()})


async def apply_preset(request: Request) -> Response:
    """Apply a preset to every face of the uploaded photo (or ``?face=N``) and answer the JPEG."""
    service = service_of(request)
    limiter: ClientRateLimiter = request.app.state.uploads  # one upload rate for sessions and presets
    client = request.client.host if request.client else "unknown"
    if not limiter.allow(client, time.monotonic()):
        limit = service.settings.max_uploads_per_minute
        raise ApiError(429, "rate_limited", f"at most {limit} uploads a minute from one address; try again soon")
    name = request.path_params["name"]
    face = parse_face_query(request.query_params.get("face"))
    data, filename = await read_upload(request, service.settings.max_upload_bytes)
    result = await service.apply_preset(name, data, face=face, client=client)
    stem = str(filename or "photo").rsplit(".", 1)[0] or "photo"
    safe_stem = "".join(ch for ch in stem if ch.isalnum() or ch in "-_ ")[:80] or "photo"
    safe_name = "".join(ch for ch in name if ch.isalnum() or ch in "-_")[:48]
    return Response(result, media_type="image/jpeg",
                    headers={"Content-Disposition": f'attachment; filename="{safe_stem}-{safe_name}.jpg"'})


ROUTES = [
    Route("/api/presets", list_presets),
    Route("/api/presets/{name:str}/apply", apply_preset, methods=["POST"]),
]
