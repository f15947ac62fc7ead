"""Soak test: N simulated users edit faces on one live ``fluidsrv serve`` for M minutes, through the public API.

    .venv/bin/python benchmarks/soak.py [--users 32] [--minutes 10] [--generator embedded] [--device cpu]
                                        [--finetune-steps N] [--json soak.json]

Starts ``fluidsrv serve`` in a subprocess (``benchmarks/live_server.py``: real uvicorn on a free loopback port,
its own data folder, an admin token for ``/api/stats``), then:

1. **Photo check**: uploads each ``--photos`` JPEG once and keeps those with a face (the rest would only measure
   ``422 no_face``).
2. **Solo**: one user alone uploads and prepares the same photo ``--solo-runs`` times (default 3); the median
   time from the pick to ``ready`` is the solo prepare time.
3. **Crowd**: ``--users`` users, started evenly over the ramp (``--ramp`` seconds, at most 20 % of the run), each
   looping until the run's end: upload a random photo → open the websocket → pick face 0 → wait for ``ready``
   (the prepare wait; ``progress`` events may say ``queued: N``) → edit for ``--edit-seconds`` (90–240 s): drag
   sliders at ``--rate`` states/s (real slider names of ``GET /api/directions``, one gesture of ~2 s per slider
   ending in a committed "release", now and then an undo / redo), and after 2 of 3 releases look at the result
   for 1–6 s before the next gesture → in about 1 of 3 cycles finalize and download the result → in about
   1 of 4 reconnect the websocket mid-drag (a tab reload) → ``DELETE`` the session (1 in 10 is left behind, an
   abandoned tab) → a short pause → next cycle. After the end, users finish what they are doing (``--drain``
   seconds at most; prepare waits still running then count with their time so far).

Every simulated user has its own address (``X-Forwarded-For`` from loopback, which the server is told to trust),
so the per-address upload and decoding limits apply per user as they would to real visitors. Every await has a
timeout; a timeout is an error.

Reported (and ``--json PATH``): errors by kind (HTTP ≥ 500, unexpected 4xx with their codes, websocket ``error``
events by code, websocket drops = closes the client did not ask for, timeouts, transport failures), counts,
preview latency p50 / p95 (a state's send → its frame, per received frame), prepare wait p50 / p95 against the
solo time, the longest gap between preview frames per session while it sends sliders, and the server's RSS
(``/proc/PID/status`` every ``--rss-interval`` seconds) after warm-up (20 % of the run) against the end.
One PASS / FAIL line per bound: 0 errors; RSS growth after warm-up ≤ 10 %; p95 prepare wait ≤ 2 × solo; no
session more than 2 s without a preview while it sends. The exit status is 1 when a bound fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import live_server  # noqa: E402
from fluidsrv.protocol import decode_frame  # noqa: E402

DEFAULT_PHOTOS = REPO.parent / "shared" / "photos"
SOLO_PHOTO = "deepface_img12.jpg"  # the solo runs' photo when present (else the first usable one)
ADMIN_TOKEN = "soak-admin"

# bounds of the issue
MAX_ERRORS = 0
MAX_RSS_GROWTH = 0.10
MAX_PREPARE_RATIO = 2.0
MAX_PREVIEW_GAP_S = 2.0

# what a simulated user does
EDIT_SECONDS = (90.0, 240.0)  # time spent editing one photo (gestures and the pauses between them)
GESTURE_SECONDS = (1.5, 2.5)  # one slider dragged, then released (a committed state)
THINK_SECONDS = (1.0, 6.0)  # after a release, looking at the result before the next gesture
THINK_SHARE = 2 / 3  # releases followed by such a pause
PAUSE_SECONDS = (1.0, 5.0)  # between cycles: choosing the next photo
FINALIZE_SHARE = 1 / 3
RECONNECT_SHARE = 1 / 4
ABANDON_SHARE = 1 / 10
UNDO_SHARE = 1 / 10  # per release
REDO_SHARE = 1 / 2  # per undo: redo it at the next release

# timeouts (seconds)
HTTP_TIMEOUT = 30.0
UPLOAD_TIMEOUT = 120.0
PREPARE_TIMEOUT = 900.0
FINALIZE_TIMEOUT = 300.0
WS_OPEN_TIMEOUT = 20.0
WS_SEND_TIMEOUT = 10.0
WS_CLOSE_TIMEOUT = 10.0


class CycleError(Exception):
    """A step of a user's cycle failed; the error is recorded already."""


