"""Compose an edited inner face into the old outer crop: segment, place, inpaint the seam.

Frames: the inner crop (S×S, what the generator sees) sits at ``offset`` pixels inside the outer crop
(So×So, same centre and pixel scale). The new face is shown only where the new head (face + hair) is
inside the inner region; the seam where the old head was but the new one is not is inpainted (see
:mod:`fluidsrv.masks`). The result differs from the old outer crop only inside the returned
``changed`` mask, which the caller uses to paste back into the photo.

This is the ``replace`` mode of finalize (``FLUIDSRV_PHOTO_DETAIL=replace``), suited to a generator whose
resolution matches the photo's face; the default ``transfer`` mode lays only the render's change over the photo
(:mod:`fluidsrv.transfer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluidsrv.masks import border_band, dilate, feather, seam_mask
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
    shown: np.ndarray  # float32 [So, So]: the weight of the new face in ``image`` (c ∩ d, feathered)


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
) -> Composition:
    """Return the old outer crop with ``new_inner`` shown where the new head is and the seam inpainted.

    ``old_head`` is :func:`parse_head` of ``old_outer`` when the caller already has it (it is parsed otherwise).
    """
    config = config or ComposeConfig()
    outer_size, size = old_outer.shape[0], new_inner.shape[0]
    assert old_outer.shape == (outer_size, outer_size, 3) and new_inner.shape == (size, size, 3)
    dilation = max(1, round(config.dilation * size))
    border = max(1, round(config.border * size))
    soft = max(1, round(config.feather * size))

    if old_head is None:
        old_head = parse_head(old_outer, segmenter)  # a before dilation, [So, So]
    new_head = place_inner(parse_head(new_inner, segmenter), outer_size, offset)  # c, [So, So]
    inner_region = place_inner(np.ones((size, size), dtype=bool), outer_size, offset)  # d, [So, So]
    seam = seam_mask(old_head, new_head, inner_region, dilation=dilation, border=border)

    shown = new_head & inner_region  # c ∩ d
    alpha = feather(shown, soft)[..., None]  # [So, So, 1]
    placed_inner = place_inner(new_inner, outer_size, offset).astype(np.float32)
    blended = old_outer.astype(np.float32) * (1.0 - alpha) + placed_inner * alpha
    composite = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    composite = inpainter.inpaint(composite, seam)

    # everything that differs lies within the dilated heads; the extra margin lets a soft paste-back
    # weight reach 1 before the first changed pixel
    changed = dilate(old_head | new_head, dilation + 3 * soft) & ~border_band(old_head.shape, border)
    return Composition(image=composite, changed=changed, seam=seam, shown=alpha[..., 0])
