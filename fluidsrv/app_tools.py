"""REST routes for a session's on-demand directions (SeFa by layer range, text prompts) and the latent tools
(mix, morph, loop) of prepared sessions.

On-demand directions belong to the session that asked for them (its token is required): they become sliders
of that session only. The tools work in the base generator's latent space: faces are the sessions' inverted
``ws`` and are rendered with the shared base generator (each session's fine-tuning only fits its own face, so
it is not used here); videos render a batch of frames per executor step, so previews interleave.
"""

from __future__ import annotations

import asyncio
import io
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fluidsrv import latents
from fluidsrv.convert import tensor_to_image
from fluidsrv.executor import Priority
from fluidsrv.plugins import PluginError
from fluidsrv.protocol import ApiError, bad_request
from fluidsrv.runtime import Runtime, add_session_directions
from fluidsrv.sessions import SessionError
from fluidsrv.stages import Direction, Progress, StepJob
from fluidsrv.videos import render_frames, write_video
from fluidsrv.web import json_body, server_of

if TYPE_CHECKING:
    from fluidsrv.app import Server

MAX_SEFA_VECTORS = 32
MAX_PROMPT_CHARS = 100
MAX_MORPH_FACES = 8
MAX_VIDEO_FRAMES = 480
VIDEO_BATCH = 8  # frames rendered per executor step
VIDEO_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}


def direction_dict(direction: Direction) -> dict[str, Any]:
    """Return the JSON form of a direction, as ``GET /api/directions`` lists it."""
    return {
        "name": direction.name,
        "label": direction.label,
        "group": direction.group,
        "min": direction.slider_range[0],
        "max": direction.slider_range[1],
        "layers": list(direction.layers) if direction.layers else None,
        "provenance": direction.provenance,
    }


def features(runtime: Runtime) -> dict[str, Any]:
    """Return which optional endpoints work on this server (for ``/api/config``)."""
    text_reason = runtime.text_unavailable()
    return {"sefa": True, "text": text_reason is None, "text_reason": text_reason, "tools": True}


# ---- request parsing ---------------------------------------------------------------------------------


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


def parse_layer_range(raw: Any, num_ws: int, *, allow_none: bool = False) -> tuple[int, int] | None:
    """Parse ``[start, stop]`` or a preset name ("coarse", "middle", "fine") into a ws layer range."""
    if raw is None and allow_none:
        return None
    if isinstance(raw, str):
        try:
            return latents.parse_layers(raw, num_ws)
        except ValueError as error:
            raise bad_request(str(error), "bad_layers") from None
    if (
        isinstance(raw, list)
        and len(raw) == 2
        and all(isinstance(value, int) and not isinstance(value, bool) for value in raw)
        and 0 <= raw[0] < raw[1] <= num_ws
    ):
        return raw[0], raw[1]
    raise bad_request(f'"layers" must be [start, stop] with 0 <= start < stop <= {num_ws}, or a preset', "bad_layers")


def _bounded_int(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f'"{key}" must be an integer in [{low}, {high}]')
    return value


def _bounded_float(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f'"{key}" must be a number')
    if not low <= float(value) <= high:
        raise bad_request(f'"{key}" must be within [{low:g}, {high:g}]')
    return float(value)


def _video_type(data: dict[str, Any]) -> str:
    kind = data.get("format", "mp4")
    if kind not in VIDEO_TYPES:
        raise bad_request(f'"format" must be one of {", ".join(VIDEO_TYPES)}')
    return str(kind)


async def _face_ws(request: Request, reference: Any) -> torch.Tensor:
    """Return the ws [1, num_ws, w_dim] of a prepared session named by ``{"session_id": ..., "token": ...}``."""
    keys = ("session_id", "token")
    if not isinstance(reference, dict) or not all(isinstance(reference.get(key), str) for key in keys):
        raise bad_request('each face must be {"session_id": "...", "token": "..."}', "bad_face")
    store = server_of(request).store
    try:
        store.check(reference["session_id"], reference["token"])
        session = await asyncio.to_thread(store.get, reference["session_id"], reference["token"])
    except SessionError as error:
        raise ApiError(error.status, error.code, f"face {reference['session_id'][:8]}…: {error}") from None
    if session.ws is None:
        raise ApiError(409, "not_ready", "every face must be picked and prepared before it can be used here")
    return session.ws


# ---- directions ----------------------------------------------------------------------------------------


async def session_directions(request: Request) -> JSONResponse:
    """List a session's sliders: the shared directions and the ones it added."""
    server = server_of(request)
    session = await server.open_session(request)
    sliders = server.runtime.directions_for(session)
    return JSONResponse({"directions": [direction_dict(direction) for direction in sliders.values()]})


async def sefa_directions(request: Request) -> JSONResponse:
    """Compute the top-k SeFa directions of a layer range and add them as sliders of this session."""
    server = server_of(request)
    session = await server.open_session(request)
    data = _object(await json_body(request))
    layers = parse_layer_range(data.get("layers"), server.runtime.generator.num_ws)
    assert layers is not None
    count = _bounded_int(data, "k", 5, 1, MAX_SEFA_VECTORS)
    found = await server.executor.run(
        lambda: server.runtime.sefa_directions(layers, count), priority=Priority.FINALIZE, owner=session.id
    )
    add_session_directions(session, found)
    await asyncio.to_thread(server.store.update, session)
    return JSONResponse({"directions": [direction_dict(direction) for direction in found]})


