"""Compose an edited inner face into the old outer crop: segment, place, inpaint the seam.

Frames: the inner crop (S×S, what the generator sees) sits at ``offset`` pixels inside the outer crop
(So×So, same centre and pixel scale). The new face is shown only where the new head (face + hair) is
inside the inner region; the seam where the old head was but the new one is not is inpainted (see
:mod:`fluidsrv.masks`). The result differs from the old outer crop only inside the returned
``changed`` mask, which the caller uses to paste back into the photo.

Outside the inner crop the new head is predicted (:mod:`fluidsrv.outer_seg`): the baseline knows only the inner
parse, so every old head pixel outside the inner crop is inpainted; a landmark warp moves the old head there with
the edit and shows it with the old crop's pixels moved the same way, cross-faded into the render over the inner
crop's edge.

This is the ``replace`` mode of finalize (``FLUIDSRV_PHOTO_DETAIL=replace``), suited to a generator whose
resolution matches the photo's face; the default ``transfer`` mode lays only the render's change over the photo
(:mod:`fluidsrv.transfer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluidsrv.masks import border_band, dilate, feather, seam_mask
from fluidsrv.outer_seg import InnerOnly, LandmarkMotion, OuterHead, OuterHeadPredictor
from fluidsrv.stages import Inpainter, Segmenter

HEAD_PARTS = ("face", "hair")


@dataclass(frozen=True)
class ComposeConfig:
    """Margins of the composition, as fractions of the inner crop's side."""

    dilation: float = 0.03  # growth of the old/new head masks (a, b) before the seam is cut
    border: float = 0.04  # band along the outer crop's border that is never inpainted (e)
    feather: float = 0.02  # softness of the new face's edge and of the changed region


@dataclass(frozen=True)
class Composition:
    """The composed outer crop and where it differs from the old one."""

    image: np.ndarray  # uint8 [So, So, 3]
    changed: np.ndarray  # bool [So, So]: a margin around every pixel that differs from the old crop
    seam: np.ndarray  # bool [So, So]: the inpainted pixels
    shown: np.ndarray  # float32 [So, So]: the weight of the new head in ``image`` (c ∩ (d ∪ k), feathered)
    predicted: OuterHead | None = None  # the new head over the outer crop (None: an older caller's composition)


def head_mask(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Return the soft face+hair mask (float32 [H, W]) of a segmenter's output."""
    missing = [name for name in HEAD_PARTS if name not in parts]
    if missing:
        raise ValueError(f"the segmenter returned no {', '.join(missing)} mask")
    return np.maximum(parts["face"], parts["hair"]).astype(np.float32)


def parse_head(image: np.ndarray, segmenter: Segmenter) -> np.ndarray:
    """Return the face+hair mask (bool [H, W]) the segmenter finds in ``image``."""
    return head_mask(segmenter.parse(image)) >= 0.5


def place_inner(inner: np.ndarray, outer_size: int, offset: int) -> np.ndarray:
    """Return an [So, So, ...] array of zeros with ``inner`` written at ``offset`` (the inner region)."""
    size = inner.shape[0]
    assert 0 <= offset and offset + size <= outer_size, f"inner {size} at {offset} leaves the outer {outer_size}"
    placed = np.zeros((outer_size, outer_size, *inner.shape[2:]), dtype=inner.dtype)
    placed[offset : offset + size, offset : offset + size] = inner
    return placed


def compose_outer(
    old_outer: np.ndarray,
    new_inner: np.ndarray,
    offset: int,
    segmenter: Segmenter,
    inpainter: Inpainter,
    config: ComposeConfig | None = None,
    old_head: np.ndarray | None = None,
    *,
    predictor: OuterHeadPredictor | None = None,
    motion: LandmarkMotion | None = None,
) -> Composition:
    """Return the old outer crop with ``new_inner`` shown where the new head is and the seam inpainted.

    ``old_head`` is :func:`parse_head` of ``old_outer`` when the caller already has it (it is parsed otherwise).
    ``predictor`` (default: the baseline, the inner parse alone) predicts the new head outside the inner crop
    from ``motion``, the landmarks' motion between the unedited and the edited render in inner-crop pixels.
    """
    config = config or ComposeConfig()
    outer_size, size = old_outer.shape[0], new_inner.shape[0]
    assert old_outer.shape == (outer_size, outer_size, 3) and new_inner.shape == (size, size, 3)
    dilation = max(1, round(config.dilation * size))
    border = max(1, round(config.border * size))
    soft = max(1, round(config.feather * size))

    if old_head is None:
        old_head = parse_head(old_outer, segmenter)  # a before dilation, [So, So]
    inner_head = place_inner(parse_head(new_inner, segmenter), outer_size, offset)  # the inner parse, [So, So]
    inner_region = place_inner(np.ones((size, size), dtype=bool), outer_size, offset)  # d, [So, So]
    predicted = (predictor or InnerOnly()).predict(
        old_head, inner_head, inner_region, motion.in_outer(offset) if motion is not None else None)
    new_head = predicted.head  # c, [So, So]
    seam = seam_mask(old_head, new_head, inner_region, dilation=dilation, border=border, carried=predicted.carried)

    kept = predicted.kept(inner_region)  # the new head outside d, shown with the old crop's moved pixels
    shown = (new_head & inner_region) | kept  # c ∩ (d ∪ k)
    alpha = feather(shown, soft)[..., None]  # [So, So, 1]
    placed_inner = place_inner(new_inner, outer_size, offset).astype(np.float32)
    if kept.any():  # the render fades into the moved old crop over the inner crop's edge
        fade = feather(inner_region, soft)[..., None]
        placed_inner = placed_inner * fade + predicted.moved(old_outer).astype(np.float32) * (1.0 - fade)
    blended = old_outer.astype(np.float32) * (1.0 - alpha) + placed_inner * alpha
    composite = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    composite = inpainter.inpaint(composite, seam)

    # everything that differs lies within the dilated heads; the extra margin lets a soft paste-back
    # weight reach 1 before the first changed pixel
    changed = dilate(old_head | new_head, dilation + 3 * soft) & ~border_band(old_head.shape, border)
    return Composition(image=composite, changed=changed, seam=seam, shown=alpha[..., 0], predicted=predicted)
