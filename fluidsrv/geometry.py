"""FFHQ face alignment: the crop quad, the crop transforms and the inner / outer crops of a face.

Coordinates follow OpenCV's pixel-centre convention: the pixel in column ``i``, row ``j`` has its
centre at ``(x, y) = (i, j)``, so an image ``W`` pixels wide spans ``x`` in ``[-0.5, W - 0.5]``.
Landmarks from dlib (integer pixel indices) are already in this convention. A crop ``S`` pixels wide
spans ``[-0.5, S - 0.5]²``, and its quad's corners (top-left, bottom-left, bottom-right, top-right)
are the crop's outer corners: exactly what the NVlabs ffhq-dataset script does when it hands
``quad + 0.5`` to PIL's QUAD transform.

Transforms are 3×3 matrices acting on homogeneous column vectors ``(x, y, 1)``. Every crop is made
by one resampling of the original photo (low-passed first when it shrinks, :mod:`fluidsrv.resample`), and
pasting back (:mod:`fluidsrv.paste`) uses the exact inverse matrix, touching only the pixels inside the
pasted region's bounding box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

from fluidsrv.crops import CropTransform
from fluidsrv.paste import DEFAULT_FEATHER, paste_back
from fluidsrv.resample import MIN_BLUR_SIGMA, check_rgb_image, is_affine, map_points, resample, translation

if TYPE_CHECKING:
    from fluidsrv.stages import Face

CropName = Literal["inner", "outer"]

DEFAULT_OUTER_FACTOR = 1.5  # outer crop side / inner crop side (same centre, same pixel scale)

# Constants of the NVlabs ffhq-dataset recipe (all relative to the inner quad's side, "qsize").
_EYE_TO_EYE_SCALE = 2.0
_EYE_TO_MOUTH_SCALE = 1.8
_CENTRE_TOWARD_MOUTH = 0.1
_BORDER_FRACTION = 0.1
_MIN_PAD_FRACTION = 0.3
_BLUR_FRACTION = 0.02
_PAD_TRIGGER_SLACK = 4  # pixels: FFHQ pads once the quad comes this close to an image edge

_SERIAL_FORMAT = "fluidsrv.alignment/1"


# ---------------------------------------------------------------------------------------------
# The FFHQ quad


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """Return the FFHQ crop quad [4, 2] (top-left, bottom-left, bottom-right, top-right).

    ``landmarks`` is [68, 2] in dlib / iBUG order (eyes are the means of points 36-41 and 42-47,
    mouth corners are points 48 and 54) or [5, 2] in ``Face.landmarks5`` order (left eye, right eye,
    nose, left mouth corner, right mouth corner). This is the NVlabs recipe with ``rotate_level=True``.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape == (68, 2):
        eye_left = points[36:42].mean(axis=0)
        eye_right = points[42:48].mean(axis=0)
        mouth_left, mouth_right = points[48], points[54]
    elif points.shape == (5, 2):
        eye_left, eye_right, mouth_left, mouth_right = points[0], points[1], points[3], points[4]
    else:
        raise ValueError(f"landmarks must be [68, 2] or [5, 2], got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("landmarks contain NaN or infinity")

    eye_centre = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_centre = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_centre - eye_centre

    # Half of the top edge: along the eye line, levelled by the perpendicular of the eye->mouth axis.
    half_x = eye_to_eye - _perpendicular(eye_to_mouth)
    length = np.hypot(half_x[0], half_x[1])
    if not length > 0:
        raise ValueError("degenerate landmarks: eyes and mouth give no orientation")
    half_x = half_x / length
    half_x = half_x * max(
        np.hypot(eye_to_eye[0], eye_to_eye[1]) * _EYE_TO_EYE_SCALE,
        np.hypot(eye_to_mouth[0], eye_to_mouth[1]) * _EYE_TO_MOUTH_SCALE,
    )
    half_y = _perpendicular(half_x)
    centre = eye_centre + eye_to_mouth * _CENTRE_TOWARD_MOUTH
    return np.stack(
        [centre - half_x - half_y, centre - half_x + half_y, centre + half_x + half_y, centre + half_x - half_y]
    )


def face_landmarks(face: Face) -> np.ndarray:
    """Return the landmarks to align ``face`` with: the 68 points when present, else the 5 points."""
    return face.landmarks68 if face.landmarks68 is not None else face.landmarks5


def _perpendicular(vector: np.ndarray) -> np.ndarray:
    """Rotate a 2-vector by +90° in image coordinates: (x, y) -> (-y, x)."""
    return np.array([-vector[1], vector[0]])


# ---------------------------------------------------------------------------------------------
# Transforms


def outer_crop_size(size: int, factor: float = DEFAULT_OUTER_FACTOR) -> int:
    """The outer crop's side for an inner side ``size``: ``size * factor`` rounded to keep grids aligned."""
    if factor < 1.0:
        raise ValueError(f"outer factor must be >= 1, got {factor}")
    return size + 2 * round(size * (factor - 1.0) / 2.0)


@dataclass(frozen=True)
class _Fade:
    """The FFHQ treatment of a crop that leaves the photo: reflect, blur toward the edge, fade to median."""

    pads: tuple[float | None, float | None, float | None, float | None]  # left, top, right, bottom (photo px)
    blur_sigma: float  # photo px


def _ffhq_fade(quad: np.ndarray, photo_shape: tuple[int, int], qsize: float) -> _Fade | None:
    """Return the fade the FFHQ recipe applies for ``quad`` in a photo of ``photo_shape``, or None."""
    height, width = photo_shape
    border = max(int(np.rint(qsize * _BORDER_FRACTION)), 3)
    min_pad = max(int(np.rint(qsize * _MIN_PAD_FRACTION)), 1)
    x_min, y_min = np.floor(quad.min(axis=0))
    x_max, y_max = np.ceil(quad.max(axis=0))
    needed = (border - x_min, border - y_min, x_max - width + border, y_max - height + border)
    if max(needed) <= border - _PAD_TRIGGER_SLACK:
        return None
    left, top, right, bottom = (float(max(need, min_pad)) if need > 0 else None for need in needed)
    return _Fade(pads=(left, top, right, bottom), blur_sigma=qsize * _BLUR_FRACTION)


def _apply_fade(
    image: np.ndarray, grid_to_photo: np.ndarray, photo_shape: tuple[int, int], fade: _Fade, sigma: float
) -> np.ndarray:
    """Blur and fade to the median the pixels of ``image`` whose photo position is beyond a padded edge."""
    height, width = photo_shape
    x, y = _photo_coordinates_of_grid(grid_to_photo, image.shape[0], image.shape[1])  # [rows, cols] each
    left, top, right, bottom = fade.pads
    distance = np.full(x.shape, -np.inf, dtype=np.float32)  # beyond-edge depth / pad width; negative inside
    if left is not None:
        distance = np.maximum(distance, -x / left)
    if top is not None:
        distance = np.maximum(distance, -y / top)
    if right is not None:
        distance = np.maximum(distance, (x - (width - 1)) / right)
    if bottom is not None:
        distance = np.maximum(distance, (y - (height - 1)) / bottom)
    if sigma >= MIN_BLUR_SIGMA:
        blurred = _wide_gaussian_blur(image, sigma)
        blur_weight = np.clip(distance * 3.0 + 1.0, 0.0, 1.0)  # reaches 1/3 of a pad into the photo
        image = cv2.blendLinear(image, blurred, 1.0 - blur_weight, blur_weight)
    flat = np.empty_like(image)
    flat[:] = _channel_medians(image[::2, ::2])  # FFHQ fades to the median colour of the blurred image
    fade_weight = np.clip(distance, 0.0, 1.0)
    return cv2.blendLinear(image, flat, 1.0 - fade_weight, fade_weight)


def _channel_medians(image: np.ndarray) -> np.ndarray:
    """Return the per-channel median [C] uint8 of a uint8 image [H, W, C] (by histogram)."""
    channels = image.reshape(-1, image.shape[-1])  # [H * W, C]
    medians = []
    for channel in channels.T:
        cumulative = np.cumsum(np.bincount(channel, minlength=256))
        medians.append(int(np.searchsorted(cumulative, (cumulative[-1] + 1) // 2)))
    return np.array(medians, dtype=np.uint8)


def _photo_coordinates_of_grid(grid_to_photo: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the photo x and y [rows, cols] float32 of every pixel centre of a grid."""
    if is_affine(grid_to_photo):
        m = grid_to_photo.astype(np.float32)
        u = np.arange(cols, dtype=np.float32)[None, :]  # [1, cols]
        v = np.arange(rows, dtype=np.float32)[:, None]  # [rows, 1]
        return m[0, 0] * u + m[0, 1] * v + m[0, 2], m[1, 0] * u + m[1, 1] * v + m[1, 2]
    grid = np.stack(np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64)), axis=-1)
    photo_xy = map_points(grid_to_photo, grid).astype(np.float32)  # [rows, cols, 2]
    return photo_xy[..., 0], photo_xy[..., 1]


def _wide_gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``pixels`` [H, W, C]; wide kernels run on an area-downscaled copy."""
    factor = max(1, int(sigma // 4))
    if factor == 1:
        return cv2.GaussianBlur(pixels, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    rows, cols = pixels.shape[:2]
    small = cv2.resize(pixels, (-(-cols // factor), -(-rows // factor)), interpolation=cv2.INTER_AREA)
    # The box downscale and the linear upscale add about factor²/4 of variance (in full-size pixels²).
    small_sigma = math.sqrt(max(sigma * sigma - factor * factor / 4.0, sigma * sigma / 2.0)) / factor
    small = cv2.GaussianBlur(small, (0, 0), small_sigma, borderType=cv2.BORDER_REFLECT_101)
    return cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)


def warp_crop(photo: np.ndarray, transform: CropTransform, *, qsize: float | None = None) -> np.ndarray:
    """Resample ``transform``'s crop [S, S, 3] from ``photo`` (uint8 RGB [H, W, 3]) in one warp.

    Where the quad leaves the photo, the photo is reflected about its edge, blurred toward the edge
    and faded to the median colour, as in the FFHQ recipe; ``qsize`` (default: the quad's side) sets
    that recipe's scale and should be the inner quad's side for every crop of one face.
    """
    check_rgb_image(photo, "photo")
    qsize = transform.side if qsize is None else qsize
    photo_shape = (photo.shape[0], photo.shape[1])
    fade = _ffhq_fade(transform.quad, photo_shape, qsize)
    sigma = 0.0 if fade is None else fade.blur_sigma * transform.scale  # crop px
    margin = 0 if fade is None else math.ceil(4.0 * sigma)  # blur needs context beyond the crop's edge
    grid = transform.size + 2 * margin
    grid_to_photo = transform.from_crop @ translation(-margin, -margin)
    image = resample(
        photo, grid_to_photo, grid, grid, source_per_target=1.0 / transform.scale, border_mode=cv2.BORDER_REFLECT_101
    )
    if fade is not None:
        image = _apply_fade(image, grid_to_photo, photo_shape, fade, sigma)
        image = image[margin : margin + transform.size, margin : margin + transform.size]
    return np.ascontiguousarray(image)


@dataclass(frozen=True, eq=False)
class Alignment:
    """One face aligned FFHQ-style: the inner and outer crops and their exact maps to the photo.

    The inner crop is the generator-resolution FFHQ crop; the outer crop has the same centre and
    pixel scale and is ``outer.size`` pixels wide, so ``outer_image[m:m + S, m:m + S]`` with
    ``m = inner_offset`` covers the same photo area as ``inner_image``.
    """

    photo_shape: tuple[int, int]  # (H, W) of the photo the crops were taken from
    inner: CropTransform
    outer: CropTransform
    inner_image: np.ndarray  # [S, S, 3] uint8
    outer_image: np.ndarray  # [So, So, 3] uint8

    def __post_init__(self) -> None:
        for name, transform, image in (
            ("inner", self.inner, self.inner_image),
            ("outer", self.outer, self.outer_image),
        ):
            if image.shape != (transform.size, transform.size, 3) or image.dtype != np.uint8:
                raise ValueError(
                    f"{name}_image must be uint8 [{transform.size}, {transform.size}, 3], got {image.shape}"
                )

    @property
    def inner_offset(self) -> int:
        """Pixels from the outer crop's edge to the inner crop's edge."""
        return (self.outer.size - self.inner.size) // 2

    def transform(self, crop: CropName = "inner") -> CropTransform:
        """The transform of the ``crop`` ("inner" or "outer")."""
        return {"inner": self.inner, "outer": self.outer}[crop]

    def image(self, crop: CropName = "inner") -> np.ndarray:
        """The pixels of the ``crop`` ("inner" or "outer")."""
        return {"inner": self.inner_image, "outer": self.outer_image}[crop]

    def to_crop_points(self, points: np.ndarray, crop: CropName = "inner") -> np.ndarray:
        """Map photo coordinates [..., 2] into the ``crop``."""
        return self.transform(crop).to_crop_points(points)

    def to_photo_points(self, points: np.ndarray, crop: CropName = "inner") -> np.ndarray:
        """Map ``crop`` coordinates [..., 2] back into the photo."""
        return self.transform(crop).to_photo_points(points)

    def paste_back(
        self,
        photo: np.ndarray,
        edited: np.ndarray,
        crop: CropName = "inner",
        *,
        mask: np.ndarray | None = None,
        feather: float = DEFAULT_FEATHER,
    ) -> np.ndarray:
        """Return ``photo`` with the edited ``crop`` blended back in (see :func:`fluidsrv.paste.paste_back`)."""
        if photo.shape[:2] != self.photo_shape:
            raise ValueError(f"photo is {photo.shape[:2]}, the alignment was made on {self.photo_shape}")
        return paste_back(photo, edited, self.transform(crop), mask=mask, feather=feather)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain dict of numpy arrays and JSON values (for spilling a session to disk)."""
        return {
            "format": _SERIAL_FORMAT,
            "photo_shape": [int(self.photo_shape[0]), int(self.photo_shape[1])],
            "inner_quad": np.array(self.inner.quad),
            "inner_size": self.inner.size,
            "outer_quad": np.array(self.outer.quad),
            "outer_size": self.outer.size,
            "inner_image": self.inner_image,
            "outer_image": self.outer_image,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alignment:
        """Rebuild an alignment from :meth:`to_dict` output (quads may be nested lists)."""
        if data.get("format") != _SERIAL_FORMAT:
            raise ValueError(f"not a serialized alignment (format {data.get('format')!r})")
        height, width = (int(value) for value in data["photo_shape"])
        return cls(
            photo_shape=(height, width),
            inner=CropTransform(np.asarray(data["inner_quad"], dtype=np.float64), int(data["inner_size"])),
            outer=CropTransform(np.asarray(data["outer_quad"], dtype=np.float64), int(data["outer_size"])),
            inner_image=np.asarray(data["inner_image"]),
            outer_image=np.asarray(data["outer_image"]),
        )


def align_face(
    photo: np.ndarray, landmarks: np.ndarray, *, size: int = 1024, outer_factor: float = DEFAULT_OUTER_FACTOR
) -> Alignment:
    """Align one face of ``photo`` (uint8 RGB [H, W, 3]) from its 68 or 5 ``landmarks`` [N, 2].

    The inner crop is ``size`` pixels (the generator's resolution); the outer crop shares its centre
    and pixel scale and is ``outer_crop_size(size, outer_factor)`` pixels (1536 for 1024).
    """
    check_rgb_image(photo, "photo")
    inner = CropTransform(ffhq_quad(landmarks), size)
    outer = inner.expanded_to(outer_crop_size(size, outer_factor))
    qsize = inner.side
    return Alignment(
        photo_shape=(photo.shape[0], photo.shape[1]),
        inner=inner,
        outer=outer,
        inner_image=warp_crop(photo, inner, qsize=qsize),
        outer_image=warp_crop(photo, outer, qsize=qsize),
    )
