"""Small request helpers shared by the route modules: the session token, the JSON body, the server state."""

from __future__ import annotations

import json
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


MAX_JSON_BYTES = 64 * 1024


async def json_body(request: Request) -> Any:
    """Return the parsed JSON body (at most MAX_JSON_BYTES), or raise a 413 / 422 ApiError."""
    data = await read_limited(request, MAX_JSON_BYTES)
    try:
        return json.loads(data)
    except ValueError:
        raise ApiError(422, "bad_json", "the request body must be JSON") from None


class TokenBucket:
    """Allows ``rate`` events per second on average, in bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.allowance, self.updated = burst, now

    def take(self, now: float) -> bool:
        """Spend one event; return False (and spend nothing) when the bucket is empty."""
        self.allowance = min(self.burst, self.allowance + (now - self.updated) * self.rate)
        self.updated = now
        if self.allowance < 1.0:
            return False
        self.allowance -= 1.0
        return True


class ClientRateLimiter:
    """One token bucket per client address, forgetting the least recently seen beyond ``max_clients``."""

    def __init__(self, per_minute: float, max_clients: int = 4096) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, client: str, now: float) -> bool:
        """Whether ``client`` may do one more thing now."""
        bucket = self._buckets.pop(client, None) or TokenBucket(self.per_minute / 60.0, self.per_minute, now)
        self._buckets[client] = bucket  # most recently seen last
        while len(self._buckets) > self.max_clients:
            self._buckets.pop(next(iter(self._buckets)))
        return bucket.take(now)


async def read_limited(request: Request, limit: int) -> bytes:
    """Return the request body, refusing (413) more than ``limit`` bytes without reading further."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, "body_too_large", f"request bodies are limited to {limit} bytes")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
