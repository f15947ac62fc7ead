"""The one base class of every refusal a user or client should see."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A refusal to show as is: an HTTP ``status``, a stable machine-readable ``code`` and a human ``message``.

    Subclasses set ``status`` and ``code`` as class attributes or pass them per instance.
    """

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON body of the error: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by class, message, status and code (subclasses' own ``__init__`` signatures never matter), so
        a refusal raised in another process (a Ray replica) reaches the client as itself."""
        return _rebuild, (type(self), self.message, self.status, self.code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class NoFaceError(UserError):
    """An upload in which no face was found."""

    status = 422
    code = "no_face"

    def __init__(self) -> None:
        super().__init__("no face was found in this photo; try a photo where a face is clearly visible")


def _rebuild(cls: type[UserError], message: str, status: int, code: str) -> UserError:
    """Recreate a pickled :class:`UserError` without calling its class's ``__init__``."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.message, error.status, error.code = message, status, code
    return error
