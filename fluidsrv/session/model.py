"""The typed session record: one user's upload, prepared face, edit state and result.

A :class:`Session` has no free-form bags: every fact has a field. Parts that the pipeline produces as a
whole (:class:`Upload`, :class:`Prepared`) are frozen and replaced, never edited in place, so a reader on
another thread sees either the old or the new part. The status is a :class:`Status` with the allowed
transitions in :data:`TRANSITIONS`; only :meth:`Session.move_to` changes it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fluidsrv.errors import UserError
from fluidsrv.geometry import Alignment
from fluidsrv.image_io import ImageMetadata
from fluidsrv.stages import Direction, Face

MAX_SESSION_DIRECTIONS = 64
"""Directions one session may add (SeFa ranges, text prompts); the oldest go first."""


class Status(enum.StrEnum):
    """Where a session is in its life."""

    UPLOADED = "uploaded"  # faces found, none prepared yet
    PREPARING = "preparing"  # align → encode → fine-tune → distil is running
    READY = "ready"  # a face is prepared: sliders preview, finalize works
    FAILED = "failed"  # preparing failed (``Session.error`` says why)
    CANCELLED = "cancelled"  # preparing was cancelled (the client left)
    INTERRUPTED = "interrupted"  # the server stopped while preparing: pick the face again


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.UPLOADED: frozenset({Status.PREPARING}),
    Status.PREPARING: frozenset({Status.READY, Status.FAILED, Status.CANCELLED, Status.INTERRUPTED}),
    Status.READY: frozenset({Status.PREPARING}),
    Status.FAILED: frozenset({Status.PREPARING}),
    Status.CANCELLED: frozenset({Status.PREPARING}),
    Status.INTERRUPTED: frozenset({Status.PREPARING}),
}
"""Status -> the statuses it may move to."""


class StatusError(UserError):
    """A request that the session's status does not allow (e.g. finalize before a face is ready)."""

    status = 409
    code = "not_ready"


@dataclass(frozen=True)
class JobProgress:
    """Where the session's running job is: stage, step of total, and a message."""

    stage: str
    step: int
    total: int
    message: str = ""
    queued: int = 0  # > 0 while the job waits in line: its place in line (1 = next)


@dataclass(frozen=True, eq=False)
class Upload:
    """The uploaded photo: its bytes, decoded pixels and metadata, file name and the faces found in it."""

    data: bytes  # the file, byte for byte
    pixels: np.ndarray  # uint8 [H, W, 3] RGB, upright
    metadata: ImageMetadata  # what the file carried besides pixels (written back on finalize)
    filename: str | None = None
    faces: tuple[Face, ...] = ()  # numbered left to right in the photo

    def __post_init__(self) -> None:
        assert self.pixels.dtype == np.uint8 and self.pixels.ndim == 3 and self.pixels.shape[2] == 3, "uint8 [H, W, 3]"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the photo in pixels."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


