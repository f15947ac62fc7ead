"""Sessions: the typed record (:mod:`.model`), the store (:mod:`.store`) and the disk codec (:mod:`.spill`)."""

from fluidsrv.session.model import (
    EditState,
    JobProgress,
    Prepared,
    Session,
    SliderHistory,
    Status,
    StatusError,
    Upload,
)
from fluidsrv.session.store import (
    BadTokenError,
    SessionError,
    SessionStore,
    StoreStats,
    TooManySessionsError,
    UnknownSessionError,
)

__all__ = [
    "BadTokenError",
    "EditState",
    "JobProgress",
    "Prepared",
    "Session",
    "SessionError",
    "SessionStore",
    "SliderHistory",
    "Status",
    "StatusError",
    "StoreStats",
    "TooManySessionsError",
    "UnknownSessionError",
    "Upload",
]
