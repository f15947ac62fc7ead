"""Logging setup for the server: session tokens never reach a log line."""

from __future__ import annotations

import logging
import re

_TOKEN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
SERVER_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "fluidsrv")


def redact(text: str) -> str:
    """Return ``text`` with the value of every ``token=`` query parameter replaced by ``…``."""
    return _TOKEN.sub(r"\1…", text)


class RedactTokens(logging.Filter):
    """A filter that redacts ``token=`` values (uvicorn logs request paths with their query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message without tokens; never drops a record."""
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install_redaction() -> None:
    """Attach :class:`RedactTokens` to the server's loggers and to every handler of the root logger."""
    token_filter = RedactTokens()
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        logger.addFilter(token_filter)
        for handler in logger.handlers:
            handler.addFilter(token_filter)
    for handler in logging.getLogger().handlers:
        handler.addFilter(token_filter)