async def text_direction(request: Request) -> JSONResponse:
    """Find the direction of a text prompt (CLIP) and add it as a slider of this session."""
    server = server_of(request)
    session = await server.open_session(request)
    reason = server.runtime.text_unavailable()
    if reason is not None:
        raise ApiError(404, "feature_unavailable", f"text prompts need the CLIP plugin: {reason}")
    data = _object(await json_body(request))
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not 0 < len(prompt.strip()) <= MAX_PROMPT_CHARS:
        raise bad_request(f'"prompt" must be a non-empty string of at most {MAX_PROMPT_CHARS} characters')
    layers = parse_layer_range(data.get("layers"), server.runtime.generator.num_ws, allow_none=True)
    try:
        found = await server.executor.run(
            lambda: server.runtime.text_direction(prompt.strip(), layers), priority=Priority.FINALIZE,
            owner=session.id,
        )
    except PluginError as error:
        raise ApiError(422, "plugin_unavailable", str(error)) from None
    add_session_directions(session, [found])
    await asyncio.to_thread(server.store.update, session)
    return JSONResponse({"directions": [direction_dict(found)]})


# ---- tools -------------------------------------------------------------------------------------------


async def tools(request: Request) -> JSONResponse:
    """List the latent tools this server offers."""
    return JSONResponse({"mix": True, "morph": True, "loop": True})


async def mix(request: Request) -> Response:
    """Mix two faces: B's styles on a layer range of A, or A made ``percent`` % more like B; returns a PNG."""
    server = server_of(request)
    data = _object(await json_body(request))
    faces = data.get("faces")
    if not isinstance(faces, list) or len(faces) != 2:
        raise bad_request('"faces" must list exactly two faces', "bad_face")
    ws_a, ws_b = [await _face_ws(request, face) for face in faces]
    runtime = server.runtime
    if "percent" in data:
        percent = _bounded_float(data, "percent", 50.0, -200.0, 300.0)
        mixed = latents.more_like(ws_a, ws_b, percent)
    else:
        layers = parse_layer_range(data.get("layers", "coarse"), runtime.generator.num_ws)
        assert layers is not None
        mixed = latents.mix_styles(ws_a, ws_b, *layers)

    def render() -> bytes:
        with torch.inference_mode():
            image = tensor_to_image(runtime.generator.synthesis(mixed.to(runtime.device)))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    png = await server.executor.run(render, priority=Priority.FINALIZE)
    return Response(png, media_type="image/png")


async def morph(request: Request) -> Response:
    """A video morphing through 2–8 faces (MP4 or GIF)."""
    server = server_of(request)
    data = _object(await json_body(request))
    faces = data.get("faces")
    if not isinstance(faces, list) or not 2 <= len(faces) <= MAX_MORPH_FACES:
        raise bad_request(f'"faces" must list 2 to {MAX_MORPH_FACES} faces', "bad_face")
    per_transition = _bounded_int(data, "frames_per_transition", 24, 2, 120)
    loop = data.get("loop", False)
    if not isinstance(loop, bool):
        raise bad_request('"loop" must be true or false')
    kind = _video_type(data)
    keyframes = torch.cat([await _face_ws(request, face) for face in faces])  # [K, num_ws, w_dim]
    path = latents.morph_path(keyframes, per_transition, loop=loop)
    if path.shape[0] > MAX_VIDEO_FRAMES:
        raise bad_request(f"that would be {path.shape[0]} frames; at most {MAX_VIDEO_FRAMES}")
    video = await _video(server, path, kind)
    return Response(video, media_type=VIDEO_TYPES[kind], headers=_attachment(f"morph.{kind}"))


async def loop_video(request: Request) -> Response:
    """A seamless "deform loop" of one face: sine-modulated random offsets on a layer range (MP4 or GIF)."""
    server = server_of(request)
    data = _object(await json_body(request))
    runtime = server.runtime
    ws = await _face_ws(request, data.get("face"))
    layers = parse_layer_range(data.get("layers"), runtime.generator.num_ws, allow_none=True)
    frames = _bounded_int(data, "frames", 48, 8, MAX_VIDEO_FRAMES)
    amplitude = _bounded_float(data, "amplitude", 1.0, 0.0, 5.0)
    seed = _bounded_int(data, "seed", 0, 0, 2**31 - 1)
    kind = _video_type(data)
    path = latents.deform_loop(ws, frames, layers=layers, amplitude=amplitude, spread=runtime.spread, seed=seed)
    video = await _video(server, path, kind)
    return Response(video, media_type=VIDEO_TYPES[kind], headers=_attachment(f"loop.{kind}"))


def render_job(runtime: Runtime, path: torch.Tensor) -> StepJob[np.ndarray]:
    """Render latents ``path`` [F, num_ws, w_dim] with the base generator, one batch of frames per step."""
    batches = []
    for start in range(0, path.shape[0], VIDEO_BATCH):
        batch = path[start : start + VIDEO_BATCH].to(runtime.device)  # [B, num_ws, w_dim]
        batches.append(render_frames(runtime.generator, batch))  # [B, H, W, 3]
        yield Progress("render", min(start + VIDEO_BATCH, path.shape[0]), path.shape[0], "rendering frames")
    return np.concatenate(batches)  # [F, H, W, 3]


async def _video(server: Server, path: torch.Tensor, kind: str) -> bytes:
    """Render on the executor step by step, then encode off the event loop; return the file's bytes."""
    frames = await server.executor.run_job(lambda: render_job(server.runtime, path), priority=Priority.ENCODE)
    return await asyncio.to_thread(_encode_video, frames, kind)


def _encode_video(frames: np.ndarray, kind: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="fluidsrv-video-") as folder:
        target = Path(folder) / f"video.{kind}"
        write_video(target, frames, fps=24.0)
        return target.read_bytes()


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
"""The routes of this module, mounted by :func:`fluidsrv.app.create_app`."""
