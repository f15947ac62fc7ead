"""The stage orchestration as functions over a typed stage bundle: detect, prepare → Prepared, preview → frame,
finalize → JPEG bytes.

Nothing here knows sessions, stores or HTTP: functions take the stages and the data they need and return
values. Which thread runs what is the caller's choice, marked per function: *device* functions touch the
generator or a model stage and run on the executor's worker; *host* functions are numpy / image work that
runs off the worker (so it never delays another session's preview). Long device work is a step job (see
:mod:`fluidsrv.stages`): previews of other sessions interleave between its steps, and a job whose client left
stops at the next step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from fluidsrv import latents
from fluidsrv.compose import Composition, compose_outer, head_mask
from fluidsrv.convert import PREVIEW_FORMAT, encode_preview, image_to_tensor, tensor_to_image
from fluidsrv.geometry import align_face, face_landmarks, warp_crop
from fluidsrv.image_io import ImageMetadata, encode_image
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.outer_seg import DEFAULT_PREDICTOR, landmark_motion, predictor
from fluidsrv.perceptual import ImageDistance
from fluidsrv.precision import inference_autocast, prepare_for_inference
from fluidsrv.session.model import Prepared
from fluidsrv.stages import (
    Detector,
    Direction,
    Encoder,
    Face,
    Inpainter,
    Previewer,
    PreviewRenderer,
    Progress,
    Segmenter,
    StepJob,
)
from fluidsrv.transfer import EditLayer, apply_to_crop, apply_to_photo, edit_layer, head_region

PASTE_FEATHER = 0.02
"""Softness of the paste-back weight in ``replace`` mode, as a fraction of the outer crop's side."""
PREVIEW_MIN_SIDE, PREVIEW_MAX_SIDE = 256, 512
RESULT_QUALITY = 95


class PipelineError(RuntimeError):
    """A stage cannot run on this input (e.g. a face index that does not exist)."""


@dataclass(frozen=True)
class StageBundle:
    """What the pipeline runs on: the base generator, the active stage plugins and the edit settings."""

    generator: Generator  # the shared base generator
    detector: Detector
    encoder: Encoder
    segmenter: Segmenter
    inpainter: Inpainter
    previewer: Previewer
    device: torch.device
    finetune: str = "lowrank"  # "none", "lowrank" or "full" (checked by Settings)
    finetune_steps: int = 0  # 0: the generator resolution's default (fluidsrv.pti.PTI_DEFAULTS)
    photo_detail: str = "transfer"  # "transfer" (lay the render's change over the photo) or "replace"
    slider_edits: torch.Tensor | None = None  # [K, num_ws, w_dim] every slider's Δws at full strength (previewer fit)
    finetune_seconds: float = 0.0  # the fine-tune's own time budget (FLUIDSRV_PREPARE_SECONDS); 0: unbounded
    finetune_distance: Callable[[], ImageDistance] | None = None  # the fine-tune's perceptual distance (built once)
    inference_precision: str = "auto"  # on CUDA: "auto" / "bf16" / "fp16" autocast + channels-last, or "fp32"
    outer_seg: str = DEFAULT_PREDICTOR  # "replace": the new head outside the inner crop (fluidsrv.outer_seg)


@dataclass(frozen=True)
class PreparedFace:
    """What prepare makes: the session's new prepared state and its tuned models (to cache)."""

    prepared: Prepared
    generator: Generator  # fine-tuned (or the base one when fine-tuning is off)
    renderer: PreviewRenderer


@dataclass(frozen=True)
class FinalRenders:
    """Finalize's device work: the edited face, and what the host needs to lay it into the photo."""

    edited: np.ndarray  # uint8 [R, R, 3] the new inner face
    reconstructed: np.ndarray | None  # "transfer": the unedited render of the same generator
    replaced_outer: Composition | None  # "replace": the outer crop with the new head, inpainted


def preview_side(resolution: int) -> int:
    """The side P of preview frames, of the reconstruction, the preview crop and the head mask for a generator of
    ``resolution``: whatever size a previewer renders at, its frames are resized to P×P (:func:`render_preview`)."""
    return min(PREVIEW_MAX_SIDE, max(PREVIEW_MIN_SIDE, resolution))


def to_preview_side(image: torch.Tensor, side: int) -> torch.Tensor:
    """Device: a render [1, 3, H, W] as [1, 3, side, side] (antialiased when shrinking; unchanged at that size)."""
    if tuple(image.shape[-2:]) == (side, side):
        return image
    shrink = image.shape[-1] > side or image.shape[-2] > side
    return F.interpolate(image.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)


