"""The JSON views of the domain objects: what the REST responses and websocket events say about them."""

from __future__ import annotations

import base64
from typing import Any

from fluidsrv.service import Direction, Face, Session
from fluidsrv.web.paths import hide_paths


def progress_view(stage: str, step: int, total: int, message: str, queued: int = 0) -> dict[str, Any]:
    """The JSON form of a job's progress (``queued``: its place in line while it waits, 1 = next); a server path in
    ``message`` (e.g. the encoder file a plugin names) is shown as its file name."""
    view: dict[str, Any] = {"stage": stage, "step": step, "total": total, "message": hide_paths(message, [])}
    if queued:
        view["queued"] = queued
    return view


def direction_view(direction: Direction) -> dict[str, Any]:
    """The JSON form of a direction, as ``GET /api/directions`` lists it."""
    return direction.describe()


def face_view(index: int, face: Face, thumbnail: bytes | None = None) -> dict[str, Any]:
    """The JSON form of a detected face (with its JPEG thumbnail as a data URL when given)."""
    data: dict[str, Any] = {
        "index": index,
        "box": [round(float(value), 2) for value in face.box],
        "score": float(face.score),
        "landmarks": face.landmarks5.round(2).tolist(),
    }
    if thumbnail is not None:
        data["thumbnail"] = "data:image/jpeg;base64," + base64.b64encode(thumbnail).decode("ascii")
    return data


def session_view(session: Session, thumbnails: list[bytes] | None = None) -> dict[str, Any]:
    """The JSON form of a session (with its faces' thumbnails when given)."""
    width, height = session.upload.size
    base = f"/api/sessions/{session.id}"
    progress = session.progress
    return {
        "session_id": session.id,
        "status": session.status.value,
        "error": hide_paths(session.error, []),  # a failure's message may name a server file
        "progress": progress_view(progress.stage, progress.step, progress.total, progress.message, progress.queued)
        if progress is not None else None,
        "width": width,
        "height": height,
        "filename": session.upload.filename,
        "faces": [face_view(index, face, thumbnails[index] if thumbnails else None)
                  for index, face in enumerate(session.faces)],
        "face_index": session.face_index,
        "sliders": session.edit.sliders,
        "can_undo": bool(session.edit.history.undo_stack),
        "can_redo": bool(session.edit.history.redo_stack),
        "result": f"{base}/result" if session.result is not None else None,
        "websocket": f"{base}/ws",
        "custom_directions": [direction_view(direction) for direction in session.edit.directions.values()],
    }