@dataclass(frozen=True, eq=False)
class Prepared:
    """A prepared face: its alignment, inversion, fine-tuning delta, preview student and preview references."""

    face_index: int
    alignment: Alignment
    w: torch.Tensor  # [1, w_dim]
    ws: torch.Tensor  # [1, num_ws, w_dim]
    generator_delta: Mapping[str, torch.Tensor]  # fine-tuned minus base weights (or low-rank factors); {} = none
    student_state: Mapping[str, torch.Tensor]  # the tuned previewer's state dict
    reconstruction: np.ndarray  # uint8 [P, P, 3] the unedited preview render
    head_mask: np.ndarray  # float32 [P, P] parsed face + hair of the photo's inner crop
    preview_crop: np.ndarray  # uint8 [P, P, 3] the photo's inner crop that previews are laid over
    version: int = 1  # bumped by every prepare: the key of the tuned-model cache

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, by its spill name."""
        named = {"w": self.w, "ws": self.ws}
        named.update({f"generator_delta/{key}": value for key, value in self.generator_delta.items()})
        named.update({f"student_state/{key}": value for key, value in self.student_state.items()})
        return named

    def on(self, device: torch.device | str) -> Prepared:
        """This prepared face with its tensors on ``device`` (e.g. "cpu" before it crosses processes)."""
        return dataclasses.replace(
            self, w=self.w.to(device), ws=self.ws.to(device),
            generator_delta={key: value.to(device) for key, value in self.generator_delta.items()},
            student_state={key: value.to(device) for key, value in self.student_state.items()})

    def arrays(self) -> list[np.ndarray]:
        """Every host array (for the store's host-memory budget)."""
        return [self.reconstruction, self.head_mask, self.preview_crop, self.alignment.inner_image,
                self.alignment.outer_image]


@dataclass
class SliderHistory:
    """Bounded undo/redo stacks of committed slider states (oldest dropped first).

    ``committed`` is the newest committed state: live states sent while a slider is dragged are not
    history, only the state at release (a commit) is.
    """

    limit: int = 100
    undo_stack: list[dict[str, float]] = field(default_factory=list)
    redo_stack: list[dict[str, float]] = field(default_factory=list)
    committed: dict[str, float] = field(default_factory=dict)

    def commit(self, state: Mapping[str, float]) -> None:
        """Make ``state`` the newest committed state; the previous one becomes undoable, redo is cleared."""
        new = dict(state)
        if new == self.committed:
            return
        self.undo_stack.append(self.committed)
        del self.undo_stack[: max(0, len(self.undo_stack) - self.limit)]
        self.redo_stack.clear()
        self.committed = new

    def undo(self) -> dict[str, float] | None:
        """Step back to the previous committed state and return it, or None when there is none."""
        if not self.undo_stack:
            return None
        self.redo_stack.append(self.committed)
        self.committed = self.undo_stack.pop()
        return dict(self.committed)

    def redo(self) -> dict[str, float] | None:
        """Step forward to the state undone last and return it, or None."""
        if not self.redo_stack:
            return None
        self.undo_stack.append(self.committed)
        self.committed = self.redo_stack.pop()
        return dict(self.committed)


@dataclass
class EditState:
    """The sliders of a prepared face: their values, the undo history and the directions this session added."""

    sliders: dict[str, float] = field(default_factory=dict)  # direction name -> slider value
    history: SliderHistory = field(default_factory=SliderHistory)
    directions: dict[str, Direction] = field(default_factory=dict)  # added by this session, oldest first
    version: int = 0  # bumped whenever ``directions`` changes
    revision: int = 0  # bumped by every change: the newest write of the edit record wins

    def set_sliders(self, values: Mapping[str, float], *, record: bool = True) -> None:
        """Make ``values`` the slider state; with ``record`` it is committed (the previous commit is undoable)."""
        new = {str(name): float(value) for name, value in values.items()}
        if not all(math.isfinite(value) for value in new.values()):
            raise ValueError("slider values must be finite numbers")
        if record:
            self.history.commit(new)
        self.sliders = new
        self.revision += 1

    def undo(self) -> bool:
        """Go back one step: first to the last commit if uncommitted changes are shown; return whether it moved."""
        if self.sliders != self.history.committed:
            self.sliders = dict(self.history.committed)
            self.revision += 1
            return True
        previous = self.history.undo()
        if previous is None:
            return False
        self.sliders = previous
        self.revision += 1
        return True

    def redo(self) -> bool:
        """Re-apply the slider state undone last; return whether there was one."""
        following = self.history.redo()
        if following is None:
            return False
        self.sliders = following
        self.revision += 1
        return True

    def add_directions(self, added: list[Direction]) -> None:
        """Add ``added`` (replacing same names, which move to the end); keep the newest MAX_SESSION_DIRECTIONS."""
        directions = dict(self.directions)
        for direction in added:
            directions.pop(direction.name, None)
            directions[direction.name] = Direction.from_description(
                direction.describe(), direction.vector.detach().float().cpu().contiguous())
        for name in list(directions)[: max(0, len(directions) - MAX_SESSION_DIRECTIONS)]:
            del directions[name]
        self.directions = directions
        self.version += 1
        self.revision += 1

    def snapshot(self) -> EditState:
        """A copy that later changes do not reach (take it on the thread that changes the state, then encode it)."""
        history = self.history
        return EditState(
            sliders=dict(self.sliders),
            history=SliderHistory(limit=history.limit, undo_stack=list(history.undo_stack),
                                  redo_stack=list(history.redo_stack), committed=dict(history.committed)),
            directions=dict(self.directions), version=self.version, revision=self.revision)

    def reset(self) -> None:
        """Forget the slider values and history (a new face was prepared); added directions stay."""
        self.sliders = {}
        self.history = SliderHistory(limit=self.history.limit)
        self.revision += 1


@dataclass(eq=False)
class Session:
    """One user's editing state; see the module docstring."""

    id: str
    token_digest: str  # SHA-256 hex of the token; the token itself is only returned by the store's create()
    created_at: float  # wall-clock seconds (time.time()), survive a restart
    last_used: float
    upload: Upload
    status: Status = Status.UPLOADED
    error: str | None = None  # why preparing failed
    progress: JobProgress | None = None  # of the running job
    prepared: Prepared | None = None
    edit: EditState = field(default_factory=EditState)
    result: bytes | None = None  # the finalized JPEG

    @property
    def faces(self) -> tuple[Face, ...]:
        """The faces found in the upload."""
        return self.upload.faces

    @property
    def face_index(self) -> int | None:
        """The prepared face's index, or None."""
        return self.prepared.face_index if self.prepared is not None else None

    def move_to(self, status: Status, *, error: str | None = None) -> None:
        """Change the status along an allowed transition (see TRANSITIONS); the last job's progress is cleared."""
        if status != self.status and status not in TRANSITIONS[self.status]:
            raise StatusError(f"a session that is {self.status} cannot become {status}")
        self.status, self.error, self.progress = status, error, None

    def require_ready(self) -> Prepared:
        """Return the prepared face, or raise StatusError unless the session is ready."""
        if self.status != Status.READY or self.prepared is None:
            raise StatusError("pick a face and wait until it is ready")
        return self.prepared

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the session holds, by its spill name (``w``, ``generator_delta/<key>``, ...)."""
        named = self.prepared.tensors() if self.prepared is not None else {}
        for index, direction in enumerate(self.edit.directions.values()):
            named[f"direction/{index}"] = direction.vector
        return named

    def tensor_bytes(self) -> int:
        """Bytes of tensor data the session holds (what the store's device-memory budget counts)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors().values())

    def host_bytes(self) -> int:
        """Bytes the session holds in host memory: the upload, its pixels, crops, masks and the result."""
        arrays = [self.upload.pixels, *(self.prepared.arrays() if self.prepared is not None else [])]
        return len(self.upload.data) + len(self.result or b"") + sum(array.nbytes for array in arrays)
