"""The versioned on-disk codec of a session: byte strings, no pickle anywhere.

A spilled session is ``(meta, arrays, tensors)``: JSON facts, a safetensors file of numpy arrays and a
safetensors file of torch tensors; its edit state (sliders, undo history, added directions) is also written
alone as a small *edit record* (:func:`encode_edit`) on every committed change. Restoring runs no code.
:data:`SPILL_FORMAT` is written; every format in :data:`READABLE_FORMATS` is read, so sessions spilled by the
previous release (format 1, whose facts lived in free-form ``meta`` / ``extra_*`` bags) still restore after an
upgrade.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from fluidsrv.geometry import Alignment
from fluidsrv.image_io import ImageMetadata, decode_image
from fluidsrv.session.model import EditState, JobProgress, Prepared, Session, SliderHistory, Status, Upload
from fluidsrv.stages import Direction, Face

SPILL_FORMAT = 2
"""The format this release writes."""
READABLE_FORMATS = (1, 2)
"""The formats this release reads."""
EDIT_FORMAT = 1
"""The format of the small edit record written through on every committed edit."""

_METADATA_BYTES = ("icc_profile", "exif", "xmp", "comment")


class SpillError(ValueError):
    """Bytes that are not a readable spilled session."""


def header(meta_bytes: bytes) -> dict[str, Any]:
    """The facts the store indexes without decoding the rest: id, token digest, created / last used, format."""
    meta = json.loads(meta_bytes)
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise SpillError(f"unknown session format {meta.get('format') if isinstance(meta, dict) else None!r}")
    return {key: meta[key] for key in ("format", "id", "token_digest", "created_at", "last_used")}


def encode(session: Session) -> tuple[bytes, bytes, bytes]:
    """Serialize a session into (meta JSON, numpy safetensors, torch safetensors) bytes (format 2)."""
    edit = session.edit.snapshot()  # one view of the edit state for the facts and the direction tensors
    upload = session.upload
    arrays: dict[str, np.ndarray] = {"upload": np.frombuffer(upload.data, dtype=np.uint8), "pixels": upload.pixels}
    for name in _METADATA_BYTES:
        value = getattr(upload.metadata, name)
        if value is not None:
            arrays[f"metadata/{name}"] = np.frombuffer(value, dtype=np.uint8)
    for index, face in enumerate(upload.faces):
        arrays[f"faces/{index}/landmarks5"] = face.landmarks5
        if face.landmarks68 is not None:
            arrays[f"faces/{index}/landmarks68"] = face.landmarks68
    if session.result is not None:
        arrays["result"] = np.frombuffer(session.result, dtype=np.uint8)
    prepared_json: dict[str, Any] | None = None
    if session.prepared is not None:
        prepared = session.prepared
        alignment_json = {}
        for key, value in prepared.alignment.to_dict().items():
            if isinstance(value, np.ndarray):
                arrays[f"alignment/{key}"] = value
            else:
                alignment_json[key] = value.item() if isinstance(value, np.generic) else value
        arrays.update(reconstruction=prepared.reconstruction, head_mask=prepared.head_mask,
                      preview_crop=prepared.preview_crop)
        prepared_json = {"face_index": prepared.face_index, "version": prepared.version, "alignment": alignment_json}
    meta = {
        "format": SPILL_FORMAT,
        "id": session.id,
        "token_digest": session.token_digest,
        "created_at": session.created_at,
        "last_used": session.last_used,
        "status": session.status.value,
        "error": session.error,
        "progress": vars(session.progress) if session.progress is not None else None,
        "upload": {
            "filename": upload.filename,
            "format": upload.metadata.format,
            "dpi": list(upload.metadata.dpi) if upload.metadata.dpi is not None else None,
            "orientation": upload.metadata.orientation,
            "faces": [{"box": list(face.box), "score": face.score} for face in upload.faces],
        },
        "prepared": prepared_json,
        "edit": _edit_facts(edit),
    }
    named = session.prepared.tensors() if session.prepared is not None else {}
    named.update(_direction_tensors(edit))
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in named.items()}
    meta_bytes = json.dumps(meta, allow_nan=False).encode("utf-8")
    array_bytes = safetensors.numpy.save({key: np.ascontiguousarray(value) for key, value in arrays.items()})
    return meta_bytes, array_bytes, safetensors.torch.save(tensors)


def decode(meta_bytes: bytes, array_bytes: bytes, tensor_bytes: bytes, *, device: torch.device,
           history_limit: int) -> Session:
    """Rebuild a session of any readable format from its three spilled parts, tensors on ``device``."""
    meta = json.loads(meta_bytes)
    if not isinstance(meta, dict):
        raise SpillError("a spilled session's meta part must be a JSON object")
    arrays = safetensors.numpy.load(array_bytes)
    tensors = {name: tensor.to(device) for name, tensor in safetensors.torch.load(tensor_bytes).items()}
    if meta.get("format") == 1:
        return _decode_v1(meta, arrays, tensors, history_limit)
    if meta.get("format") != SPILL_FORMAT:
        raise SpillError(f"unknown session format {meta.get('format')!r}")
    facts = meta["upload"]
    metadata = ImageMetadata(
        format=str(facts["format"]),
        dpi=(float(facts["dpi"][0]), float(facts["dpi"][1])) if facts["dpi"] else None,
        orientation=int(facts["orientation"]),
        **{name: arrays[f"metadata/{name}"].tobytes() for name in _METADATA_BYTES if f"metadata/{name}" in arrays},
    )
    upload = Upload(data=arrays["upload"].tobytes(), pixels=arrays["pixels"], metadata=metadata,
                    filename=facts["filename"], faces=_faces(facts["faces"], arrays))
    prepared = None
    if meta["prepared"] is not None:
        alignment = Alignment.from_dict({**meta["prepared"]["alignment"], **_group(arrays, "alignment/")})
        prepared = Prepared(
            face_index=int(meta["prepared"]["face_index"]), alignment=alignment, w=tensors["w"], ws=tensors["ws"],
            generator_delta=_group(tensors, "generator_delta/"), student_state=_group(tensors, "student_state/"),
            reconstruction=arrays["reconstruction"], head_mask=arrays["head_mask"],
            preview_crop=arrays["preview_crop"], version=int(meta["prepared"]["version"]))
    edit = _edit_from(meta["edit"], tensors, history_limit)
    progress = JobProgress(**meta["progress"]) if meta["progress"] else None
    result = arrays["result"].tobytes() if "result" in arrays else None
    return Session(id=meta["id"], token_digest=meta["token_digest"], created_at=meta["created_at"],
                   last_used=meta["last_used"], upload=upload, status=Status(meta["status"]), error=meta["error"],
                   progress=progress, prepared=prepared, edit=edit, result=result)


def encode_edit(edit: EditState) -> bytes:
    """Serialize the edit state alone (sliders, undo history, added directions): the small write-through record.

    Give it a :meth:`EditState.snapshot` taken where the state changes, so a concurrent change cannot tear it.
    """
    tensors = {name: vector.detach().to("cpu", copy=True).contiguous()
               for name, vector in _direction_tensors(edit).items()}
    facts = json.dumps(_edit_facts(edit), allow_nan=False)
    return safetensors.torch.save(tensors, metadata={"format": str(EDIT_FORMAT), "edit": facts})


def decode_edit(record: bytes, *, device: torch.device, history_limit: int) -> EditState:
    """Rebuild the edit state from a record written by :func:`encode_edit`."""
    metadata = _record_metadata(record)
    tensors = {name: tensor.to(device) for name, tensor in safetensors.torch.load(record).items()}
    return _edit_from(json.loads(metadata["edit"]), tensors, history_limit)


def edit_revision(record: bytes) -> int:
    """The revision an edit record was written at (cheap: reads only its header)."""
    return int(json.loads(_record_metadata(record)["edit"]).get("revision", 0))


def _record_metadata(record: bytes) -> dict[str, str]:
    """The string metadata of an edit record's safetensors header, checked to be an edit record."""
    try:
        length = int.from_bytes(record[:8], "little")
        metadata = json.loads(record[8:8 + length]).get("__metadata__") or {}
    except (ValueError, AttributeError) as error:
        raise SpillError("not an edit record") from error
    if metadata.get("format") != str(EDIT_FORMAT) or "edit" not in metadata:
        raise SpillError("not an edit record")
    return dict(metadata)


