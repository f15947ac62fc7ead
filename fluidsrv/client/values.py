"""What the client returns: typed, read-only views of the server's JSON answers and binary frames."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from fluidsrv.client.errors import ProtocolError

READY = "ready"
FAILED_STATUSES = frozenset({"failed", "cancelled", "interrupted"})
"""Statuses in which a prepare has ended without a ready face (pick the face again)."""


@dataclass(frozen=True)
class Face:
    """A face found in the photo: its index (left to right from 0), box, score, 5 landmarks and JPEG thumbnail."""

    index: int
    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    thumbnail: bytes | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Face:
        """Read a face of a session's JSON (a ``data:`` URL thumbnail becomes its JPEG bytes)."""
        thumbnail = data.get("thumbnail")
        jpeg = base64.b64decode(thumbnail.split(",", 1)[1]) if isinstance(thumbnail, str) else None
        x0, y0, x1, y1 = (float(value) for value in data["box"])
        landmarks = tuple((float(x), float(y)) for x, y in data["landmarks"])
        return cls(int(data["index"]), (x0, y0, x1, y1), float(data["score"]), landmarks, jpeg)


@dataclass(frozen=True)
class Progress:
    """A running job's step: ``stage`` (``queued`` while it waits in line, at place ``queued``), step of total."""

    stage: str
    step: int
    total: int
    message: str = ""
    queued: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        """Read a ``progress`` event or a session's ``progress`` field."""
        return cls(str(data["stage"]), int(data["step"]), int(data["total"]), str(data.get("message", "")),
                   int(data.get("queued", 0)))

    @property
    def fraction(self) -> float:
        """How far the stage is, in [0, 1] (1 for a stage without steps)."""
        return min(max(self.step / self.total, 0.0), 1.0) if self.total > 0 else 1.0


@dataclass(frozen=True)
class Direction:
    """A slider: its name (what the websocket takes), label, group, range and the layers it acts on."""

    name: str
    label: str
    group: str
    min: float
    max: float
    layers: tuple[int, int] | None = None
    provenance: str = ""
    unit: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Direction:
        """Read one direction of ``/api/directions``."""
        layers = data.get("layers")
        return cls(str(data["name"]), str(data["label"]), str(data.get("group", "")), float(data["min"]),
                   float(data["max"]), (int(layers[0]), int(layers[1])) if layers else None,
                   str(data.get("provenance", "")), str(data.get("unit", "")))

    @property
    def slider_range(self) -> tuple[float, float]:
        """(min, max) of the slider."""
        return self.min, self.max


@dataclass(frozen=True)
class SessionState:
    """A session as the server describes it (``GET /api/sessions/{id}``, the websocket's ``state``)."""

    session_id: str
    status: str  # uploaded, preparing, ready, failed, cancelled, interrupted
    width: int
    height: int
    faces: tuple[Face, ...]
    face_index: int | None = None
    sliders: dict[str, float] = field(default_factory=dict)
    can_undo: bool = False
    can_redo: bool = False
    result: str | None = None  # the result's path once finalized
    error: str | None = None
    progress: Progress | None = None
    filename: str | None = None
    custom_directions: tuple[Direction, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # every field as sent

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionState:
        """Read a session's JSON; raise :class:`ProtocolError` when a field is missing."""
        try:
            progress = data.get("progress")
            return cls(
                session_id=str(data["session_id"]), status=str(data["status"]), width=int(data["width"]),
                height=int(data["height"]), faces=tuple(Face.from_json(face) for face in data["faces"]),
                face_index=data.get("face_index"), sliders=dict(data.get("sliders") or {}),
                can_undo=bool(data.get("can_undo")), can_redo=bool(data.get("can_redo")), result=data.get("result"),
                error=data.get("error"), progress=Progress.from_json(progress) if progress else None,
                filename=data.get("filename"),
                custom_directions=tuple(Direction.from_json(item) for item in data.get("custom_directions") or ()),
                raw=data,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"the server's session JSON is not as documented: {error!r}") from None

    @property
    def ready(self) -> bool:
        """Whether a face is prepared (sliders preview, finalize works)."""
        return self.status == READY


@dataclass(frozen=True)
class Frame:
    """A binary frame: a slider preview (``kind`` "preview") or a running job's image ("progress").

    ``sent_at`` is when the slider state it shows was sent (``time.perf_counter``, None for a job's image) and
    ``received_at`` when the frame arrived, so ``latency`` is slider → frame.
    """

    kind: str
    image_format: str  # "webp" or "jpeg"
    seq: int
    image: bytes
    received_at: float
    sent_at: float | None = None

    @property
    def latency(self) -> float | None:
        """Seconds from sending the slider state to receiving its frame (None without a send time)."""
        return None if self.sent_at is None else self.received_at - self.sent_at


@dataclass(frozen=True)
class HistoryStep:
    """The answer to undo / redo over the websocket: whether it moved, the slider state now and its frame."""

    changed: bool
    values: dict[str, float]
    can_undo: bool
    can_redo: bool
    frame: Frame | None = None  # None while the face is not ready


@dataclass(frozen=True)
class Event:
    """A JSON event of the websocket other than the ones the client turns into calls' answers (e.g. ``identity``)."""

    type: str
    data: dict[str, Any]
