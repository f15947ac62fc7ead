"""Security headers on every HTTP response: a pure ASGI middleware, so websockets and streaming pass untouched.

The Content-Security-Policy allows only the app's own files (no inline scripts or styles), images from the
server, ``blob:`` (the photo, results) and ``data:`` (face thumbnails), and connections to the server itself,
its websocket included (``ws://`` / ``wss://`` of the request's own host, for browsers whose ``'self'`` does
not cover websockets).
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

POLICY = (
    "default-src 'self'",
    "img-src 'self' blob: data:",
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "object-src 'none'",
    "form-action 'self'",
)
"""The Content-Security-Policy directives; ``connect-src`` gains the request's ws/wss host."""

FIXED_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
"""The headers that are the same on every response."""

_HOST = re.compile(rb"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
"""A Host header safe to repeat in the policy: a DNS name or IPv4, or a bracketed IPv6, and a port."""


def content_security_policy(host: bytes | None) -> bytes:
    """The policy for a request to ``host`` (its Host header; an odd or missing one only gets ``'self'``)."""
    directives = list(POLICY)
    if host is not None and _HOST.fullmatch(host):
        name = host.decode("ascii")
        directives[2] = f"connect-src 'self' ws://{name} wss://{name}"
    return "; ".join(directives).encode("ascii")


class SecurityHeaders:
    """Adds the security headers to every HTTP response start; other ASGI traffic passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, adding the headers when an HTTP response starts."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((value for name, value in scope.get("headers", ()) if name == b"host"), None)
        extra = [(b"content-security-policy", content_security_policy(host)), *FIXED_HEADERS]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(item for item in extra if item[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
