"""The stage orchestration: detect, prepare (align → encode → fine-tune → distill), preview, finalize.

Functions here run on the executor's worker thread (detection may also run in a plain thread: it does
not touch the generator). Long stages are step jobs (see :mod:`fluidsrv.stages`) so previews of other
sessions interleave between their steps and a closed client's job stops at the next step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import numpy as np
import torch

from fluidsrv import latents
from fluidsrv.compose import add_photo_detail, compose_outer, detail_reference, parse_head
from fluidsrv.convert import image_to_tensor, tensor_to_image
from fluidsrv.geometry import Alignment, align_face, face_landmarks
from fluidsrv.image_io import decode_image, encode_image
from fluidsrv.runtime import Runtime
from fluidsrv.sessions import Session, SliderHistory
from fluidsrv.stages import Face, Progress, StepJob

PASTE_FEATHER = 0.02
"""Softness of the paste-back weight, as a fraction of the outer crop's side."""


RECONSTRUCTION = "reconstruction"
"""Key of ``Session.extra_arrays``: the unedited preview render (uint8 [R, R, 3]) of the prepared face."""


class PipelineError(RuntimeError):
    """A stage cannot run on this session's state (e.g. previews before a face was prepared)."""


def detect_faces(runtime: Runtime, image: np.ndarray) -> list[Face]:
    """Return the faces of ``image`` (uint8 RGB [H, W, 3]) found by the active detector, largest first."""
    faces = runtime.stage("detector").detect(image)
    return sorted(faces, key=lambda face: face.area, reverse=True)


def prepare(runtime: Runtime, session: Session, face_index: int) -> StepJob[None]:
    """Align the chosen face, encode it, fine-tune the generator on it and build the preview renderer."""
    if session.image is None or not 0 <= face_index < len(session.faces):
        raise PipelineError(f"face {face_index} does not exist in this session")
    generator = runtime.generator
    alignment = align_face(session.image, face_landmarks(session.faces[face_index]), size=generator.resolution)
    yield Progress("align", 1, 1, "face aligned", frame=alignment.inner_image)

    target = image_to_tensor(alignment.inner_image, runtime.device)  # [1, 3, R, R]
    inverted = yield from runtime.stage("encoder").encode(target, generator)
    ws = inverted.ws.detach().to(runtime.device)  # [1, num_ws, w_dim]

    delta: dict[str, torch.Tensor] = {}
    tuned = generator
    if runtime.settings.finetune != "none":
        from fluidsrv.pti import DeltaMode, PTIConfig, apply_delta, finetune

        mode = cast(DeltaMode, runtime.settings.finetune)  # "full" or "lowrank" (checked by Settings)
        config = PTIConfig(mode=mode, steps=runtime.settings.finetune_steps)
        delta = yield from finetune(generator, target, ws, config)
        tuned = apply_delta(generator, delta)
    renderer = yield from runtime.stage("previewer").fit(tuned, ws)
    with torch.inference_mode():
        reconstruction = tensor_to_image(renderer.render(ws))  # the unedited preview, for detail transfer

    # publish the new state: whole objects are replaced, never edited in place, so readers on other
    # threads see either the old or the new state
    session.face_index = face_index
    session.alignment = alignment.to_dict()
    session.w, session.ws = inverted.w.detach().to(runtime.device), ws
    session.generator_delta = delta
    session.student_state = renderer.state_dict()
    session.sliders = {}
    session.history = SliderHistory(limit=session.history.limit)
    kept = {key: value for key, value in session.extra_arrays.items() if key not in ("result", RECONSTRUCTION)}
    session.extra_arrays = {**kept, RECONSTRUCTION: reconstruction}
    runtime.remember_models(session, tuned, renderer)


def edited_ws(runtime: Runtime, session: Session, values: Mapping[str, float]) -> torch.Tensor:
    """Return the session's ws moved by the slider ``values`` (model F).

    Sliders whose direction no longer exists (e.g. after the direction source was switched) are left out;
    the websocket refuses unknown names in new messages, so this only affects older states.
    """
    if session.ws is None:
        raise PipelineError("no face has been prepared in this session yet")
    directions = runtime.directions_for(session)
    active = {name: value for name, value in values.items() if value != 0.0 and name in directions}
    if not active:
        return session.ws
    return latents.apply_sliders(session.ws, directions, active, spread=runtime.spread)


@torch.inference_mode()
def render_preview(runtime: Runtime, session: Session, values: Mapping[str, float]) -> np.ndarray:
    """Render the preview of slider ``values`` with the session's fast renderer: uint8 RGB [R, R, 3].

    With detail transfer (the default) the frame is the aligned photo moved by the render's change, so that
    the preview at zero shows the photo itself, as finalize will.
    """
    _, renderer = runtime.session_models(session)
    frame = tensor_to_image(renderer.render(edited_ws(runtime, session, values)))
    reconstruction = session.extra_arrays.get(RECONSTRUCTION)
    if runtime.settings.photo_detail == "transfer" and reconstruction is not None and session.alignment is not None:
        frame = add_photo_detail(np.asarray(session.alignment["inner_image"]), frame, reconstruction)
    return frame


def finalize(runtime: Runtime, session: Session) -> StepJob[bytes]:
    """Render the edit with the tuned generator, compose it into the photo and return the JPEG bytes."""
    if session.alignment is None or session.image is None or session.ws is None:
        raise PipelineError("no face has been prepared in this session yet")
    detail = runtime.settings.photo_detail  # "transfer" or "replace" (checked by Settings)
    generator, _ = runtime.session_models(session)
    with torch.inference_mode():
        new_inner = tensor_to_image(generator.synthesis(edited_ws(runtime, session, session.sliders)))
        reconstructed_inner = tensor_to_image(generator.synthesis(session.ws)) if detail == "transfer" else None
    yield Progress("finalize", 1, 4, "edited face rendered", frame=new_inner)

    alignment = Alignment.from_dict(session.alignment)
    segmenter, inpainter = runtime.stage("segmenter"), runtime.stage("inpainter")
    old_head = parse_head(alignment.outer_image, segmenter)  # parsed once for both compositions
    edited = compose_outer(
        alignment.outer_image, new_inner, alignment.inner_offset, segmenter, inpainter, old_head=old_head
    )
    yield Progress("finalize", 2, 4, "face composed and seam inpainted", frame=edited.image)

    if reconstructed_inner is None:
        photo = alignment.paste_back(session.image, edited.image, "outer", mask=edited.changed, feather=PASTE_FEATHER)
    else:
        unedited = compose_outer(
            alignment.outer_image, reconstructed_inner, alignment.inner_offset, segmenter, inpainter, old_head=old_head
        )
        changed = edited.changed | unedited.changed
        reference = detail_reference(edited, unedited, alignment.outer_image)
        photo = add_photo_detail(
            session.image,
            alignment.paste_back(session.image, edited.image, "outer", mask=changed, feather=PASTE_FEATHER),
            alignment.paste_back(session.image, reference, "outer", mask=changed, feather=PASTE_FEATHER),
        )
    yield Progress("finalize", 3, 4, "pasted into the photo")

    metadata = decode_image(session.upload, max_pixels=photo.shape[0] * photo.shape[1], max_bytes=None).metadata
    result = encode_image(photo, "jpeg", metadata=metadata, quality=95)
    yield Progress("finalize", 4, 4, "encoded")
    return result
