"""Small request helpers shared by the route modules: the session token, the JSON body, the server state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.websockets import WebSocket

from fluidsrv.protocol import ApiError

if TYPE_CHECKING:
    from fluidsrv.app import Server


def token_of(request: Request | WebSocket) -> str:
    """Return the session token of a request: ``Authorization: Bearer``, ``X-Session-Token`` or ``?token=``."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-session-token") or request.query_params.get("token", "")


def server_of(request: Request | WebSocket) -> Server:
    """Return the running server's state."""
    server: Server = request.app.state.server
    return server


async def json_body(request: Request) -> Any:
    """Return the parsed JSON body, or raise a 422 ApiError."""
    try:
        return await request.json()
    except ValueError:
        raise ApiError(422, "bad_json", "the request body must be JSON") from None