def _direction_tensors(edit: EditState) -> dict[str, torch.Tensor]:
    return {f"direction/{index}": direction.vector for index, direction in enumerate(edit.directions.values())}


def _edit_facts(edit: EditState) -> dict[str, Any]:
    return {
        "sliders": edit.sliders,
        "undo": edit.history.undo_stack,
        "redo": edit.history.redo_stack,
        "committed": edit.history.committed,
        "directions": [direction.describe() for direction in edit.directions.values()],
        "version": edit.version,
        "revision": edit.revision,
    }


def _edit_from(facts: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], history_limit: int) -> EditState:
    directions = {
        str(described["name"]): Direction.from_description(described, tensors[f"direction/{index}"])
        for index, described in enumerate(facts["directions"])
    }
    return EditState(
        sliders={str(name): float(value) for name, value in facts["sliders"].items()},
        history=SliderHistory(limit=history_limit, undo_stack=facts["undo"], redo_stack=facts["redo"],
                              committed=facts["committed"]),
        directions=directions, version=int(facts["version"]), revision=int(facts.get("revision", 0)))


def _decode_v1(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], tensors: Mapping[str, torch.Tensor],
               history_limit: int) -> Session:
    """Rebuild a session spilled by release 0.1.0 (format 1: facts in ``meta``, ``extra/`` arrays and tensors)."""
    facts: dict[str, Any] = meta["meta"]
    data = arrays["upload"].tobytes()
    metadata = decode_image(data, max_pixels=2**40, max_bytes=None).metadata  # format 1 kept only the bytes
    upload = Upload(data=data, pixels=arrays["image"], metadata=metadata, filename=facts.get("filename"),
                    faces=_faces(meta["faces"], arrays))
    extra_arrays, extra_tensors = _group(arrays, "extra/"), _group(tensors, "extra/")
    status = Status(facts.get("status", "uploaded"))
    error = facts.get("error")
    prepared = None
    parts = ("reconstruction", "head_mask", "preview_crop")
    if meta["alignment"] is not None and "ws" in tensors:
        if all(part in extra_arrays for part in parts):
            alignment = Alignment.from_dict({**meta["alignment"], **_group(arrays, "alignment/")})
            prepared = Prepared(
                face_index=int(meta["face_index"]), alignment=alignment, w=tensors["w"], ws=tensors["ws"],
                generator_delta=_group(tensors, "generator_delta/"), student_state=_group(tensors, "student_state/"),
                reconstruction=extra_arrays["reconstruction"], head_mask=extra_arrays["head_mask"],
                preview_crop=extra_arrays["preview_crop"], version=int(facts.get("model_version", 1)))
        elif status == Status.READY:  # prepared by a release older than the head mask: prepare it again
            status, error = Status.INTERRUPTED, "this face was prepared by an older release: pick it again"
    directions = {}
    for name, fact in facts.get("directions", {}).items():
        vector = extra_tensors.get(f"direction:{name}")
        if vector is not None:
            described = {"name": name, "label": fact["label"], "layers": fact.get("layers"),
                         "min": fact["range"][0], "max": fact["range"][1], "group": fact.get("group", ""),
                         "provenance": fact.get("provenance", "")}
            directions[name] = Direction.from_description(described, vector)
    edit = EditState(
        sliders={str(name): float(value) for name, value in meta["sliders"].items()},
        history=SliderHistory(limit=history_limit, undo_stack=meta["undo"], redo_stack=meta["redo"],
                              committed=meta.get("committed", meta["sliders"])),
        directions=directions, version=int(facts.get("directions_version", 0)))
    result = extra_arrays["result"].tobytes() if "result" in extra_arrays else None
    progress = JobProgress(**facts["progress"]) if facts.get("progress") else None
    return Session(id=meta["id"], token_digest=meta["token_digest"], created_at=meta["created_at"],
                   last_used=meta["last_used"], upload=upload, status=status, error=error, progress=progress,
                   prepared=prepared, edit=edit, result=result)


def _group(source: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {name.removeprefix(prefix): value for name, value in source.items() if name.startswith(prefix)}


def _faces(facts: list[Mapping[str, Any]], arrays: Mapping[str, np.ndarray]) -> tuple[Face, ...]:
    """Rebuild the faces from their JSON parts (box, score) and their landmark arrays."""
    faces = []
    for index, face in enumerate(facts):
        x0, y0, x1, y1 = (float(value) for value in face["box"])
        faces.append(Face(box=(x0, y0, x1, y1), score=float(face["score"]),
                          landmarks5=arrays[f"faces/{index}/landmarks5"],
                          landmarks68=arrays.get(f"faces/{index}/landmarks68")))
    return tuple(faces)
