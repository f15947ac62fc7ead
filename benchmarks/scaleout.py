"""The in-process server against ``fluidsrv serve --backend ray`` on this machine, in one run.

Starts a throwaway PostgreSQL and S3 server (``tests/real_servers.py``: ``running_postgres`` / ``running_s3``),
then two ``fluidsrv serve`` subprocesses with the same model settings (``tests.server_support.small_settings``:
the tiny ``random:32`` generator by default, ``--generator embedded`` for the shipped 128² models): the
in-process one (``backend=local``, sessions in files under its data folder) and the ray one (``backend=ray``: a
local Ray cluster, the Serve ingress and the stage deployments, sessions in PostgreSQL + S3). Both servers stay
up for the whole run, and every measurement alternates between them (in-process, ray, in-process, ray, ...), so
machine noise hits both alike. Both compute on ``--threads`` torch threads (default 1: Ray gives each replica that
reserves no CPU OMP_NUM_THREADS=1, and on a small shared machine one thread is also the faster setting).

Measured, per backend:

- **startup**: from starting the process to ``/api/health`` answering (for ray: the cluster, the controller, the
  HTTP proxy and every deployment's replicas);
- **prepare throughput**: ``--sessions`` faces (upload → detect → pick → ready) in two alternating halves, the
  first half back to back, the second all at once; faces per minute of each;
- **first preview**: the first frame of each session (for ray, the preview replica loads the session's models);
- **preview latency** p50 / p95 with 1 session dragging and with all ``--sessions`` dragging at once
  (``--messages`` slider states at ``--rate``/s each; latency = a frame's arrival minus the send time of the
  slider state it shows, as ``benchmarks/preview_latency.py`` measures), pooled over ``--rounds`` rounds; the ray
  overhead is p50 / p95(ray) − p50 / p95(in-process);
- **model loads per session**: ``/api/stats`` ``backend.preview_model_loads`` ÷ sessions (1 when each session
  stays on its replica), with the ingress's timing of the preview handle calls (``preview_call_p50_ms``/p95);
- **storage per session**, after every session committed one edit: for ray the PostgreSQL rows (meta and edit
  records, and the tables' size on disk) and the S3 objects (listed); for in-process the data folder's
  ``sessions`` and ``edits`` databases on disk and the parts they hold.

Prints the JSON report, then a table. ``--smoke``: a tiny run (2 sessions, short drags, one round, 20 w+ steps)
for a test. ``--server-env PYTHONPATH=DIR`` runs both servers on a scratch copy of ``fluidsrv`` in DIR (to measure
a change); ``--ray-env`` sets a variable of the ray server only (a ``RAY_SERVE_*`` knob). Before starting Ray it
waits until no ``raylet`` runs on the machine (another Ray cluster would share the cores); the Ray processes it
started are stopped at the end, also when the run fails or is interrupted.

    .venv/bin/python benchmarks/scaleout.py                        # random:32, 3-5 min on 2 shared cores
    .venv/bin/python benchmarks/scaleout.py --generator embedded   # the shipped 128² models, ~6 min
    .venv/bin/python benchmarks/scaleout.py --smoke                # ~1.5 min
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.preview_latency import drag, emit_report, percentile, prepare_session  # noqa: E402
from fluidsrv.client import AsyncClient, AsyncSession  # noqa: E402
from fluidsrv.settings import Settings  # noqa: E402
from tests.real_servers import S3Server, running_postgres, running_s3  # noqa: E402
from tests.server_support import ADMIN, SMALL_PHOTO, free_port, small_settings  # noqa: E402

DEFAULT_PHOTO = REPO.parent / "shared" / "photos" / SMALL_PHOTO
BACKENDS = ("in-process", "ray")
START_SECONDS = 300.0  # a server that does not answer /api/health by then failed to start
STOP_SECONDS = 60.0
RAYLET_WAIT_SECONDS = 600.0  # how long to wait for another Ray cluster on this machine to go away
RAYLET_POLL_SECONDS = 10.0


# ---- processes ------------------------------------------------------------------------------------------------


def _descendants(root: int) -> dict[int, str]:
    """The live descendants of process ``root``: pid → its start time (field 22 of /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        started[int(entry.name)] = fields[19]
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = started[child]
                stack.append(child)
    return found


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (other work on the shared cores shows here)."""
    return [round(value, 2) for value in os.getloadavg()]


def raylet_running() -> bool:
    """Whether a raylet (any Ray cluster's node manager) runs on this machine."""
    return subprocess.run(["pgrep", "-f", "raylet"], capture_output=True).returncode == 0


def wait_for_no_raylet(timeout: float = RAYLET_WAIT_SECONDS) -> float:
    """Wait until no raylet runs (polling every 10 s); the seconds waited. Raises when one still runs at the end."""
    began = time.monotonic()
    while raylet_running():
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"another Ray cluster has been running on this machine for {timeout:.0f} s")
        print("waiting for another Ray cluster on this machine to stop ...", file=sys.stderr)
        time.sleep(RAYLET_POLL_SECONDS)
    return time.monotonic() - began


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``FLUIDSRV_*`` variables that make ``Settings.from_env`` build exactly ``settings`` (checked)."""
    env: dict[str, str] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if value is None:
            continue
        if isinstance(value, dict):
            text = json.dumps(value)
        elif isinstance(value, tuple):
            text = ",".join(value)
        else:
            text = str(value)
        env[f"FLUIDSRV_{item.name.upper()}"] = text
    if Settings.from_env(env) != settings:
        raise AssertionError("the FLUIDSRV_* variables do not reproduce the settings")
    return env


class Server:
    """One ``fluidsrv serve`` subprocess: started in a session of its own, stopped with everything it started."""

    def __init__(self, label: str, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.label, self.settings, self.log_path = label, settings, log_path
        self.extra_env = dict(extra_env or {})
        self.url = f"http://{settings.host}:{settings.port}"
        self.host = f"{settings.host}:{settings.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0
        self._seen: dict[int, str] = {}  # every descendant seen: stopped at the end, wherever it was reparented

    def start(self) -> None:
        """Start the server; return once /api/health answers (raises with the log's end if it does not)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("FLUIDSRV_")}
        env.update(settings_env(self.settings), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        command = [sys.executable, "-c", "import sys; from fluidsrv.cli import main; sys.exit(main())", "serve"]
        began = time.perf_counter()
        with self.log_path.open("wb") as log:
            # cwd: the server's own folder, not the repository (whose fluidsrv/ would come before a PYTHONPATH)
            self.process = subprocess.Popen(command, env=env, cwd=self.log_path.parent, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while True:
            self._remember_descendants()
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label}: fluidsrv serve exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: fluidsrv serve did not answer in {START_SECONDS:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)
        self.startup_s = time.perf_counter() - began
        self._remember_descendants()

    def _remember_descendants(self) -> None:
        if self.process is not None:
            self._seen.update(_descendants(self.process.pid))

    def log_tail(self, characters: int = 3000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError as error:
            return f"(no log: {error})"

    def stop(self) -> None:
        """Interrupt the server (Ctrl-C: the ray one deletes its app and shuts its cluster down), then kill
        whatever of its process tree is left."""
        if self.process is None:
            return
        self._remember_descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_SECONDS)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        for pid, started in self._seen.items():
            while _start_time(pid) == started:  # still the same process (not a reused pid)
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.1)
        self.process = None


# ---- measurements ---------------------------------------------------------------------------------------------


class Backend:
    """One running server, its sessions and what was measured of it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.label = server.label
        self.client = AsyncClient(server.url, timeout=600)  # opened on the loop of the measurements
        self.sessions: list[AsyncSession] = []
        self.slider = ""
        self.prepare: dict[str, list[float]] = {}  # mode → [faces, seconds] summed over rounds
        self.first_preview_ms: list[float] = []
        self.drags: dict[int, list[tuple[list[float], int, float]]] = {}  # clients → [(latencies, frames, s)]
        self.stats: dict[str, Any] = {}
        self.storage: dict[str, Any] = {}

    async def prepare_faces(self, photo: bytes, count: int, concurrent: bool) -> None:
        """Prepare ``count`` more faces, back to back or all at once; remember their wall time."""
        if not self.slider:
            self.slider = (await self.client.directions())[0].name
        began = time.perf_counter()
        if concurrent:
            made = list(await asyncio.gather(*(prepare_session(self.client, photo) for _ in range(count))))
        else:
            made = [await prepare_session(self.client, photo) for _ in range(count)]
        seconds = time.perf_counter() - began
        self.sessions += made
        totals = self.prepare.setdefault("concurrent" if concurrent else "back_to_back", [0.0, 0.0])
        totals[0] += count
        totals[1] += seconds

    async def warm_up(self) -> None:
        """Show one preview of every session not yet previewed (its first frame: the model load, on ray)."""
        for session in self.sessions[len(self.first_preview_ms):]:
            latencies, _, _ = await drag(session, self.slider, 1, 1000.0)
            self.first_preview_ms.append(1000 * latencies[0])

    async def drag_round(self, clients: int, messages: int, rate: float) -> None:
        """``clients`` sessions drag a slider at once; remember the pooled latencies."""
        began = time.perf_counter()
        results = await asyncio.gather(*(drag(session, self.slider, messages, rate)
                                         for session in self.sessions[:clients]))
        self.drags.setdefault(clients, []).append(([value for result in results for value in result[0]],
                                                   sum(result[1] for result in results),
                                                   time.perf_counter() - began))

    async def commit_edits(self) -> None:
        """Commit one slider state on every session, so that storage holds an edit record of each."""
        for session in self.sessions:
            async with session.connect() as live:
                async for _ in live.sliders([{self.slider: 1.5}], commit=True):
                    pass

    async def read_stats(self) -> None:
        """Keep the server's /api/stats."""
        async with httpx.AsyncClient(base_url=self.server.url, timeout=60) as http:
            response = await http.get("/api/stats", headers=ADMIN)
            response.raise_for_status()
            self.stats = response.json()

    def report(self) -> dict[str, Any]:
        """This backend's figures."""
        rows = {}
        for clients, rounds in sorted(self.drags.items()):
            latencies = [value for row in rounds for value in row[0]]
            rows[str(clients)] = {
                "sessions": clients, "rounds": len(rounds), "frames": sum(row[1] for row in rounds),
                "frames_per_second": round(sum(row[1] for row in rounds) / sum(row[2] for row in rounds), 1),
                "p50_ms": round(1000 * statistics.median(latencies), 1),
                "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
                "per_round_p95_ms": [round(1000 * percentile(row[0], 0.95), 1) for row in rounds],
            }
        prepare = {mode: {"faces": int(faces), "seconds": round(seconds, 2),
                          "faces_per_minute": round(60 * faces / seconds, 1)}
                   for mode, (faces, seconds) in self.prepare.items()}
        backend = dict(self.stats.get("backend", {}))
        loads = backend.get("preview_model_loads")
        return {
            "backend": self.label, "startup_s": round(self.server.startup_s, 2), "prepare": prepare,
            "first_preview_ms": {"median": round(statistics.median(self.first_preview_ms), 1),
                                 "max": round(max(self.first_preview_ms), 1)} if self.first_preview_ms else {},
            "preview": rows,
            "model_loads_per_session": round(loads / len(self.sessions), 2) if loads is not None else None,
            "stats_backend": backend, "stats": self.stats,
            "storage": self.storage,
        }


def local_storage_figures(data_dir: Path, sessions: int) -> dict[str, Any]:
    """The in-process server's data folder: its session and edit databases on disk, and the parts they hold."""
    from fluidsrv.backends.local_storage import LocalStorage

    def size(folder: Path) -> int:
        return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())

    on_disk = {name: size(data_dir / name) for name in ("sessions", "edits") if (data_dir / name).is_dir()}
    storage = LocalStorage(data_dir)
    try:
        ids = [session_id for session_id, _ in storage.scan()]
        parts = {"meta": 0, "arrays": 0, "tensors": 0}
        for session_id in ids:
            stored = storage.read(session_id)
            if stored is not None:
                for name in parts:
                    parts[name] += len(getattr(stored, name))
        edits = sum(len(storage.read_edit(session_id) or b"") for session_id in storage.edit_owners())
    finally:
        storage.close()
    total = sum(on_disk.values())
    return {"sessions": sessions, "stored_sessions": len(ids), "on_disk_bytes": on_disk,
            "payload_bytes": {**parts, "edit_records": edits},
            "bytes_per_session": round(total / max(sessions, 1)),
            "payload_bytes_per_session": round((sum(parts.values()) + edits) / max(sessions, 1))}


def cloud_storage_figures(database_url: str, s3: S3Server, bucket: str, sessions: int) -> dict[str, Any]:
    """The ray server's storage: its PostgreSQL rows (and tables on disk) and its S3 objects."""
    import psycopg

    from fluidsrv.backends.cloud_storage import EDITS_TABLE, SESSIONS_TABLE

    with psycopg.connect(database_url) as conn:
        rows, meta, parts = conn.execute(f"SELECT count(*), COALESCE(sum(octet_length(meta)), 0), "
                                         f"COALESCE(sum(parts_bytes), 0) FROM {SESSIONS_TABLE}").fetchone() or (0, 0, 0)
        edit_rows, edits = conn.execute(f"SELECT count(*), COALESCE(sum(octet_length(record)), 0) "
                                        f"FROM {EDITS_TABLE}").fetchone() or (0, 0)
        tables = conn.execute(f"SELECT pg_total_relation_size('{SESSIONS_TABLE}'), "
                              f"pg_total_relation_size('{EDITS_TABLE}')").fetchone() or (0, 0)
    objects, object_bytes = 0, 0
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects += 1
            object_bytes += int(item["Size"])
    payload = int(meta) + int(edits) + object_bytes
    return {"sessions": sessions, "stored_sessions": int(rows), "edit_rows": int(edit_rows),
            "postgres_bytes": {"meta": int(meta), "edit_records": int(edits),
                               "tables_on_disk": int(tables[0]) + int(tables[1])},
            "s3": {"objects": objects, "bytes": object_bytes, "parts_bytes_in_rows": int(parts)},
            "bytes_per_session": round(payload / max(sessions, 1)),
            "payload_bytes_per_session": round(payload / max(sessions, 1))}


# ---- the run --------------------------------------------------------------------------------------------------


def env_pair(text: str) -> tuple[str, str]:
    """KEY=VALUE as (KEY, VALUE)."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="random:32",
                        help="the model of both servers: random:32 (tiny, default) or embedded (the shipped 128²)")
    parser.add_argument("--sessions", type=int, default=8, help="sessions per backend (prepared, then dragging)")
    parser.add_argument("--messages", type=int, default=100, help="slider states per drag")
    parser.add_argument("--rate", type=float, default=30.0, help="slider states per second per session")
    parser.add_argument("--rounds", type=int, default=2, help="drag rounds per backend, alternating")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        type=lambda text: [part for part in text.split(",") if part],
                        help="comma list of in-process, ray (default both)")
    parser.add_argument("--wplus-steps", type=int,
                        help="the project encoder's w+ steps (default: small_settings' own, 200); fewer make each "
                             "prepare shorter and leave previews as they are")
    parser.add_argument("--device", default="cpu", help='both servers\' device: "cpu" (default) or "cuda"')
    parser.add_argument("--ray-config", type=Path,
                        help="the ray server's deployments file (FLUIDSRV_RAY_CONFIG), e.g. with preview num_gpus")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of both servers (default 1: what Ray gives each replica that reserves no "
                             "CPU, so the in-process server computes alike); 0 leaves torch's default (all cores)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", type=env_pair,
                        help="an environment variable of both servers (repeatable), e.g. PYTHONPATH=/tmp/scratch to "
                             "run a scratch copy of fluidsrv")
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE", type=env_pair,
                        help="an environment variable of the ray server only (repeatable), e.g. a RAY_* knob")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run: 2 sessions, 15-state drags, one round, 20 w+ steps")
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    parser.add_argument("--logs", type=Path, help="keep the servers' logs in this folder (LABEL.log)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sessions, args.messages, args.rounds = 2, 15, 1
        args.wplus_steps = 20 if args.wplus_steps is None else args.wplus_steps
    if not set(args.backends) <= set(BACKENDS) or not args.backends:
        parser.error(f"--backends takes a comma list of {', '.join(BACKENDS)}")
    if args.sessions < 1 or args.messages < 1 or args.rounds < 1 or (args.wplus_steps or 0) < 0 or args.threads < 0:
        parser.error("--sessions, --messages and --rounds must be at least 1, --wplus-steps and --threads at least 0")
    return args


def backend_settings(label: str, args: argparse.Namespace, folder: Path, database_url: str, s3: S3Server | None,
                     bucket: str) -> Settings:
    """The settings of one backend's server: small_settings, the chosen generator, its own port and folder."""
    common: dict[str, Any] = {"generator": args.generator, "port": free_port(), "device": args.device,
                              "max_sessions": max(64, 4 * args.sessions)}
    if args.wplus_steps is not None:  # fewer projection steps: a shorter prepare (previews do not change)
        options = {stage: dict(values) for stage, values in small_settings(folder).plugin_options.items()}
        options.setdefault("encoder.project", {})["wplus_steps"] = args.wplus_steps
        common["plugin_options"] = options
    if label == "in-process":
        return small_settings(folder / "data", **common)
    assert s3 is not None
    return small_settings(folder / "data", **common, backend="ray", ray_config=args.ray_config,
                          database_url=database_url,
                          s3_endpoint=s3.endpoint, s3_bucket=bucket, s3_access_key=s3.access_key,
                          s3_secret_key=s3.secret_key)


async def measure(args: argparse.Namespace, backends: list[Backend]) -> None:
    """Prepare, warm up and drag on every backend, alternating between them."""
    photo = args.photo.read_bytes()
    halves = [(args.sessions - args.sessions // 2, False), (args.sessions // 2, True)]
    for count, concurrent in halves:
        for backend in backends:
            if count:
                began = time.perf_counter()
                await backend.prepare_faces(photo, count, concurrent)
                print(f"{backend.label}: {count} faces {'at once' if concurrent else 'back to back'} in "
                      f"{time.perf_counter() - began:.1f} s", file=sys.stderr)
    for backend in backends:
        await backend.warm_up()
    for round_index in range(args.rounds):
        for clients in sorted({1, args.sessions}):
            for backend in backends:
                began = time.perf_counter()
                await backend.drag_round(clients, args.messages, args.rate)
                print(f"round {round_index + 1}/{args.rounds} {backend.label}, {clients} dragging: "
                      f"{time.perf_counter() - began:.1f} s", file=sys.stderr)
    for backend in backends:
        await backend.commit_edits()
        await backend.read_stats()
        await backend.client.aclose()


def overheads(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ray − in-process of the preview percentiles, per number of dragging sessions."""
    if set(reports) != set(BACKENDS):
        return {}
    local, ray = reports["in-process"]["preview"], reports["ray"]["preview"]
    return {key: {"p50_ms": round(ray[key]["p50_ms"] - local[key]["p50_ms"], 1),
                  "p95_ms": round(ray[key]["p95_ms"] - local[key]["p95_ms"], 1)} for key in local if key in ray}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the storage and both servers, measure, stop everything; the report."""
    began = time.perf_counter()
    load_before = load_average()
    waited = 0.0
    with tempfile.TemporaryDirectory(prefix="fluidsrv-scaleout-") as scratch, contextlib.ExitStack() as stack:
        database_url, s3, bucket = "", None, ""
        if "ray" in args.backends:
            database_url = stack.enter_context(running_postgres())
            s3 = stack.enter_context(running_s3())
            bucket = s3.new_bucket()
        backends: list[Backend] = []
        for label in args.backends:
            folder = Path(scratch) / label
            folder.mkdir()
            settings = backend_settings(label, args, folder, database_url, s3, bucket)
            if label == "ray":
                waited = wait_for_no_raylet()
            extra = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
            extra |= dict(args.server_env) | (dict(args.ray_env) if label == "ray" else {})
            server = Server(label, settings, folder / "server.log", extra)
            stack.callback(server.stop)
            server.start()
            print(f"{label}: serving at {server.url} after {server.startup_s:.1f} s", file=sys.stderr)
            backends.append(Backend(server))
        try:
            asyncio.run(measure(args, backends))
        except BaseException:
            for backend in backends:
                print(f"--- {backend.label} server log (end) ---\n{backend.server.log_tail()}", file=sys.stderr)
            raise
        for backend in backends:
            backend.server.stop()
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(backend.server.log_path, args.logs / f"{backend.label}.log")
            if backend.label == "in-process":
                backend.storage = local_storage_figures(backend.server.settings.data_dir, len(backend.sessions))
            else:
                assert s3 is not None
                backend.storage = cloud_storage_figures(database_url, s3, bucket, len(backend.sessions))
    reports = {backend.label: backend.report() for backend in backends}
    return {
        "generator": args.generator, "sessions": args.sessions, "messages_per_drag": args.messages,
        "rate_per_session": args.rate, "rounds": args.rounds, "wplus_steps": args.wplus_steps,
        "threads": args.threads, "server_env": dict(args.server_env), "ray_env": dict(args.ray_env),
        "photo": str(args.photo), "cpus": os.cpu_count(), "load_average": {"before": load_before,
                                                                          "after": load_average()},
        "waited_for_other_ray_s": round(waited, 1), "seconds": round(time.perf_counter() - began, 1),
        "backends": reports, "ray_overhead": overheads(reports),
    }


def print_table(report: dict[str, Any]) -> None:
    """The report as a table: one row per figure, a column per backend, and ray − in-process."""
    reports = report["backends"]
    labels = [label for label in BACKENDS if label in reports]

    def row(name: str, values: list[Any], delta: Any = "") -> None:
        print(f"{name:<40}" + "".join(f"{'' if value is None else value:>14}" for value in values) + f"{delta:>16}")

    def diff(values: list[Any]) -> Any:
        if len(values) == 2 and all(isinstance(value, (int, float)) for value in values):
            return round(values[1] - values[0], 1)
        return ""

    def figure(name: str, get: Any) -> None:
        values = []
        for label in labels:
            try:
                values.append(get(reports[label]))
            except (KeyError, TypeError, ValueError):
                values.append(None)
        row(name, values, diff(values))

    print(f"generator {report['generator']}, {report['threads'] or 'default'} torch thread(s), "
          f"{report['sessions']} sessions per backend, drags of "
          f"{report['messages_per_drag']} states at {report['rate_per_session']:g}/s, {report['rounds']} round(s), "
          f"{report['cpus']} CPUs, load average {report['load_average']['before'][0]} before, "
          f"{report['load_average']['after'][0]} after\n")
    row("figure", labels, "ray − in-proc" if len(labels) == 2 else "")
    figure("startup s", lambda r: r["startup_s"])
    for mode in ("back_to_back", "concurrent"):
        figure(f"prepare faces/min ({mode.replace('_', ' ')})", lambda r, m=mode: r["prepare"][m]["faces_per_minute"])
    figure("first preview ms (median, cold)", lambda r: r["first_preview_ms"]["median"])
    for key in sorted(reports[labels[0]]["preview"], key=int):
        for stat in ("p50_ms", "p95_ms"):
            figure(f"preview {stat[:3]} ms, {key} session{'' if key == '1' else 's'}",
                   lambda r, k=key, s=stat: r["preview"][k][s])
        figure(f"frames/s, {key} session{'' if key == '1' else 's'}",
               lambda r, k=key: r["preview"][k]["frames_per_second"])
    figure("preview handle call p50 ms (ingress)", lambda r: r["stats_backend"]["preview_call_p50_ms"])
    figure("preview handle call p95 ms (ingress)", lambda r: r["stats_backend"]["preview_call_p95_ms"])
    figure("model loads per session", lambda r: r["model_loads_per_session"])
    figure("storage bytes per session", lambda r: r["storage"]["bytes_per_session"])
    figure("  payload bytes per session", lambda r: r["storage"]["payload_bytes_per_session"])
    print(f"\n{report['seconds']} s in all")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print the JSON report and the table; return the report."""
    args = parse_args(argv)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # so that the servers and storage are stopped

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        report = run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    emit_report(report, args.json, print_table)
    return report


if __name__ == "__main__":
    main()
