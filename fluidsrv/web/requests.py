"""Reading requests safely: the session token, bounded bodies and uploads, rate limits, the admin token."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.requests import Request
from starlette.websockets import WebSocket

from fluidsrv.protocol import ApiError, parse_json
from fluidsrv.service import EditService, Session

MAX_JSON_BYTES = 64 * 1024
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def bearer_token(request: Request | WebSocket) -> str | None:
    """Return the token of an ``Authorization: Bearer ...`` header, or None without one."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def token_of(request: Request | WebSocket) -> str:
    """Return the session token of a request: ``Authorization: Bearer``, ``X-Session-Token`` or ``?token=``."""
    bearer = bearer_token(request)
    if bearer is not None:
        return bearer
    return request.headers.get("x-session-token") or request.query_params.get("token", "")


def service_of(request: Request | WebSocket) -> EditService:
    """Return the running server's editing service."""
    service: EditService = request.app.state.service
    return service


async def open_session(request: Request) -> Session:
    """Return the session named in the path, authorised by the request's token."""
    return await service_of(request).open(request.path_params["session_id"], token_of(request))


async def json_body(request: Request) -> Any:
    """Return the parsed JSON body (at most MAX_JSON_BYTES, bounded as :func:`parse_json` says), or a 413 / 422."""
    return parse_json(await read_limited(request, MAX_JSON_BYTES), "bad_json")


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


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str | None]:
    """Return the uploaded file (raw body or the multipart field "file") and its name, within ``max_bytes``."""
    too_large = ApiError(413, "upload_too_large", f"uploads are limited to {max_bytes // (1024 * 1024)} MiB")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise too_large
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        if not (declared and declared.isdigit()):
            raise ApiError(411, "length_required", "multipart uploads need a Content-Length header")
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=max_bytes)
        except Exception as error:  # starlette raises its own parse errors for malformed multipart bodies
            raise ApiError(422, "bad_upload", f"could not read the multipart upload: {error}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_file", 'send the photo as the multipart field "file" or as the raw body')
        data = await upload.read(max_bytes + 1)
        filename = upload.filename
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
        data, filename = b"".join(chunks), request.query_params.get("filename")
    if len(data) > max_bytes:
        raise too_large
    return data, filename


def require_admin(admin_token: str | None, request: Request) -> None:
    """Refuse unless ``Authorization: Bearer`` carries the admin token; never read from the URL or X-Session-Token."""
    if not admin_token:
        raise ApiError(403, "admin_disabled",
                       "set FLUIDSRV_ADMIN_TOKEN to enable the admin routes (plugin switching, /api/stats)")
    given = bearer_token(request) or ""
    if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), admin_token.encode("utf-8", "surrogatepass")):
        raise ApiError(401, "bad_admin_token", "this needs the server's admin token (Authorization: Bearer ...)")


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
