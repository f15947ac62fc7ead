"""The server's refusals as typed exceptions: one class per family of error codes, each an :class:`ApiError`.

Every exception carries the answer's HTTP ``status``, the stable machine ``code`` and the server's ``message``.
A websocket ``error`` event has no HTTP status: its exception gets the status its family answers over HTTP.
"""

from __future__ import annotations

from typing import Any

from fluidsrv.protocol import ApiError


class ClientError(ApiError):
    """The base of the client's typed refusals; ``seq`` is the websocket message an ``error`` event answers."""

    default_status = 422
    seq: int | None = None


class BadRequestError(ClientError):
    """A malformed or out-of-range request (422: bad JSON, a bad slider, face index or layer range)."""


class UnsupportedMediaError(BadRequestError):
    """An upload that is not a readable photo (``unsupported_type``, ``corrupt_image``, ``empty_upload``...)."""

    default_status = 415


class NoFaceError(BadRequestError):
    """The photo was read but holds no face (``no_face``)."""


class TooLargeError(BadRequestError):
    """An upload, image, body or websocket message over the server's limits (413)."""

    default_status = 413


class NotFoundError(ClientError):
    """Something that does not exist (404): a session, a result not made yet, an optional feature."""

    default_status = 404


class UnknownSessionError(NotFoundError):
    """No such session — or a wrong token: the server answers both alike, so nobody learns which ids exist."""


class TokenError(ClientError):
    """The admin token is wrong (401 ``bad_admin_token``) or the server has none set (403 ``admin_disabled``)."""

    default_status = 401


class ConflictError(ClientError):
    """A request the session's state does not allow now (409)."""

    default_status = 409


class NotReadyError(ConflictError):
    """The face is not prepared yet (``not_ready``), e.g. sliders or finalize before ``ready``."""


class BusyError(ConflictError):
    """The session is already running a job (``busy``), or a newer state replaced this one (``superseded``)."""


class PrepareFailedError(ClientError):
    """Preparing the face failed, was cancelled or was interrupted: pick the face again."""

    default_status = 500


class RateLimitedError(ClientError):
    """Too many of something (429): uploads, sessions, sockets, messages, decoded pixels."""

    default_status = 429


class ServerError(ClientError):
    """The server failed or cannot serve now (5xx): out of memory, storage down, shutting down, a bug."""

    default_status = 500


class ProtocolError(ClientError):
    """The server's answer is not what the protocol says (not JSON, a missing field, a closed socket)."""

    default_status = 502

    def __init__(self, message: str, status: int = 502, code: str = "protocol_error") -> None:
        super().__init__(status, code, message)


_CODES: dict[str, type[ClientError]] = {
    "no_face": NoFaceError,
    "unsupported_type": UnsupportedMediaError,
    "corrupt_image": UnsupportedMediaError,
    "empty_upload": UnsupportedMediaError,
    "bad_upload": UnsupportedMediaError,
    "missing_file": UnsupportedMediaError,
    "upload_too_large": TooLargeError,
    "image_too_large": TooLargeError,
    "body_too_large": TooLargeError,
    "message_too_large": TooLargeError,
    "length_required": TooLargeError,
    "unknown_session": UnknownSessionError,
    "session_deleted": UnknownSessionError,
    "no_result": NotFoundError,
    "feature_unavailable": NotFoundError,
    "bad_admin_token": TokenError,
    "admin_disabled": TokenError,
    "not_ready": NotReadyError,
    "busy": BusyError,
    "superseded": BusyError,
    "cancelled": ConflictError,
    "switch_unsupported": ConflictError,
    "prepare_failed": PrepareFailedError,
    "rate_limited": RateLimitedError,
    "too_many_sessions": RateLimitedError,
    "too_many_sockets": RateLimitedError,
    "decode_budget": RateLimitedError,
    **dict.fromkeys(["internal_error", "preview_failed", "finalize_failed", "out_of_memory", "storage_unavailable",
                     "shutting_down", "stage_unavailable", "session_state"], ServerError),
}
_STATUSES: dict[int, type[ClientError]] = {401: TokenError, 403: TokenError, 404: NotFoundError, 409: ConflictError,
                                        413: TooLargeError, 415: UnsupportedMediaError, 429: RateLimitedError}


def error_for(code: str, message: str, status: int | None = None, seq: int | None = None) -> ClientError:
    """The typed exception of an error ``code`` (with its family's status when ``status`` is None)."""
    family = _CODES.get(code)
    if family is None:
        family = ServerError if status is not None and status >= 500 else _STATUSES.get(status or 0, BadRequestError)
    error = family(status if status is not None else family.default_status, code, message)
    error.seq = seq
    return error


def error_from_body(status: int, body: Any) -> ClientError:
    """The typed exception of an HTTP error answer ``{"error": {"code": ..., "message": ...}}``."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return error_for(error["code"], str(error.get("message", "")), status)
    fallback = "internal_error" if status >= 500 else "http_error"
    return error_for(fallback, f"the server answered HTTP {status} without an error body", status)
