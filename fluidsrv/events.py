"""What the editing service tells the clients of a session: the event values and the subscriber registry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fluidsrv.identity import IdentityReading
from fluidsrv.session.model import JobProgress, Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """A running job's step, with an intermediate image (encoded as PREVIEW_FORMAT) and the step it was made at."""

    session_id: str
    progress: JobProgress
    frame: bytes | None = None
    frame_step: int = 0


@dataclass(frozen=True)
class ReadyEvent:
    """A face was prepared: the session is ready for sliders."""

    session: Session


@dataclass(frozen=True)
class FailedEvent:
    """Preparing failed; ``message`` says why."""

    session_id: str
    code: str
    message: str


@dataclass(frozen=True)
class FinalizedEvent:
    """The finalized photo can be downloaded."""

    session_id: str


@dataclass(frozen=True)
class DeletedEvent:
    """The session was deleted."""

    session_id: str


@dataclass(frozen=True)
class IdentityEvent:
    """The identity meter measured a preview or the finalized photo of the session."""

    session_id: str
    reading: IdentityReading


Event = ProgressEvent | ReadyEvent | FailedEvent | FinalizedEvent | DeletedEvent | IdentityEvent
Subscriber = Callable[[Event], None]


class Subscriptions:
    """The subscribers of every session; ``on_last_left(session_id)`` runs when a session's last one leaves."""

    def __init__(self, on_last_left: Callable[[str], None]) -> None:
        self._on_last_left = on_last_left
        self._subscribers: dict[str, dict[int, Subscriber]] = {}
        self._next_key = 0

    def subscribe(self, session_id: str, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._next_key += 1
        key = self._next_key
        self._subscribers.setdefault(session_id, {})[key] = subscriber

        def unsubscribe() -> None:
            remaining = self._subscribers.get(session_id)
            if remaining is None or remaining.pop(key, None) is None:
                return
            if not remaining:
                del self._subscribers[session_id]
                self._on_last_left(session_id)

        return unsubscribe

    def count(self, session_id: str) -> int:
        """How many subscribers the session has."""
        return len(self._subscribers.get(session_id, {}))

    def publish(self, session_id: str, event: Event) -> None:
        """Hand ``event`` to every subscriber of the session; a failing subscriber is logged, never raised."""
        for subscriber in list(self._subscribers.get(session_id, {}).values()):
            try:
                subscriber(event)
            except Exception:
                log.exception("an event subscriber of session %s failed", session_id[:8])