def host_square(image: np.ndarray, side: int) -> np.ndarray:
    """Host: a uint8 [S, S, 3] image or float [S, S] map as [side, side] (area when shrinking, else bilinear)."""
    if image.shape[:2] == (side, side):
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] > side else cv2.INTER_LINEAR
    return cv2.resize(image, (side, side), interpolation=interpolation)


def detect_faces(detector: Detector, pixels: np.ndarray) -> tuple[Face, ...]:
    """Detection (on a thread: it never touches the generator): the faces of ``pixels`` (uint8 RGB [H, W, 3]),
    numbered left to right (then top to bottom)."""
    faces = detector.detect(pixels)
    return tuple(sorted(faces, key=lambda face: (face.box[0] + face.box[2], face.box[1] + face.box[3])))


def prepare(stages: StageBundle, pixels: np.ndarray, faces: tuple[Face, ...], face_index: int, *,
            version: int = 1) -> StepJob[PreparedFace]:
    """Device: align the chosen face, encode it, fine-tune the generator on it and build the preview renderer."""
    if not 0 <= face_index < len(faces):
        raise PipelineError(f"face {face_index} does not exist in this photo")
    generator = stages.generator
    alignment = align_face(pixels, face_landmarks(faces[face_index]), size=generator.resolution)
    yield Progress("align", 1, 1, "face aligned", frame=alignment.inner_image)

    target = image_to_tensor(alignment.inner_image, stages.device)  # [1, 3, R, R]
    inverted = yield from stages.encoder.encode(target, generator)
    ws = inverted.ws.detach().to(stages.device)  # [1, num_ws, w_dim]

    delta: dict[str, torch.Tensor] = {}
    tuned = generator
    if stages.finetune != "none":
        from fluidsrv.pti import apply_delta

        delta = yield from finetune_face(stages, target, ws)
        tuned = apply_delta(generator, delta)
    edits = stages.slider_edits if stages.slider_edits is not None else ws.new_zeros(0, *ws.shape[1:])
    renderer = yield from fit_previewer(stages.previewer, tuned, ws, edits.to(ws))
    side = preview_side(generator.resolution)
    reconstruction = render_preview(renderer, ws, side)  # [P, P, 3] the unedited preview
    inner = alignment.inner.resized(side)
    preview_crop = warp_crop(pixels, inner, qsize=alignment.inner.side)  # [P, P, 3]
    head = host_square(head_mask(stages.segmenter.parse(preview_crop)), side)  # [P, P]
    prepared = Prepared(
        face_index=face_index, alignment=alignment, w=inverted.w.detach().to(stages.device), ws=ws,
        generator_delta=delta, student_state=renderer.state_dict(), reconstruction=reconstruction,
        head_mask=head, preview_crop=preview_crop, version=version)
    return PreparedFace(prepared, tuned, renderer)


def fit_previewer(previewer: Previewer, generator: Generator, ws: torch.Tensor,
                  edits: torch.Tensor) -> StepJob[PreviewRenderer]:
    """Device: the previewer's fit; a plugin written for the older two-argument ``fit(generator, ws)`` still works."""
    try:
        names = list(inspect.signature(previewer.fit).parameters)
    except (TypeError, ValueError):  # no signature to read: call it the current way
        names = []
    if len(names) == 2 and "edits" not in names:
        renderer: PreviewRenderer = yield from cast(Any, previewer).fit(generator, ws)
        return renderer
    renderer = yield from previewer.fit(generator, ws, edits)
    return renderer


def finetune_face(stages: StageBundle, target: torch.Tensor, ws: torch.Tensor) -> StepJob[dict[str, torch.Tensor]]:
    """Device: pivotal tuning of the base generator on ``target`` [1, 3, R, R] around ``ws`` with the bundle's
    perceptual distance, step count and time budget; returns the session's generator delta."""
    from fluidsrv.pti import DeltaMode, finetune, pti_config

    distance = stages.finetune_distance() if stages.finetune_distance is not None else None
    config = pti_config(stages.generator.resolution, cast(DeltaMode, stages.finetune), steps=stages.finetune_steps,
                        seconds=stages.finetune_seconds, distance_name=distance.name if distance is not None else None)
    delta: dict[str, torch.Tensor] = yield from finetune(stages.generator, target, ws, config, distance)
    return delta


def edited_ws(ws: torch.Tensor, directions: Mapping[str, Direction], values: Mapping[str, float],
              spread: torch.Tensor) -> torch.Tensor:
    """The ``ws`` [1, num_ws, w_dim] moved by the slider ``values`` (model F).

    Sliders whose direction no longer exists (e.g. after the direction source was switched) are left out.
    """
    active = {name: value for name, value in values.items() if value != 0.0 and name in directions}
    if not active:
        return ws
    return latents.apply_sliders(ws, directions, active, spread=spread)


