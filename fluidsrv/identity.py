"""How far an edited face has drifted from the person in the photo: the distance of two face embeddings.

An :class:`Embedder` turns an FFHQ-aligned face crop into an identity embedding and says at which distance two
embeddings stop being the same person: dlib's 128-d ResNet descriptor (offline, Euclidean distance, 0.6) by
default, or an ArcFace ONNX model the user put in the weights cache (insightface's ``w600k_r50.onnx`` of the
buffalo_l pack, ``glintr100.onnx``, ``w600k_mbf.onnx``; cosine distance). Where the face sits is found once on the
reference crop and reused for every edited crop of it, so an edit that moves the face is measured, not re-found.

:class:`IdentityMeter` runs the embedder in one worker process (``python -c``, so no main module is imported
again) at the lowest CPU priority (SCHED_IDLE): dlib holds the GIL for the whole ~0.1 s of a descriptor, so in a
thread it would stall the event loop and the device worker that render previews. The worker keeps the reference
embeddings it has made (by key), so a session's aligned upload face is embedded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import pickle
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import cv2
import numpy as np

from fluidsrv import dlib_faces

ARCFACE_PATTERNS = ("w600k_r50.onnx", "glintr100.onnx", "w600k_mbf.onnx", "arcface*.onnx")
ARCFACE_SIDE = 112
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])  # insightface's 5 points in a 112² crop
ARCFACE_SAME_PERSON = 0.65  # cosine distance (1 − cosine similarity 0.35), a usual ArcFace verification threshold
WORKER_NICE = 19  # where SCHED_IDLE is missing, the worker's niceness instead
MAX_FAILED_STARTS = 2  # then the meter reports itself unavailable instead of starting the worker again
REFERENCES_KEPT = 128  # reference embeddings the worker keeps (least recently used dropped first)
EMBEDDERS = ("auto", "dlib", "arcface", "off")
# the worker imports only the modules it needs: a bare package module stands in for fluidsrv/__init__.py (which
# loads torch and the plugin API), so it starts in about a second
WORKER_COMMAND = ("import sys, types; package = types.ModuleType('fluidsrv'); package.__path__ = [sys.argv[1]]; "
                  "sys.modules['fluidsrv'] = package; from fluidsrv.identity import serve_worker; serve_worker()")
_LENGTH = struct.Struct(">I")  # the length of each pickled message on the worker's pipes


class Embedder(Protocol):
    """Identity embeddings of aligned face crops, and the distance at which two stop being one person."""

    name: str
    threshold: float

    def locate(self, reference: np.ndarray, points5: np.ndarray) -> Any:
        """Where the face is in ``reference`` (uint8 RGB [S, S, 3]; its five landmarks [5, 2]), for :meth:`embed`."""
        ...

    def embed(self, image: np.ndarray, where: Any) -> np.ndarray:
        """The embedding of the face at ``where`` in ``image`` (an aligned crop of the reference's size)."""
        ...

    def distance(self, first: np.ndarray, second: np.ndarray) -> float:
        """How far apart two embeddings are (below ``threshold``: the same person)."""
        ...


class DlibEmbedder:
    """dlib's 128-d face descriptor on the face box of the aligned crop; Euclidean distance, same person < 0.6."""

    name = "dlib"
    threshold = dlib_faces.SAME_PERSON_DISTANCE

    def locate(self, reference: np.ndarray, points5: np.ndarray) -> Any:
        """The face rectangle HOG finds in the reference crop (else the aligned crop's usual face area)."""
        return dlib_faces.aligned_face_box(reference)

    def embed(self, image: np.ndarray, where: Any) -> np.ndarray:
        """dlib's descriptor [128] of the face in the rectangle ``where``."""
        return dlib_faces.embedding(image, where)

    def distance(self, first: np.ndarray, second: np.ndarray) -> float:
        """The Euclidean distance of two descriptors."""
        return float(np.linalg.norm(first - second))


class ArcFaceEmbedder:
    """An ArcFace ONNX model (112² crops laid on insightface's five-point template); cosine distance."""

    name = "arcface"
    threshold = ARCFACE_SAME_PERSON

    def __init__(self, model_file: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        shape = self._session.get_inputs()[0].shape
        if len(shape) != 4 or shape[2:] != [ARCFACE_SIDE, ARCFACE_SIDE]:
            raise ValueError(f"{model_file} takes {shape}, not an ArcFace model's [N, 3, 112, 112]")
        self._input = self._session.get_inputs()[0].name

    def locate(self, reference: np.ndarray, points5: np.ndarray) -> Any:
        """The similarity map [2, 3] laying the reference's five landmarks on the ArcFace template."""
        matrix, _ = cv2.estimateAffinePartial2D(points5.astype(np.float32), ARCFACE_TEMPLATE.astype(np.float32))
        if matrix is None:
            raise ValueError("the face's five landmarks give no similarity map")
        return matrix

    def embed(self, image: np.ndarray, where: Any) -> np.ndarray:
        """The unit-length ArcFace embedding of the 112² crop the map ``where`` takes from ``image``."""
        face = cv2.warpAffine(image, where, (ARCFACE_SIDE, ARCFACE_SIDE), flags=cv2.INTER_AREA)  # [112, 112, 3]
        blob = ((face.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]  # [1, 3, 112, 112] RGB
        vector = np.asarray(self._session.run(None, {self._input: blob})[0], dtype=np.float64).reshape(-1)
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    def distance(self, first: np.ndarray, second: np.ndarray) -> float:
        """One minus the cosine similarity of two unit embeddings."""
        return float(1.0 - np.dot(first, second))


def find_arcface_model(cache_dir: Path) -> Path | None:
    """A user-provided ArcFace ONNX model in the weights cache (top level or one folder down, e.g. buffalo_l/)."""
    for pattern in ARCFACE_PATTERNS:
        for where in (pattern, f"*/{pattern}"):
            found = sorted(cache_dir.glob(where))
            if found:
                return found[0]
    return None


@dataclass(frozen=True)
class EmbedderChoice:
    """The embedder a server uses (``name`` None: the meter is off or cannot run, ``reason`` says why)."""

    name: str | None
    threshold: float = 0.0
    model_file: Path | None = None
    reason: str = ""


def choose_embedder(wanted: str, cache_dir: Path, model_file: Path | None = None) -> EmbedderChoice:
    """Resolve the ``identity_meter`` setting: "auto" (ArcFace when its model is there, else dlib), "dlib",
    "arcface" or "off"."""
    if wanted not in EMBEDDERS:
        raise ValueError(f"the identity meter must be one of {', '.join(EMBEDDERS)}, not {wanted!r}")
    if wanted == "off":
        return EmbedderChoice(None, reason="the identity meter is turned off (FLUIDSRV_IDENTITY_METER=off)")
    if wanted in ("auto", "arcface"):
        arcface = model_file if model_file is not None else find_arcface_model(cache_dir)
        problem = _arcface_problem(arcface)
        if problem is None:
            return EmbedderChoice("arcface", ARCFACE_SAME_PERSON, arcface)
        if wanted == "arcface":
            return EmbedderChoice(None, reason=problem)
    reason = dlib_faces.unavailable_reason(dlib_faces.PREDICTOR_68, dlib_faces.IDENTITY_RESNET)
    if reason is not None:
        return EmbedderChoice(None, reason=reason)
    return EmbedderChoice("dlib", dlib_faces.SAME_PERSON_DISTANCE)


def _arcface_problem(model_file: Path | None) -> str | None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install onnxruntime)"
    if model_file is None or not model_file.is_file():
        return f"no ArcFace ONNX model ({', '.join(ARCFACE_PATTERNS)}) in the weights cache"
    return None


def build_embedder(choice: EmbedderChoice) -> Embedder:
    """The embedder of a resolved choice."""
    if choice.name == "arcface":
        assert choice.model_file is not None
        return ArcFaceEmbedder(choice.model_file)
    if choice.name == "dlib":
        return DlibEmbedder()
    raise ValueError(f"no embedder to build: {choice.reason}")


# ---- the worker process --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A session's aligned upload face: ``key`` names it (session and prepare version) in the worker's cache."""

    key: str
    image: np.ndarray  # uint8 RGB [S, S, 3]
    points5: np.ndarray  # [5, 2] its five landmarks, in its pixels


@dataclass(frozen=True)
class PhotoCrop:
    """A finalized photo (encoded) and where its aligned face is: the quad [4, 2] sampled at ``side`` pixels."""

    encoded: bytes
    quad: np.ndarray
    side: int


class Measurer:
    """The worker's state: one embedder and the reference embeddings it has made."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._references: OrderedDict[str, tuple[Any, np.ndarray]] = OrderedDict()

    def distance(self, reference: Reference, image: np.ndarray) -> float:
        """The embedding distance of ``image`` (an aligned crop like the reference) to the reference face."""
        known = self._references.get(reference.key)
        if known is None:
            where = self.embedder.locate(reference.image, reference.points5)
            known = (where, self.embedder.embed(reference.image, where))
            self._references[reference.key] = known
            while len(self._references) > REFERENCES_KEPT:
                self._references.popitem(last=False)
        self._references.move_to_end(reference.key)
        where, embedded = known
        if image.shape != reference.image.shape:
            image = cv2.resize(image, reference.image.shape[1::-1], interpolation=cv2.INTER_AREA)
        return self.embedder.distance(embedded, self.embedder.embed(image, where))


def serve_worker() -> None:
    """The worker process's loop: the embedder choice, then (reference, image) requests answered in order.

    Messages are pickles with a 4-byte length on stdin / stdout (the parent is the only peer); stray prints go to
    stderr, the server's log.
    """
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    lower_priority()
    choice = _read_message(requests)
    measurer = Measurer(build_embedder(choice))
    _write_message(replies, ("ready", None))
    while True:
        try:
            reference, image = _read_message(requests)
        except EOFError:  # the server closed the pipe: it is shutting down
            return
        try:
            reply: tuple[str, Any] = ("ok", measurer.distance(reference, decode_face(image)))
        except Exception as error:
            reply = ("error", f"{type(error).__name__}: {error}")
        _write_message(replies, reply)


def lower_priority() -> None:
    """Run this process only when the CPU is otherwise idle (Linux SCHED_IDLE), else at the lowest niceness: the
    meter then never takes CPU time from the previews it measures, it only lags behind them."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        os.nice(WORKER_NICE)


def _read_message(stream: BinaryIO) -> Any:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError("the pipe was closed")
    return pickle.loads(stream.read(_LENGTH.unpack(header)[0]))


def _write_message(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def decode_face(image: bytes | PhotoCrop) -> np.ndarray:
    """An aligned face crop as uint8 RGB: an encoded crop (a preview frame), or the crop of a finalized photo."""
    from PIL import Image

    if not isinstance(image, PhotoCrop):
        with Image.open(io.BytesIO(image)) as opened:
            return np.asarray(opened.convert("RGB"))
    from fluidsrv.crops import CropTransform
    from fluidsrv.geometry import warp_crop

    with Image.open(io.BytesIO(image.encoded)) as opened:
        full_width = opened.width
        quad_side = float(np.linalg.norm(image.quad[1] - image.quad[0]))
        shrink = max(1.0, quad_side / image.side)  # a JPEG decodes at 1/2, 1/4, 1/8 size much faster
        opened.draft("RGB", (math.ceil(opened.width / shrink), math.ceil(opened.height / shrink)))
        pixels = np.asarray(opened.convert("RGB"))
    scale = pixels.shape[1] / full_width
    return warp_crop(pixels, CropTransform(image.quad * scale, image.side))


class IdentityWorkerError(RuntimeError):
    """The worker process could not measure (it failed to start, died, or the embedder raised)."""


class IdentityMeter:
    """Embedding distances to a reference face, measured in one low-priority worker process started on first use.

    Its methods run on one event loop (the service's); measurements are answered in order, one at a time.
    """

    def __init__(self, choice: EmbedderChoice) -> None:
        self.choice = choice
        self._worker: asyncio.Future[asyncio.subprocess.Process] | None = None
        self._turn: asyncio.Lock | None = None
        self._failed_starts = 0
        self._broken: str | None = None  # why the worker will not be started again
        self._closed = False
        self._process: asyncio.subprocess.Process | None = None  # the newest worker process, ready or not

    @property
    def available(self) -> bool:
        """Whether measurements can be made (an embedder is chosen, and its worker has not failed to start)."""
        return self.choice.name is not None and self._broken is None and not self._closed

    @property
    def unavailable_reason(self) -> str:
        """Why no measurement can be made (when not :attr:`available`)."""
        return self._broken or self.choice.reason or "the identity meter is closed"

    @property
    def started(self) -> bool:
        """Whether the worker process is running or starting."""
        return self._worker is not None

    def start(self) -> None:
        """Start the worker process now (it loads the embedder), unless it is running or starting."""
        if self.available and self._worker is None:
            self._worker = asyncio.ensure_future(self._spawn())

    async def _spawn(self) -> asyncio.subprocess.Process:
        try:
            return await self._start_process()
        except (OSError, EOFError, asyncio.IncompleteReadError, IdentityWorkerError) as error:
            self._failed_starts += 1
            if self._failed_starts >= MAX_FAILED_STARTS:  # e.g. a broken model file: never respawn on every offer
                self._broken = f"the identity worker failed to start {self._failed_starts} times: {error!r}"
            raise IdentityWorkerError(f"the identity worker did not start: {error!r}") from None

    async def _start_process(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER_COMMAND, str(Path(__file__).resolve().parent), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        self._process = process
        assert process.stdin is not None and process.stdout is not None
        data = pickle.dumps(self.choice, protocol=pickle.HIGHEST_PROTOCOL)
        process.stdin.write(_LENGTH.pack(len(data)) + data)
        status, _ = await _receive(process.stdout)
        if status != "ready":
            raise IdentityWorkerError(f"the identity worker did not start: {status}")
        return process

    async def distance(self, reference: Reference, image: bytes | PhotoCrop) -> float:
        """The distance of ``image`` (an encoded aligned crop, or a finalized photo's crop) to ``reference``."""
        if not self.available:
            raise IdentityWorkerError(self.unavailable_reason)
        if self._turn is None:
            self._turn = asyncio.Lock()
        # shielded with the lock inside: a caller cancelled mid-exchange leaves the exchange (and the lock) to
        # finish, so its answer is never read by the next caller
        status, value = await asyncio.shield(self._exchange_in_turn(self._turn, reference, image))
        if status != "ok":
            raise IdentityWorkerError(str(value))
        return float(value)

    async def _exchange_in_turn(self, turn: asyncio.Lock, reference: Reference,
                                image: bytes | PhotoCrop) -> tuple[str, Any]:
        async with turn:
            self.start()  # after the wait: the worker may have died or been closed meanwhile
            if self._worker is None:
                raise IdentityWorkerError(self.unavailable_reason)
            return await self._exchange(self._worker, reference, image)

    async def _exchange(self, worker: asyncio.Future[asyncio.subprocess.Process], reference: Reference,
                        image: bytes | PhotoCrop) -> tuple[str, Any]:
        try:
            process = await worker
            assert process.stdin is not None and process.stdout is not None
            data = pickle.dumps((reference, image), protocol=pickle.HIGHEST_PROTOCOL)
            process.stdin.write(_LENGTH.pack(len(data)) + data)
            await process.stdin.drain()
            return await _receive(process.stdout)
        except (OSError, EOFError, asyncio.IncompleteReadError, IdentityWorkerError) as error:
            if self._worker is worker:
                self._worker = None  # it died (killed, out of memory): the next measurement starts a new one
            raise IdentityWorkerError(f"the identity worker stopped: {error!r}") from None

    async def close(self) -> None:
        """Stop the worker process (it holds nothing to save: it is killed); no new one is started."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()  # still starting: never wait for its "ready"
            await asyncio.gather(worker, return_exceptions=True)
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _receive(stream: asyncio.StreamReader) -> tuple[str, Any]:
    header = await stream.readexactly(_LENGTH.size)
    reply: tuple[str, Any] = pickle.loads(await stream.readexactly(_LENGTH.unpack(header)[0]))
    return reply


@dataclass(frozen=True)
class IdentityReading:
    """One measurement of the meter: how far the face of a slider state (``source`` "preview") or of the
    finalized photo ("final") is from the person in the upload, for the prepare ``version`` of a session."""

    distance: float
    threshold: float
    embedder: str
    source: str  # "preview" or "final"
    values: dict[str, float]  # the slider state measured
    version: int

    @property
    def same_person(self) -> bool:
        """Whether the distance is below the embedder's same-person threshold."""
        return self.distance < self.threshold

    def describe(self) -> dict[str, Any]:
        """The JSON form (the websocket's ``identity`` message and the session view's readings)."""
        return {"distance": round(self.distance, 4), "threshold": self.threshold, "same_person": self.same_person,
                "embedder": self.embedder, "source": self.source, "values": dict(self.values)}