def percentile(values: list[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def rounded(value: float | None, digits: int = 3) -> float | None:
    """Return ``value`` rounded, None staying None."""
    return None if value is None else round(value, digits)


def ms(value: float | None) -> str:
    """Format seconds as milliseconds."""
    return "n/a" if value is None else f"{1000 * value:.0f} ms"


def secs(value: float | None) -> str:
    """Format seconds."""
    return "n/a" if value is None else f"{value:.2f} s"


@dataclass
class Recorder:
    """Everything measured during the run, shared by all users."""

    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    prepare_waits: list[float] = field(default_factory=list)
    prepare_censored: list[float] = field(default_factory=list)  # still waiting at the hard stop: time so far
    queue_places: list[int] = field(default_factory=list)  # the largest ``queued`` each prepare heard
    prepare_runs: list[float] = field(default_factory=list)  # from its first running step (out of line) to ready
    session_gaps: list[float] = field(default_factory=list)  # per session: longest preview gap while sending
    samples: list[dict[str, Any]] = field(default_factory=list)  # RSS and /api/stats over time

    def error(self, kind: str, detail: str = "") -> None:
        """Count an error of ``kind`` and keep its first detail as an example."""
        self.errors[kind] += 1
        if detail and kind not in self.error_examples:
            self.error_examples[kind] = detail[:300]


# ---- the server process ------------------------------------------------------------------------------------


def server_env(args: argparse.Namespace, data_dir: Path) -> dict[str, str]:
    """Return the environment of the soak's server."""
    env = {
        **os.environ,
        "FLUIDSRV_GENERATOR": args.generator,
        "FLUIDSRV_DEVICE": args.device,
        "FLUIDSRV_DATA_DIR": str(data_dir),
        "FLUIDSRV_MAX_SESSIONS": "256",  # the abandoned sessions stay for the whole run
        "FLUIDSRV_ADMIN_TOKEN": ADMIN_TOKEN,  # /api/stats needs it
        "FLUIDSRV_FORWARDED_ALLOW_IPS": "127.0.0.1",  # each simulated user sends its own X-Forwarded-For
    }
    if args.finetune is not None:
        env["FLUIDSRV_FINETUNE"] = args.finetune
    if args.finetune_steps is not None:
        env["FLUIDSRV_FINETUNE_STEPS"] = str(args.finetune_steps)
    if args.project_steps is not None:
        env["FLUIDSRV_PLUGIN_OPTIONS"] = json.dumps({"encoder.project": {"steps": args.project_steps}})
    return env


def listening_inodes(port: int) -> set[str]:
    """Return the socket inodes listening on TCP ``port`` (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listening_pid(port: int) -> int | None:
    """Return the id of the process listening on TCP ``port`` on this machine (None when not found)."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    return int(entry.name)
        except OSError:
            continue
    return None


def rss_bytes(pid: int) -> int | None:
    """Return the resident set size of process ``pid`` (VmRSS), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def user_address(index: int) -> str:
    """Return the address simulated user ``index`` comes from."""
    return f"10.{index // 62500 % 250}.{index // 250 % 250}.{index % 250 + 1}"


# ---- talking to the server ---------------------------------------------------------------------------------


def error_code(response: httpx.Response) -> str:
    """Return the ``error.code`` of an error response, or "?"."""
    try:
        body = response.json()
    except ValueError:
        return "?"
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code", "?")) if isinstance(error, dict) else "?"


class Api:
    """One user's REST client: every call has a total timeout and records what went wrong."""

    def __init__(self, url: str, address: str, recorder: Recorder) -> None:
        self.url, self.address, self.recorder = url, address, recorder
        self.http = httpx.AsyncClient(base_url=url, headers={"X-Forwarded-For": address}, timeout=HTTP_TIMEOUT)

    async def close(self) -> None:
        """Close the connection pool."""
        async with asyncio.timeout(HTTP_TIMEOUT):
            await self.http.aclose()

    async def call(self, step: str, method: str, path: str, expect: int, timeout: float = HTTP_TIMEOUT,
                   **kwargs: Any) -> httpx.Response:  # fmt: skip
        """Send a request; return the response if it has status ``expect``, else record the error and fail."""
        try:
            async with asyncio.timeout(timeout):
                response = await self.http.request(method, path, timeout=timeout, **kwargs)
        except TimeoutError:
            self.recorder.error(f"timeout:{step}", f"{method} {path} took over {timeout:g} s")
            raise CycleError from None
        except httpx.HTTPError as error:
            self.recorder.error(f"transport:{step}:{type(error).__name__}", str(error))
            raise CycleError from None
        if response.status_code != expect:
            kind = "http_5xx" if response.status_code >= 500 else "http_4xx"
            self.recorder.error(f"{kind}:{response.status_code}:{step}:{error_code(response)}",
                                response.text[:300])  # fmt: skip
            raise CycleError
        return response

    async def upload(self, name: str, photo: bytes) -> dict[str, Any]:
        """Upload a photo; return the created session (id, token, faces)."""
        response = await self.call("upload", "POST", "/api/sessions", 201, UPLOAD_TIMEOUT,
                                   files={"file": (name, photo, "image/jpeg")})  # fmt: skip
        self.recorder.counts["uploads"] += 1
        created: dict[str, Any] = response.json()
        return created


@dataclass
class Track:
    """One session's slider traffic across its websockets: send times by seq and the preview gaps."""

    sent: dict[int, float] = field(default_factory=dict)
    reference: float | None = None  # the last frame (or the first send) while sending; None while not sending
    max_gap: float = 0.0
    sending_seen: bool = False
    adopt: dict[str, float] | None = None  # slider values an undo / redo answered with, to take over

    def sending(self, now: float) -> None:
        """Note a send: starts the gap clock if it was stopped."""
        self.sending_seen = True
        if self.reference is None:
            self.reference = now

    def frame(self, now: float) -> None:
        """Note a preview frame: closes the current gap."""
        if self.reference is not None:
            self.max_gap = max(self.max_gap, now - self.reference)
            self.reference = now

    def pause(self, now: float) -> None:
        """Stop the gap clock (the drag ends or the socket reconnects), counting the gap so far."""
        if self.reference is not None:
            self.max_gap = max(self.max_gap, now - self.reference)
            self.reference = None


class Socket:
    """One open websocket of a session: a reader task records frames and events, the rest waits in a queue."""

    def __init__(self, ws: ClientConnection, track: Track, recorder: Recorder) -> None:
        self.ws, self.track, self.recorder = ws, track, recorder
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closing = False
        self.max_queued = 0
        self.running_since: float | None = None  # the first progress of the prepare that is not "queued"
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, address: str, track: Track, recorder: Recorder) -> tuple[Socket, dict[str, Any]]:
        """Connect and wait for the ``state`` event; return the socket and that state."""
        try:
            async with asyncio.timeout(WS_OPEN_TIMEOUT):
                ws = await websockets.connect(url, max_size=None, ping_interval=None, close_timeout=5,
                                              additional_headers={"X-Forwarded-For": address})  # fmt: skip
        except TimeoutError:
            recorder.error("timeout:ws_open", f"no websocket in {WS_OPEN_TIMEOUT:g} s")
            raise CycleError from None
        except (OSError, websockets.WebSocketException) as error:
            recorder.error(f"transport:ws_open:{type(error).__name__}", str(error))
            raise CycleError from None
        socket = cls(ws, track, recorder)
        try:
            state = await socket.wait_for("state", WS_OPEN_TIMEOUT, "ws_state")
        except CycleError:
            await socket.close()
            raise
        return socket, state

    async def _read(self) -> None:
        """Receive until the connection closes (lives as long as the socket; cancelled by close)."""
        try:
            async for message in self.ws:
                now = time.perf_counter()
                if isinstance(message, bytes):
                    self._on_frame(message, now)
                else:
                    self._on_text(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            if not self.closing:
                code = self.ws.close_code
                self.recorder.error(f"ws_drop:{code}", f"closed by the server or the network: {self.ws.close_reason}")
                self.events.put_nowait({"type": "_closed", "code": code})

    def _on_frame(self, data: bytes, now: float) -> None:
        try:
            frame = decode_frame(data)
        except (ValueError, KeyError) as error:
            self.recorder.error("protocol:bad_frame", str(error))
            return
        if frame.kind != "preview":
            return
        sent = self.track.sent.pop(frame.seq, None)
        if sent is None:
            self.recorder.error("protocol:unmatched_frame", f"a preview of seq {frame.seq}, which was not pending")
            return
        for seq in [seq for seq in self.track.sent if seq < frame.seq]:  # superseded: their frames never come
            del self.track.sent[seq]
        self.recorder.latencies.append(now - sent)
        self.recorder.counts["previews"] += 1
        self.track.frame(now)

    def _on_text(self, text: str) -> None:
        try:
            data = json.loads(text)
            kind = data["type"]
        except (ValueError, KeyError, TypeError):
            self.recorder.error("protocol:bad_event", text[:200])
            return
        if kind == "error":
            self.recorder.error(f"ws_error:{data.get('code')}", str(data.get("message")))
        elif kind == "progress":
            self.max_queued = max(self.max_queued, int(data.get("queued") or 0))
            if not data.get("queued") and self.running_since is None:
                self.running_since = time.perf_counter()
            return
        elif kind == "saved":
            self.recorder.counts["saved"] += 1
            return
        elif kind == "sliders":
            values = data.get("values")
            self.track.adopt = dict(values) if isinstance(values, dict) else None
            return
        elif kind == "pong":
            return
        self.events.put_nowait(data)

    async def wait_for(self, kind: str, timeout: float, step: str) -> dict[str, Any]:
        """Return the next ``kind`` event (others are dropped); fail on an error event, a drop or the timeout."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.events.get()
                    if data["type"] == kind:
                        return data
                    if data["type"] in ("error", "_closed"):
                        raise CycleError  # recorded by the reader
        except TimeoutError:
            self.recorder.error(f"timeout:{step}", f"no {kind!r} event in {timeout:g} s")
            raise CycleError from None

    async def send(self, message: dict[str, Any]) -> None:
        """Send a JSON message; fail when the connection is gone or the send hangs."""
        try:
            async with asyncio.timeout(WS_SEND_TIMEOUT):
                await self.ws.send(json.dumps(message))
        except TimeoutError:
            self.recorder.error("timeout:ws_send", f"a send took over {WS_SEND_TIMEOUT:g} s")
            raise CycleError from None
        except websockets.ConnectionClosed:
            raise CycleError from None  # the reader records the drop

    async def close(self) -> None:
        """Close the connection (a close we asked for) and stop the reader."""
        self.closing = True
        try:
            async with asyncio.timeout(WS_CLOSE_TIMEOUT):
                await self.ws.close()
        except TimeoutError:
            self.recorder.error("timeout:ws_close", f"closing took over {WS_CLOSE_TIMEOUT:g} s")
        self.reader.cancel()
        try:
            async with asyncio.timeout(WS_CLOSE_TIMEOUT):
                await asyncio.gather(self.reader, return_exceptions=True)
        except TimeoutError:
            pass


# ---- a simulated user --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slider:
    """A slider of ``GET /api/directions``."""

    name: str
    low: float
    high: float


def sliders_of(directions: dict[str, Any]) -> list[Slider]:
    """Return the sliders of a ``GET /api/directions`` body."""
    out = []
    for item in directions["directions"]:
        low, high = float(item.get("min", -3.0)), float(item.get("max", 3.0))
        out.append(Slider(str(item["name"]), max(low, -100.0), min(high, 100.0)))
    return out


@dataclass
class Gesture:
    """One slider dragged from ``start`` to ``target`` over ``seconds``, then released."""

    slider: Slider
    start: float
    target: float
    began: float
    seconds: float

    def value(self, now: float) -> tuple[float, bool]:
        """Return the slider's value at ``now`` and whether the gesture has ended (the release)."""
        progress = min(1.0, (now - self.began) / self.seconds)
        eased = progress * progress * (3 - 2 * progress)
        return self.start + (self.target - self.start) * eased, progress >= 1.0


@dataclass
class Run:
    """What every user shares: the server, the photos, the sliders, the clock and the recorder."""

    url: str
    photos: dict[str, bytes]
    sliders: list[Slider]
    recorder: Recorder
    rate: float
    edit_seconds: tuple[float, float] = EDIT_SECONDS
    deadline: float = math.inf

    @property
    def ws_url(self) -> str:
        """Return the websocket base URL."""
        return "ws" + self.url.removeprefix("http")


class User:
    """A simulated user looping through upload → prepare → drag → (finalize) → delete until the deadline."""

    def __init__(self, run: Run, seed: int, address: str) -> None:
        self.run = run
        self.random = random.Random(seed)
        self.address = address
        self.api = Api(run.url, self.address, run.recorder)
        self.waiting_since: float | None = None  # while a prepare waits for ready
        self.seq = 0

    async def loop(self, start_at: float) -> None:
        """Wait for this user's start, then run cycles until the deadline."""
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        try:
            while time.perf_counter() < self.run.deadline:
                try:
                    await self.cycle()
                except CycleError:
                    self.run.recorder.counts["failed_cycles"] += 1
                await asyncio.sleep(self.random.uniform(*PAUSE_SECONDS))
        finally:
            await self.api.close()

    async def cycle(self) -> None:
        """One upload → prepare → drag → maybe finalize → maybe delete."""
        name = self.random.choice(sorted(self.run.photos))
        created = await self.api.upload(name, self.run.photos[name])
        sid, token = created["session_id"], created["token"]
        track, socket = Track(), None
        try:
            socket = await self.open(sid, token, track)
            await self.prepare(socket, sid, token)
            seconds = min(self.random.uniform(*self.run.edit_seconds), self.run.deadline - time.perf_counter())
            reconnect_at = self.random.uniform(0.25, 0.75) * seconds if self.random.random() < RECONNECT_SHARE else None
            socket = await self.drag(socket, sid, token, track, seconds, reconnect_at)
            if self.random.random() < FINALIZE_SHARE and time.perf_counter() < self.run.deadline:
                await self.finalize(sid, token)
        finally:
            if track.sending_seen:
                track.pause(time.perf_counter())
                self.run.recorder.session_gaps.append(track.max_gap)
            if socket is not None:
                await socket.close()
            if self.random.random() < ABANDON_SHARE:
                self.run.recorder.counts["abandoned"] += 1
            else:
                await self.api.call("delete", "DELETE", f"/api/sessions/{sid}", 204, headers=auth(token))
                self.run.recorder.counts["deletes"] += 1

    async def open(self, sid: str, token: str, track: Track) -> Socket:
        """Open the session's websocket."""
        url = f"{self.run.ws_url}/api/sessions/{sid}/ws?token={token}"
        socket, _ = await Socket.open(url, self.address, track, self.run.recorder)
        return socket

    async def prepare(self, socket: Socket, sid: str, token: str) -> float:
        """Pick face 0 and wait for ``ready``; record and return the wait."""
        began = time.perf_counter()
        self.waiting_since = began
        socket.running_since = None
        try:
            await self.api.call("pick", "POST", f"/api/sessions/{sid}/face", 202, json={"index": 0},
                                headers=auth(token))  # fmt: skip
            await socket.wait_for("ready", PREPARE_TIMEOUT, "prepare")
        finally:
            self.waiting_since = None
        ready = time.perf_counter()
        wait = ready - began
        recorder = self.run.recorder
        recorder.prepare_waits.append(wait)
        recorder.prepare_runs.append(ready - (socket.running_since or began))
        recorder.queue_places.append(socket.max_queued)
        recorder.counts["prepares"] += 1
        return wait

    def gesture(self, values: dict[str, float], now: float) -> Gesture:
        """Start dragging a random slider toward a random value."""
        slider = self.random.choice(self.run.sliders)
        start = values.get(slider.name, 0.0)
        return Gesture(slider, start, self.random.uniform(slider.low, slider.high), now,
                       self.random.uniform(*GESTURE_SECONDS))  # fmt: skip

    def next_seq(self) -> int:
        """Return the next message counter."""
        self.seq += 1
        return self.seq

    async def drag(self, socket: Socket, sid: str, token: str, track: Track, seconds: float,
                   reconnect_at: float | None) -> Socket:  # fmt: skip
        """Send slider states at the run's rate for ``seconds``; return the socket in use at the end."""
        began = time.perf_counter()
        values: dict[str, float] = {}
        gesture = self.gesture(values, began)
        history: str | None = None  # "undo" / "redo" to send at the next tick
        ticks, tick_zero = 0, began
        while (now := time.perf_counter()) < began + seconds:
            if reconnect_at is not None and now - began >= reconnect_at:
                reconnect_at = None
                socket, values = await self.reconnect(socket, sid, token, track, now)
                gesture, ticks, tick_zero = self.gesture(values, time.perf_counter()), 0, time.perf_counter()
                continue
            if track.adopt is not None:  # an undo / redo answered: the sliders jump there
                values, track.adopt = track.adopt, None
                gesture = self.gesture(values, now)
            seq = self.next_seq()
            if history is not None:
                message: dict[str, Any] = {"type": history, "seq": seq}
                self.run.recorder.counts[history + "s"] += 1
                history = "redo" if history == "undo" and self.random.random() < REDO_SHARE else None
            else:
                value, released = gesture.value(now)
                values[gesture.slider.name] = round(value, 4)
                message = {"seq": seq, "values": dict(values), "commit": released}
                if released:
                    self.run.recorder.counts["commits"] += 1
                    if self.random.random() < UNDO_SHARE:
                        history = "undo"
            track.sent[seq] = time.perf_counter()
            track.sending(track.sent[seq])
            await socket.send(message)
            self.run.recorder.counts["states_sent"] += 1
            ticks += 1
            if "values" in message and message["commit"]:
                if history is None and self.random.random() < THINK_SHARE:
                    await self.think(track)  # looking at the result: nothing is sent, the gap clock stops
                    ticks, tick_zero = 0, time.perf_counter()
                gesture = self.gesture(values, time.perf_counter())
            await asyncio.sleep(max(0.0, tick_zero + ticks / self.run.rate - time.perf_counter()))
        track.pause(time.perf_counter())
        return socket

    async def think(self, track: Track) -> None:
        """Pause after a release, as a person looks at the edit; the last state's frame still counts."""
        began = time.perf_counter()
        seconds = self.random.uniform(*THINK_SECONDS)
        while track.sent and time.perf_counter() - began < seconds:  # the released state's frame is still due
            await asyncio.sleep(0.02)
        if track.sent:
            track.pause(time.perf_counter())  # still waiting for a frame: that wait counts
        else:
            track.reference = None  # answered: the clock stops at the last frame
        self.run.recorder.counts["thinks"] += 1
        await asyncio.sleep(max(0.0, began + seconds - time.perf_counter()))

    async def reconnect(self, socket: Socket, sid: str, token: str, track: Track,
                        now: float) -> tuple[Socket, dict[str, float]]:  # fmt: skip
        """Close and reopen the websocket (a tab reload); return it and the slider state it reports."""
        track.pause(now)
        await socket.close()
        track.sent.clear()  # frames of the old socket never come on the new one
        url = f"{self.run.ws_url}/api/sessions/{sid}/ws?token={token}"
        socket, state = await Socket.open(url, self.address, track, self.run.recorder)
        self.run.recorder.counts["reconnects"] += 1
        if state.get("status") != "ready":
            self.run.recorder.error(f"protocol:reconnect_status_{state.get('status')}", json.dumps(state)[:300])
        sliders = state.get("sliders")
        return socket, {str(k): float(v) for k, v in sliders.items()} if isinstance(sliders, dict) else {}

    async def finalize(self, sid: str, token: str) -> None:
        """Finalize and download the result."""
        await self.api.call("finalize", "POST", f"/api/sessions/{sid}/finalize", 200, FINALIZE_TIMEOUT,
                            headers=auth(token))  # fmt: skip
        self.run.recorder.counts["finalizes"] += 1
        response = await self.api.call("result", "GET", f"/api/sessions/{sid}/result", 200, headers=auth(token))
        if not response.content.startswith(b"\xff\xd8"):
            self.run.recorder.error("protocol:result_not_jpeg", response.content[:40].hex())
        self.run.recorder.counts["results"] += 1


def auth(token: str) -> dict[str, str]:
    """Return the session's Authorization header."""
    return {"Authorization": f"Bearer {token}"}


# ---- the phases --------------------------------------------------------------------------------------------


async def usable_photos(url: str, folder: Path, recorder: Recorder) -> dict[str, bytes]:
    """Upload each JPEG of ``folder`` once; return those in which the server finds a face."""
    usable = {}
    for index, path in enumerate(sorted(folder.glob("*.jpg"))):
        api = Api(url, f"10.254.{index // 250}.{index % 250 + 1}", Recorder())
        try:
            data = path.read_bytes()
            response = await api.http.post("/api/sessions", files={"file": (path.name, data, "image/jpeg")},
                                           timeout=UPLOAD_TIMEOUT)  # fmt: skip
            if response.status_code == 201:
                created = response.json()
                if created["faces"]:
                    usable[path.name] = data
                await api.call("delete", "DELETE", f"/api/sessions/{created['session_id']}", 204,
                               headers=auth(created["token"]))  # fmt: skip
            elif response.status_code >= 500:
                recorder.error(f"http_5xx:{response.status_code}:photo_check:{error_code(response)}", path.name)
        except CycleError:
            pass
        finally:
            await api.close()
    return usable


async def solo(run: Run, runs: int) -> list[float]:
    """One user alone uploads and prepares the same photo ``runs`` times; return the prepare times."""
    name = SOLO_PHOTO if SOLO_PHOTO in run.photos else sorted(run.photos)[0]
    user = User(run, seed=-1, address="10.255.0.1")
    times = []
    try:
        for _ in range(runs):
            created = await user.api.upload(name, run.photos[name])
            sid, token = created["session_id"], created["token"]
            socket = await user.open(sid, token, Track())
            try:
                times.append(await user.prepare(socket, sid, token))
            finally:
                await socket.close()
                await user.api.call("delete", "DELETE", f"/api/sessions/{sid}", 204, headers=auth(token))
    finally:
        await user.api.close()
    return times


async def sample(url: str, pid: int | None, began: float, recorder: Recorder, label: str = "") -> None:
    """Record the server's RSS and its /api/stats now."""
    entry: dict[str, Any] = {"t": round(time.perf_counter() - began, 1), "rss_bytes": rss_bytes(pid) if pid else None}
    if label:
        entry["label"] = label
    try:
        async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT) as http, asyncio.timeout(HTTP_TIMEOUT):
            response = await http.get("/api/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            entry["stats"] = response.json() if response.status_code == 200 else {"status": response.status_code}
    except (TimeoutError, httpx.HTTPError, ValueError) as error:
        entry["stats"] = {"error": type(error).__name__}
    recorder.samples.append(entry)


async def sampler(url: str, pid: int | None, began: float, interval: float, stop: asyncio.Event,
                  recorder: Recorder) -> None:  # fmt: skip
    """Sample every ``interval`` seconds until ``stop`` is set."""
    while not stop.is_set():
        await sample(url, pid, began, recorder)
        try:
            async with asyncio.timeout(interval):
                await stop.wait()
        except TimeoutError:
            pass


def start_times(users: int, ramp: float, began: float, rng: random.Random) -> Iterator[float]:
    """Yield each user's start: evenly over the ramp, jittered within its slot."""
    slot = ramp / max(users, 1)
    for index in range(users):
        yield began + slot * (index + rng.random())


async def crowd(run: Run, args: argparse.Namespace, pid: int | None) -> dict[str, Any]:
    """Run the users for the run's duration (plus the drain); return the timing facts."""
    duration = 60.0 * args.minutes
    ramp = min(args.ramp, 0.2 * duration)
    began = time.perf_counter()
    run.deadline = began + duration
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(run.url, pid, began, args.rss_interval, stop, run.recorder))
    rng = random.Random(args.seed)
    users = [User(run, args.seed * 1000 + index, user_address(index)) for index in range(args.users)]
    tasks = [asyncio.create_task(user.loop(start)) for user, start in
             zip(users, start_times(args.users, ramp, began, rng))]  # fmt: skip
    _, pending = await asyncio.wait(tasks, timeout=duration + args.drain)
    now = time.perf_counter()
    for user in users:
        if user.waiting_since is not None:
            run.recorder.prepare_censored.append(now - user.waiting_since)
    for task in pending:
        task.cancel()
    run.recorder.counts["cut_off_users"] += len(pending)
    if pending:
        await asyncio.wait(pending, timeout=60)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            run.recorder.error(f"client_bug:{type(task.exception()).__name__}", repr(task.exception()))
    stop.set()
    async with asyncio.timeout(2 * HTTP_TIMEOUT):
        await sampling
    await sample(run.url, pid, began, run.recorder, "end")
    return {"duration_s": duration, "ramp_s": ramp, "elapsed_s": round(time.perf_counter() - began, 1)}


# ---- the report ----------------------------------------------------------------------------------------------


def rss_summary(samples: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Return the RSS after warm-up (the sample nearest 20 % of the run), at the end, the peak and the growth."""
    with_rss = [entry for entry in samples if entry.get("rss_bytes")]
    if not with_rss:
        return {"warm_bytes": None, "end_bytes": None, "peak_bytes": None, "growth": None}
    warm = min(with_rss, key=lambda entry: abs(entry["t"] - 0.2 * duration))
    end = with_rss[-1]
    growth = (end["rss_bytes"] - warm["rss_bytes"]) / warm["rss_bytes"]
    return {"warm_t": warm["t"], "warm_bytes": warm["rss_bytes"], "end_t": end["t"], "end_bytes": end["rss_bytes"],
            "peak_bytes": max(entry["rss_bytes"] for entry in with_rss), "growth": round(growth, 4)}  # fmt: skip


def build_report(args: argparse.Namespace, recorder: Recorder, solo_times: list[float], timing: dict[str, Any],
                 config: dict[str, Any], photos: int, photos_checked: int) -> dict[str, Any]:  # fmt: skip
    """Gather the measurements and the verdicts into one JSON-ready dict."""
    solo_s = statistics.median(solo_times) if solo_times else None
    waits = recorder.prepare_waits + recorder.prepare_censored
    wait_p95 = percentile(waits, 0.95)
    run_p95 = percentile(recorder.prepare_runs, 0.95)
    gaps = recorder.session_gaps
    rss = rss_summary(recorder.samples, timing["duration_s"])
    error_total = sum(recorder.errors.values())
    mean_cycle = (solo_s or 0.0) + statistics.mean(args.edit_seconds) + statistics.mean(PAUSE_SECONDS)
    ratio = wait_p95 / solo_s if wait_p95 is not None and solo_s else None
    verdicts = {
        "errors": {"pass": error_total <= MAX_ERRORS, "value": error_total, "bound": MAX_ERRORS},
        "rss_growth": {"pass": rss["growth"] is not None and rss["growth"] <= MAX_RSS_GROWTH,
                       "value": rss["growth"], "bound": MAX_RSS_GROWTH},
        "prepare_wait_p95_over_solo": {"pass": ratio is not None and ratio <= MAX_PREPARE_RATIO,
                                       "value": rounded(ratio), "bound": MAX_PREPARE_RATIO},
        "max_preview_gap_s": {"pass": bool(gaps) and max(gaps) <= MAX_PREVIEW_GAP_S,
                              "value": rounded(max(gaps) if gaps else None), "bound": MAX_PREVIEW_GAP_S},
    }  # fmt: skip
    generator = config.get("generator", {})
    return {
        "users": args.users, "minutes": args.minutes, "rate": args.rate, "seed": args.seed,
        "generator": generator.get("source", args.generator), "device": generator.get("device", args.device),
        "finetune": config.get("finetune"), "finetune_steps": args.finetune_steps or "server default",
        "photos_usable": photos, "photos_checked": photos_checked, **timing,
        "errors": dict(recorder.errors.most_common()), "error_examples": recorder.error_examples,
        "counts": dict(sorted(recorder.counts.items())),
        "preview_latency_s": {"n": len(recorder.latencies), "p50": rounded(percentile(recorder.latencies, 0.5)),
                              "p95": rounded(percentile(recorder.latencies, 0.95))},
        "solo_prepare_s": {"median": rounded(solo_s), "runs": [round(value, 3) for value in solo_times]},
        "offered_prepare_load": rounded(args.users * solo_s / mean_cycle if solo_s else None, 2),
        "prepare_wait_s": {"n": len(recorder.prepare_waits), "still_waiting_at_stop": len(recorder.prepare_censored),
                           "p50": rounded(percentile(waits, 0.5)), "p95": rounded(wait_p95),
                           "max": rounded(max(waits) if waits else None), "p95_over_solo": rounded(ratio),
                           "max_queue_place": max(recorder.queue_places, default=0)},
        "prepare_run_s": {"p50": rounded(percentile(recorder.prepare_runs, 0.5)), "p95": rounded(run_p95),
                          "p95_over_solo": rounded(run_p95 / solo_s if run_p95 is not None and solo_s else None)},
        "preview_gap_s": {"sessions": len(gaps), "p50": rounded(percentile(gaps, 0.5)),
                          "p95": rounded(percentile(gaps, 0.95)), "max": rounded(max(gaps) if gaps else None),
                          "sessions_over_bound": sum(gap > MAX_PREVIEW_GAP_S for gap in gaps)},
        "rss": rss,
        "samples": recorder.samples,
        "verdicts": verdicts,
    }  # fmt: skip


def mib(value: int | None) -> str:
    """Format bytes as MiB."""
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def print_report(report: dict[str, Any]) -> None:
    """Print the human-readable summary and one PASS / FAIL line per bound."""
    print(f"\nsoak: {report['users']} users × {report['minutes']} min (ramp {report['ramp_s']:.0f} s, ran "
          f"{report['elapsed_s']} s) on {report['generator']} / {report['device']}, finetune {report['finetune']} "
          f"{report['finetune_steps']} steps; {report['photos_usable']} of {report['photos_checked']} photos usable")
    counts = report["counts"]
    print("counts: " + ", ".join(f"{key} {value}" for key, value in counts.items()))
    errors = report["errors"]
    print("errors: " + (", ".join(f"{kind} ×{count}" for kind, count in errors.items()) if errors else "none"))
    for kind, example in report["error_examples"].items():
        print(f"  {kind}: {example}")
    latency = report["preview_latency_s"]
    print(f"preview latency: p50 {ms(latency['p50'])}, p95 {ms(latency['p95'])} ({latency['n']} frames)")
    solo_s, wait = report["solo_prepare_s"], report["prepare_wait_s"]
    print(f"solo prepare: {secs(solo_s['median'])} (runs {', '.join(secs(value) for value in solo_s['runs'])}); "
          f"offered prepare load ≈ {report['offered_prepare_load']}")
    print(f"prepare wait: p50 {secs(wait['p50'])}, p95 {secs(wait['p95'])}, max {secs(wait['max'])} "
          f"({wait['n']} prepares, {wait['still_waiting_at_stop']} still waiting at the stop; "
          f"largest queue place heard {wait['max_queue_place']}); p95 / solo = {wait['p95_over_solo']}")
    run = report["prepare_run_s"]
    print(f"prepare run (out of line → ready, i.e. against the previews only): p50 {secs(run['p50'])}, "
          f"p95 {secs(run['p95'])}; p95 / solo = {run['p95_over_solo']}")
    gap = report["preview_gap_s"]
    print(f"longest preview gap per session while sending: p50 {secs(gap['p50'])}, p95 {secs(gap['p95'])}, "
          f"max {secs(gap['max'])} over {gap['sessions']} sessions ({gap['sessions_over_bound']} over "
          f"{MAX_PREVIEW_GAP_S:g} s)")
    rss = report["rss"]
    growth = "n/a" if rss["growth"] is None else f"{100 * rss['growth']:+.1f} %"
    print(f"server RSS: after warm-up {mib(rss['warm_bytes'])} (t={rss.get('warm_t')} s), end {mib(rss['end_bytes'])} "
          f"(t={rss.get('end_t')} s), peak {mib(rss['peak_bytes'])}; growth {growth}")
    samples = report["samples"]
    shown = [samples[round(i * (len(samples) - 1) / 12)] for i in range(13)] if len(samples) > 13 else samples
    print("RSS over time: " + ", ".join(f"{entry['t']:.0f} s {mib(entry['rss_bytes'])}" for entry in shown))
    verdicts = report["verdicts"]
    lines = [("errors", f"0 errors (got {verdicts['errors']['value']})"),
             ("rss_growth", f"RSS growth after warm-up ≤ {100 * MAX_RSS_GROWTH:.0f} % (got {growth})"),
             ("prepare_wait_p95_over_solo", f"p95 prepare wait ≤ {MAX_PREPARE_RATIO:g} × solo "
              f"(got {secs(wait['p95'])} / {secs(solo_s['median'])} = {wait['p95_over_solo']})"),
             ("max_preview_gap_s", f"no session > {MAX_PREVIEW_GAP_S:g} s without a preview while sending "
              f"(got max {secs(gap['max'])})")]  # fmt: skip
    for key, text in lines:
        print(f"{'PASS' if verdicts[key]['pass'] else 'FAIL'}  {text}")


# ---- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--generator", default="embedded", help='"embedded", a checkpoint path or "random:64"')
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--finetune", help="lowrank, full or none (default: the server's)")
    parser.add_argument("--finetune-steps", type=int, help="pivotal tuning steps (default: the server's)")
    parser.add_argument("--project-steps", type=int, help="steps of the project encoder, when it is the one used")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of JPEGs to upload")
    parser.add_argument("--solo-runs", type=int, default=3, help="prepares of the solo measurement")
    parser.add_argument("--ramp", type=float, default=60.0,
                        help="users start over this many seconds (at most 20 %% of the run)")
    parser.add_argument("--rate", type=float, default=15.0, help="slider states per second while dragging")
    parser.add_argument("--edit-seconds", type=float, nargs=2, default=list(EDIT_SECONDS), metavar=("LOW", "HIGH"),
                        help="seconds a user edits one photo: gestures and pauses (default 90 240)")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds users may finish after the end")
    parser.add_argument("--rss-interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.users < 1 or args.minutes <= 0 or args.solo_runs < 1 or args.rate <= 0:
        parser.error("--users, --minutes, --solo-runs and --rate must be positive")
    if not args.photos.is_dir():
        parser.error(f"{args.photos} is not a folder of photos")
    return args


async def soak(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """Run the phases against the server at ``url``; return the report."""
    recorder = Recorder()
    port = int(url.rsplit(":", 1)[1])
    pid = listening_pid(port)
    if pid is None:
        print("warning: the server's process was not found; no RSS samples", file=sys.stderr)
    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT) as http, asyncio.timeout(HTTP_TIMEOUT):
        config = (await http.get("/api/config")).json()
        sliders = sliders_of((await http.get("/api/directions")).json())
    if not sliders:
        raise SystemExit("the server has no sliders")
    checked = len(list(args.photos.glob("*.jpg")))
    photos = await usable_photos(url, args.photos, recorder)
    if not photos:
        raise SystemExit(f"no photo of {args.photos} has a face the server finds")
    print(f"server pid {pid}; {len(photos)} of {checked} photos usable; {len(sliders)} sliders", file=sys.stderr)
    run = Run(url, photos, sliders, recorder, args.rate, (args.edit_seconds[0], args.edit_seconds[1]))
    solo_times = await solo(run, args.solo_runs)
    print(f"solo prepare times: {', '.join(f'{value:.2f} s' for value in solo_times)}", file=sys.stderr)
    solo_counts = Counter(recorder.counts)
    recorder.counts.clear()  # the counts are the crowd's; the solo runs are reported on their own
    recorder.prepare_waits.clear()
    recorder.queue_places.clear()
    recorder.prepare_runs.clear()
    recorder.counts["solo_prepares"] = solo_counts["prepares"]
    print(f"crowd: {args.users} users for {args.minutes} min", file=sys.stderr)
    timing = await crowd(run, args, pid)
    return build_report(args, recorder, solo_times, timing, config, len(photos), checked)


def main(argv: list[str] | None = None) -> int:
    """Start the server, soak it, print the report; return 1 when a bound fails."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        folder = Path(scratch)
        (folder / "data").mkdir()
        log_path = folder / "server.log"
        with live_server.serve(args.generator, args.device, server_env(args, folder / "data"), log_path) as url:
            print(f"fluidsrv serve at {url} (log {log_path})", file=sys.stderr)
            try:
                report = asyncio.run(soak(args, url))
            except BaseException:
                print(f"--- server log (end) ---\n{log_path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
                raise
        if report["errors"]:
            print(f"--- server log (end) ---\n{log_path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return 0 if all(verdict["pass"] for verdict in report["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