def frame_side(prepared: Prepared) -> int:
    """The side P of a prepared face's preview frames: its preview crop's (``preview_side`` of the generator)."""
    return int(prepared.preview_crop.shape[0])


@torch.inference_mode()
def render_preview(renderer: PreviewRenderer, ws: torch.Tensor, side: int) -> np.ndarray:
    """Device: the preview renderer's image of ``ws`` as uint8 RGB [side, side, 3], whatever size it renders at.

    This is the one place where preview frames get their size: any previewer plugin may render at its own
    resolution (the generator's, a student's 256²...).
    """
    return tensor_to_image(to_preview_side(renderer.render(ws), side))


def preview_layer(prepared: Prepared, edited: np.ndarray, reconstructed: np.ndarray) -> EditLayer:
    """Host: the edit between two renders of the prepared face, kept on the photo's parsed head."""
    return edit_layer(edited, reconstructed, head_region(prepared.head_mask, edited.shape[0]))


def compose_preview(prepared: Prepared, frame: np.ndarray, photo_detail: str) -> np.ndarray:
    """Host: the preview as finalize will show it: the photo's aligned crop with the render's change laid over
    the head ("transfer"), or the render itself ("replace")."""
    side = frame_side(prepared)
    frame = host_square(frame, side)  # a no-op for frames of render_preview
    if photo_detail != "transfer":
        return frame
    reconstruction = host_square(prepared.reconstruction, side)  # a session spilled before frames were P×P
    return apply_to_crop(prepared.preview_crop, preview_layer(prepared, frame, reconstruction))


def encode_composed_preview(prepared: Prepared, frame: np.ndarray, photo_detail: str) -> bytes:
    """Host: :func:`compose_preview` encoded as PREVIEW_FORMAT, the bytes a preview frame carries."""
    return encode_preview(compose_preview(prepared, frame, photo_detail), PREVIEW_FORMAT)


def render_final(stages: StageBundle, generator: Generator, prepared: Prepared,
                 ws: torch.Tensor) -> StepJob[FinalRenders]:
    """Device: render the edit with the session's tuned generator (and, in "replace" mode, compose the head).

    The result is what a person keeps, so with ``inference_precision`` "auto" it renders in fp32 (bf16 is up to
    9/255 off); an explicit "bf16" / "fp16" applies here too.
    """
    precision = "fp32" if stages.inference_precision == "auto" else stages.inference_precision
    prepare_for_inference(generator, stages.device, precision)
    with torch.inference_mode(), inference_autocast(stages.device, precision):
        edited = tensor_to_image(generator.synthesis(ws).float())  # [R, R, 3]
    yield Progress("finalize", 1, 3, "edited face rendered", frame=edited)
    if stages.photo_detail == "transfer":
        with torch.inference_mode(), inference_autocast(stages.device, precision):
            reconstructed = tensor_to_image(generator.synthesis(prepared.ws).float())
        return FinalRenders(edited, reconstructed, None)
    alignment = prepared.alignment
    outer_head = predictor(stages.outer_seg)
    motion = None
    if outer_head.uses_motion:  # the landmarks' motion between the unedited and the edited render
        with torch.inference_mode(), inference_autocast(stages.device, precision):
            unedited = tensor_to_image(generator.synthesis(prepared.ws).float())
        motion = landmark_motion(unedited, edited)
    composed = compose_outer(alignment.outer_image, edited, alignment.inner_offset, stages.segmenter,
                             stages.inpainter, predictor=outer_head, motion=motion)
    return FinalRenders(edited, None, composed)


def lay_into_photo(photo: np.ndarray, prepared: Prepared, renders: FinalRenders) -> np.ndarray:
    """Host: the photo (uint8 RGB [H, W, 3]) with the final renders laid in, at its own resolution."""
    if renders.replaced_outer is not None:
        outer = renders.replaced_outer
        return prepared.alignment.paste_back(photo, outer.image, "outer", mask=outer.changed, feather=PASTE_FEATHER)
    assert renders.reconstructed is not None
    layer = preview_layer(prepared, renders.edited, renders.reconstructed)
    return apply_to_photo(photo, layer, prepared.alignment.inner)


def encode_result(photo: np.ndarray, metadata: ImageMetadata) -> bytes:
    """Host: the finalized photo as JPEG, carrying the upload's metadata."""
    return encode_image(photo, "jpeg", metadata=metadata, quality=RESULT_QUALITY)
