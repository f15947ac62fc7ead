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
from fluidsrv.compose import compose_outer, head_mask
from fluidsrv.convert import image_to_tensor, tensor_to_image
from fluidsrv.geometry import Alignment, align_face, face_landmarks, warp_crop
from fluidsrv.image_io import decode_image, encode_image
from fluidsrv.runtime import Runtime
from fluidsrv.sessions import Session, SliderHistory
from fluidsrv.stages import Face, Progress, StepJob
from fluidsrv.transfer import EditLayer, apply_to_crop, apply_to_photo, edit_layer, head_region

PASTE_FEATHER = 0.02
"""Softness of the paste-back weight, as a fraction of the outer crop's side."""


RECONSTRUCTION = "reconstruction"
"""Key of ``Session.extra_arrays``: the unedited preview render (uint8 [R, R, 3]) of the prepared face."""
HEAD_MASK = "head_mask"
"""Key of ``Session.extra_arrays``: the parsed face + hair (float32 [P, P]) of the photo's inner crop."""
PREVIEW_CROP = "preview_crop"
"""Key of ``Session.extra_arrays``: the photo's inner crop (uint8 [P, P, 3]) that previews are laid over."""
PREVIEW_MIN_SIDE, PREVIEW_MAX_SIDE = 256, 512


def preview_side(resolution: int) -> int:
    """The side P of preview frames (and of the head mask) for a generator of ``resolution``."""
    return min(PREVIEW_MAX_SIDE, max(PREVIEW_MIN_SIDE, resolution))


def parse_photo_head(runtime: Runtime, photo: np.ndarray, alignment: Alignment) -> tuple[np.ndarray, np.ndarray]:
    """The photo's inner crop at the preview side and its parsed face + hair (float32 [P, P])."""
    inner = alignment.inner.resized(preview_side(alignment.inner.size))
    crop = warp_crop(photo, inner, qsize=alignment.inner.side)  # [P, P, 3]
    return crop, head_mask(runtime.stage("segmenter").parse(crop))


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
    preview_crop, head = parse_photo_head(runtime, session.image, alignment)

    # publish the new state: whole objects are replaced, never edited in place, so readers on other
    # threads see either the old or the new state
    session.face_index = face_index
    session.alignment = alignment.to_dict()
    session.w, session.ws = inverted.w.detach().to(runtime.device), ws
    session.generator_delta = delta
    session.student_state = renderer.state_dict()
    session.sliders = {}
    session.history = SliderHistory(limit=session.history.limit)
    replaced = ("result", RECONSTRUCTION, HEAD_MASK, PREVIEW_CROP)
    kept = {key: value for key, value in session.extra_arrays.items() if key not in replaced}
    session.extra_arrays = {**kept, RECONSTRUCTION: reconstruction, HEAD_MASK: head, PREVIEW_CROP: preview_crop}
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


def session_layer(session: Session, edited: np.ndarray, reconstructed: np.ndarray) -> EditLayer:
    """The edit of two renders of the session's face, kept on the photo's parsed head (see fluidsrv.transfer)."""
    head = session.extra_arrays.get(HEAD_MASK)
    if head is None:
        raise PipelineError("this face was prepared by an older release: prepare it again")
    return edit_layer(edited, reconstructed, head_region(head, edited.shape[0]))


@torch.inference_mode()
def render_preview(runtime: Runtime, session: Session, values: Mapping[str, float]) -> np.ndarray:
    """Render the preview of slider ``values``: uint8 RGB [P, P, 3] (the aligned crop, as finalize will show it).

    With detail transfer (the default) the frame is the photo's aligned crop with the render's change laid over
    the head exactly as finalize lays it over the photo; with ``replace`` it is the render itself.
    """
    _, renderer = runtime.session_models(session)
    frame = tensor_to_image(renderer.render(edited_ws(runtime, session, values)))
    reconstruction = session.extra_arrays.get(RECONSTRUCTION)
    crop = session.extra_arrays.get(PREVIEW_CROP)
    if runtime.settings.photo_detail == "transfer" and reconstruction is not None and crop is not None:
        return apply_to_crop(crop, session_layer(session, frame, reconstruction))
    return frame


def finalize(runtime: Runtime, session: Session) -> StepJob[bytes]:
    """Render the edit with the tuned generator, lay it into the photo and return the JPEG bytes."""
    if session.alignment is None or session.image is None or session.ws is None:
        raise PipelineError("no face has been prepared in this session yet")
    generator, _ = runtime.session_models(session)
    with torch.inference_mode():
        new_inner = tensor_to_image(generator.synthesis(edited_ws(runtime, session, session.sliders)))
    yield Progress("finalize", 1, 3, "edited face rendered", frame=new_inner)

    alignment = Alignment.from_dict(session.alignment)
    if runtime.settings.photo_detail == "transfer":
        with torch.inference_mode():
            reconstructed_inner = tensor_to_image(generator.synthesis(session.ws))
        layer = session_layer(session, new_inner, reconstructed_inner)
        photo = apply_to_photo(session.image, layer, alignment.inner)
    else:
        photo = replace_face(runtime, session.image, alignment, new_inner)
    yield Progress("finalize", 2, 3, "laid into the photo")

    metadata = decode_image(session.upload, max_pixels=photo.shape[0] * photo.shape[1], max_bytes=None).metadata
    result = encode_image(photo, "jpeg", metadata=metadata, quality=95)
    yield Progress("finalize", 3, 3, "encoded")
    return result


def replace_face(runtime: Runtime, photo: np.ndarray, alignment: Alignment, new_inner: np.ndarray) -> np.ndarray:
    """The ``replace`` mode: the render shown where the new head is, the seam inpainted, pasted into the photo."""
    segmenter, inpainter = runtime.stage("segmenter"), runtime.stage("inpainter")
    edited = compose_outer(alignment.outer_image, new_inner, alignment.inner_offset, segmenter, inpainter)
    return alignment.paste_back(photo, edited.image, "outer", mask=edited.changed, feather=PASTE_FEATHER)
