"""Logging setup for the server: session tokens never reach a log line.

Two layers, both installed by :func:`install_redaction`:

* :class:`RedactTokens`, a filter on the server's loggers and handlers, redacts the record's string arguments
  one by one and keeps the arguments' shape (uvicorn's access formatter unpacks exactly five of them);
* :class:`RedactingFormatter` wraps each handler's formatter and redacts the finished line, which also covers
  tokens inside non-string arguments and tracebacks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

_TOKEN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
SERVER_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "fluidsrv")


def redact(text: str) -> str:
    """Return ``text`` with the value of every ``token=`` query parameter replaced by ``…``."""
    return _TOKEN.sub(r"\1…", text)


def _redact_value(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


def redact_args(args: Any) -> Any:
    """Return log-record arguments with every string redacted, in the same shape (tuple or mapping)."""
    if isinstance(args, tuple):
        return tuple(_redact_value(value) for value in args)
    if isinstance(args, Mapping):
        return {key: _redact_value(value) for key, value in args.items()}
    return args


class RedactTokens(logging.Filter):
    """A filter that redacts ``token=`` values (uvicorn logs request paths with their query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record's string arguments in place, keeping their shape; never drops a record."""
        record.args = redact_args(record.args)
        if isinstance(record.msg, str) and _TOKEN.search(record.msg):
            record.msg, record.args = _merged(record)
        return True


def _merged(record: logging.LogRecord) -> tuple[Any, Any]:
    """The message of a record whose template itself holds ``token=...``, formatted and redacted, with no args."""
    try:
        return redact(record.getMessage()), ()
    except Exception:  # a broken format: leave it to the handler to report, the formatter still redacts the line
        return record.msg, record.args


class RedactingFormatter(logging.Formatter):
    """Formats with another formatter, then redacts ``token=`` values from the finished text."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        """Return the inner formatter's text for ``record`` without token values."""
        return redact(self.inner.format(record))


def _protect_handler(handler: logging.Handler, token_filter: RedactTokens) -> None:
    if not any(isinstance(existing, RedactTokens) for existing in handler.filters):
        handler.addFilter(token_filter)
    if not isinstance(handler.formatter, RedactingFormatter):
        handler.setFormatter(RedactingFormatter(handler.formatter))


def install_redaction() -> None:
    """Redact tokens on the server's loggers, their handlers, the root's and the last-resort handler (idempotent)."""
    token_filter = RedactTokens()
    loggers = [logging.getLogger(name) for name in SERVER_LOGGERS]
    for logger in loggers:
        if not any(isinstance(existing, RedactTokens) for existing in logger.filters):
            logger.addFilter(token_filter)
    handlers = [handler for logger in [*loggers, logging.getLogger()] for handler in logger.handlers]
    if logging.lastResort is not None:  # what prints warnings of loggers without handlers (fluidsrv.* here)
        handlers.append(logging.lastResort)
    for handler in handlers:
        _protect_handler(handler, token_filter)
