"""Slider → preview-frame latency and frame rate of the real server, alone and while another session finalizes.

Starts ``fluidsrv serve`` in a subprocess (real uvicorn on loopback, ``benchmarks/live_server.py``), prepares
``--sessions`` sessions (default 8) plus one more from a photo, then runs the scenarios (``--scenarios``):

- ``finalize``: each of the sessions drags a slider over its own websocket (``--messages`` slider states at
  ``--rate`` per second) while the extra session runs ``POST /finalize`` back to back until the drag ends (the drag
  starts once the first finalize is running). Reported: the drag's p50 / p95 latency and frames/s, how many
  finalizes ran, their mean time and the share of the drag during which one was running.
- ``clients``: the rows for 1, 8 and 32 concurrent clients (``--clients``), spread over the sessions, nothing else
  running.

Latency is measured per received frame: arrival time minus the send time of the slider state it shows (frames of
superseded states are never sent, so coalescing is part of the figure).

``--compare PATH[,PATH...]`` (or ``--before PATH``) runs the same in one invocation against the server of this
tree ("after") and of each PATH ("before": another checkout, e.g. ``git worktree add /tmp/fluidsrv-before
COMMIT``), every server on its own port and data folder, all started and prepared first, then in alternating rounds
(this tree, PATH, this tree, PATH, ... ``--rounds`` times) so machine noise hits both alike; latencies and frames
are pooled over the rounds. The table gives each tree and the ratios after / before of p50, p95 and frames/s.
Each server imports ``fluidsrv`` and ``fluidsrv_plugins`` from its own checkout (checked from its log).

``--identity-meter on-off`` runs this tree twice in the same way: one server with the live identity meter on
(``FLUIDSRV_IDENTITY_METER=dlib``, "on") and one with it off ("off"); the ratios are on / off (the goal: p50 and
p95 within 10 %). Each row also counts the identity readings the clients received. ``--identity-meter on`` or
``off`` sets it for every server.

    .venv/bin/python benchmarks/preview_latency.py                      # both scenarios, this tree
    .venv/bin/python benchmarks/preview_latency.py --scenarios clients --clients 1,8 --identity-meter on-off
    .venv/bin/python benchmarks/preview_latency.py --scenarios finalize --before /tmp/fluidsrv-before --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import live_server  # noqa: E402
from fluidsrv.client import ApiError, AsyncClient, AsyncSession, ConflictError, Event, Progress  # noqa: E402

DEFAULT_PHOTO = REPO.parent / "shared" / "photos" / "deepface_img12.jpg"
SCENARIOS = ("finalize", "clients")
BENCH_ADMIN_TOKEN = "bench-admin"  # the benchmark servers' admin token (for /api/stats)


def emit_report(report: dict[str, Any], json_path: Path | None, table: Callable[[dict[str, Any]], None]) -> None:
    """Print the report as JSON (and write it to ``json_path``), then as a table."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
    print()
    table(report)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def server_env(args: argparse.Namespace, data_dir: Path, meter: str) -> dict[str, str]:
    return {
        **os.environ,
        "FLUIDSRV_GENERATOR": args.generator,
        "FLUIDSRV_DEVICE": args.device,
        "FLUIDSRV_DATA_DIR": str(data_dir),
        "FLUIDSRV_MAX_SESSIONS": "256",
        "FLUIDSRV_ADMIN_TOKEN": BENCH_ADMIN_TOKEN,  # /api/stats needs it
        "FLUIDSRV_FINETUNE": args.finetune,
        "FLUIDSRV_FINETUNE_STEPS": str(args.finetune_steps),
        "FLUIDSRV_PLUGIN_OPTIONS": json.dumps({"encoder.project": {"steps": args.project_steps}}),
        **({"FLUIDSRV_IDENTITY_METER": "dlib" if meter == "on" else "off"} if meter else {}),
    }


def describe_checkout(root: Path) -> dict[str, Any]:
    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *command], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"path": str(root), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}  # fmt: skip


async def prepare_session(client: AsyncClient, photo: bytes) -> AsyncSession:
    """Upload the photo and prepare its face 0 (fluidsrv.client)."""
    session = await client.create_session(photo, "photo.jpg")
    await session.prepare(0)
    return session


async def drag(session: AsyncSession, slider: str, messages: int,
               rate: float) -> tuple[list[float], int, int]:  # fmt: skip
    """Send ``messages`` slider states at ``rate``/s; return frame latencies (s), the frame count and how many
    identity readings came meanwhile."""
    readings = 0

    def count_readings(message: object) -> None:
        nonlocal readings
        readings += isinstance(message, Event) and message.type == "identity"

    states = [{slider: 3.0 * ((seq % 40) / 20.0 - 1.0)} for seq in range(messages)]
    async with session.connect() as live:
        latencies = [frame.latency async for frame in live.sliders(states, rate=rate, on_event=count_readings)
                     if frame.latency is not None]  # fmt: skip
    return latencies, len(latencies), readings


async def drag_all(sessions: list[AsyncSession], clients: int, slider: str,
                   args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """``clients`` concurrent drags spread over ``sessions``: the pooled latencies, frames and wall time."""
    started = time.perf_counter()
    results = await asyncio.gather(
        *(drag(sessions[i % len(sessions)], slider, args.messages, args.rate) for i in range(clients))
    )
    return {"latencies": [value for result in results for value in result[0]],
            "frames": sum(result[1] for result in results), "seconds": time.perf_counter() - started,
            "identity_readings": sum(result[2] for result in results),
            "window": (started, time.perf_counter())}  # fmt: skip


async def drag_while_finalizing(sessions: list[AsyncSession], finalizer: AsyncSession, slider: str,
                                args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Every session drags while ``finalizer`` finalizes back to back; the drag starts once a finalize runs."""
    stop, running = asyncio.Event(), asyncio.Event()
    intervals: list[tuple[float, float]] = []
    refused: list[int] = []

    def on_progress(progress: Progress) -> None:
        if progress.stage == "finalize":
            running.set()

    async def finalize_loop() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                await finalizer.finalize()
            except ConflictError as error:  # still busy with the last one: try again at once
                refused.append(error.status)
                await asyncio.sleep(0.01)
                continue
            intervals.append((began, time.perf_counter()))

    async with finalizer.connect() as live:
        watcher = asyncio.create_task(live.follow_progress(on_progress))
        finalizing = asyncio.create_task(finalize_loop())
        try:
            await asyncio.wait_for(running.wait(), timeout=300)
            row = await drag_all(sessions, len(sessions), slider, args)
            stop.set()
            await finalizing
        finally:
            stop.set()
            finalizing.cancel()
            watcher.cancel()
    start, end = row.pop("window")
    overlap = sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
    row.update(finalizes=len(intervals), finalize_mean_s=statistics.mean(b - a for a, b in intervals) if intervals
               else None, finalize_busy=overlap / max(end - start, 1e-9), finalize_refused=len(refused))  # fmt: skip
    return row


class Tree:
    """One checkout's running server, its prepared sessions and its raw measurements per scenario row."""

    def __init__(self, label: str, root: Path, url: str, meter: str = "") -> None:
        self.label, self.root, self.url, self.meter = label, root, url, meter
        self.checkout = describe_checkout(root)
        self.client: AsyncClient | None = None  # open while measure() runs (it is bound to that event loop)
        self.sessions: list[AsyncSession] = []
        self.finalizer: AsyncSession | None = None
        self.slider = ""
        self.config: dict[str, Any] = {}
        self.prepare_s = 0.0
        self.raw: dict[str, list[dict[str, Any]]] = {}

    async def prepare(self, args: argparse.Namespace, photo: bytes) -> None:
        self.client = client = AsyncClient(self.url, timeout=600)
        self.config = await client.config()
        self.slider = (await client.directions())[0].name
        began = time.perf_counter()
        self.sessions = [await prepare_session(client, photo) for _ in range(args.sessions)]
        self.finalizer = finalizer = await prepare_session(client, photo)
        self.prepare_s = (time.perf_counter() - began) / (args.sessions + 1)
        async with finalizer.connect() as live:  # a committed edit, so every finalize renders a real one
            await live.preview({self.slider: 2.0}, commit=True)

    async def run_round(self, args: argparse.Namespace) -> None:
        assert self.finalizer is not None, "prepare() first"
        if "finalize" in args.scenarios:
            row = await drag_while_finalizing(self.sessions, self.finalizer, self.slider, args)
            self.raw.setdefault(f"{args.sessions} dragging + finalize", []).append(row)
        if "clients" in args.scenarios:
            for clients in args.clients:
                row = await drag_all(self.sessions, clients, self.slider, args)
                row.pop("window")
                self.raw.setdefault(f"{clients} client{'' if clients == 1 else 's'}", []).append(row)

    async def executor_stats(self) -> dict[str, Any]:
        async with AsyncClient(self.url, admin_token=BENCH_ADMIN_TOKEN, timeout=60) as client:
            try:
                return dict((await client.stats()).get("executor", {}))
            except ApiError:
                return {}

    def report(self) -> dict[str, Any]:
        rows = []
        for name, rounds in self.raw.items():
            latencies = [value for row in rounds for value in row["latencies"]]
            frames, seconds = sum(row["frames"] for row in rounds), sum(row["seconds"] for row in rounds)
            entry: dict[str, Any] = {
                "row": name, "rounds": len(rounds), "frames": frames,
                "identity_readings": sum(row.get("identity_readings", 0) for row in rounds),
                "frames_per_second": round(frames / seconds, 2),
                "latency_p50_ms": round(1000 * statistics.median(latencies), 1),
                "latency_p95_ms": round(1000 * percentile(latencies, 0.95), 1),
                "per_round": [{"frames_per_second": round(row["frames"] / row["seconds"], 2),
                               "latency_p50_ms": round(1000 * statistics.median(row["latencies"]), 1),
                               "latency_p95_ms": round(1000 * percentile(row["latencies"], 0.95), 1)}
                              for row in rounds],
            }  # fmt: skip
            if "finalizes" in rounds[0]:
                means = [row["finalize_mean_s"] for row in rounds if row["finalize_mean_s"] is not None]
                entry.update(finalizes=sum(row["finalizes"] for row in rounds),
                             finalize_mean_s=round(statistics.mean(means), 3) if means else None,
                             finalize_busy=round(statistics.mean(row["finalize_busy"] for row in rounds), 3),
                             finalize_refused=sum(row["finalize_refused"] for row in rounds))  # fmt: skip
            rows.append(entry)
        generator = self.config.get("generator", {})
        return {"label": self.label, "checkout": self.checkout, "url": self.url, "identity_meter": self.meter or None,
                "generator": generator, "device": generator.get("device"),
                "previewer": self.config.get("active", {}).get("previewer"), "slider": self.slider,
                "prepare_s_per_session": round(self.prepare_s, 2), "rows": rows}  # fmt: skip


def ratios(after: dict[str, Any], before: dict[str, Any]) -> list[dict[str, Any]]:
    """After / before of p50, p95 and frames/s, per row both have."""
    previous = {row["row"]: row for row in before["rows"]}
    out = []
    for row in after["rows"]:
        old = previous.get(row["row"])
        if old is None:
            continue
        out.append({"row": row["row"], **{
            key: round(row[key] / old[key], 3) if old[key] else None
            for key in ("latency_p50_ms", "latency_p95_ms", "frames_per_second")
        }})
    return out


def print_table(report: dict[str, Any]) -> None:
    trees = report["trees"]
    for tree in trees:
        commit = tree["checkout"]["commit"][:9] + ("+dirty" if tree["checkout"]["dirty"] else "")
        print(f"{tree['label']}: {tree['checkout']['path']} @ {commit}; previewer {tree['previewer']} on "
              f"{tree['device']}, generator {tree['generator'].get('source')}; "
              f"prepare {tree['prepare_s_per_session']} s/session")
    print(f"\n{'row':<28} {'tree':<8} {'frames':>7} {'frames/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'identity':>8}  "
          "finalizes")
    names = [row["row"] for row in trees[0]["rows"]]
    for name in names:
        for tree in trees:
            row = next((row for row in tree["rows"] if row["row"] == name), None)
            if row is None:
                continue
            extra = ""
            if "finalizes" in row:
                extra = (f"  {row['finalizes']} (mean {row['finalize_mean_s']} s, busy "
                         f"{100 * row['finalize_busy']:.0f} % of the drag)")
            print(f"{name:<28} {tree['label']:<8} {row['frames']:>7} {row['frames_per_second']:>9} "
                  f"{row['latency_p50_ms']:>8} {row['latency_p95_ms']:>8} {row['identity_readings']:>8}{extra}")
        for comparison in report.get("ratios", []):
            for row in comparison["rows"]:
                if row["row"] == name:
                    print(f"{name:<28} {'ratio':<8} {'':>7} {row['frames_per_second']:>9} "
                          f"{row['latency_p50_ms']:>8} {row['latency_p95_ms']:>8} {'':>8}  "
                          f"({comparison['after']} / {comparison['before']})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        type=lambda text: [part for part in text.split(",") if part],
                        help="comma list of: finalize (sessions drag while one more finalizes), clients (--clients "
                             "rows); default both")  # fmt: skip
    parser.add_argument("--clients", default="1,8,32", type=lambda text: [int(part) for part in text.split(",")])
    parser.add_argument("--sessions", type=int, default=8,
                        help="dragging sessions of the finalize scenario; the clients rows are spread over them")
    parser.add_argument("--messages", type=int, default=100, help="slider messages per client")
    parser.add_argument("--rate", type=float, default=30.0, help="slider messages per second per client")
    parser.add_argument("--photo", default=str(DEFAULT_PHOTO))
    parser.add_argument("--finetune", default="lowrank")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--project-steps", type=int, default=50)
    parser.add_argument("--compare", "--before", dest="compare", default="",
                        type=lambda text: [Path(part).resolve() for part in text.split(",") if part],
                        help="other checkouts (comma list) to measure in the same run, alternating with this one")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per tree (alternating between the trees)")
    parser.add_argument("--identity-meter", choices=("", "on", "off", "on-off"), default="",
                        help="the live identity meter: on (dlib) or off on every server, or on-off: this tree twice, "
                             "meter on and off, alternating (ratios on / off); default: the server's setting")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown or not args.scenarios:
        parser.error(f"--scenarios takes a comma list of {', '.join(SCENARIOS)}")
    if args.identity_meter == "on-off" and args.compare:
        parser.error("--identity-meter on-off compares this tree with itself: it does not go with --compare")
    for root in args.compare:
        if not (root / "fluidsrv" / "__init__.py").is_file() or not (root / "plugins" / "__init__.py").is_file():
            parser.error(f"{root} is not a checkout of this repository (no fluidsrv/ and plugins/)")
    return args


async def measure(args: argparse.Namespace, trees: list[Tree]) -> None:
    photo = Path(args.photo).read_bytes()
    try:
        for tree in trees:
            await tree.prepare(args, photo)
            print(f"{tree.label}: {args.sessions + 1} sessions prepared, {tree.prepare_s:.1f} s each",
                  file=sys.stderr)
        for round_index in range(args.rounds):
            for tree in trees:
                began = time.perf_counter()
                await tree.run_round(args)
                print(f"round {round_index + 1}/{args.rounds} {tree.label}: {time.perf_counter() - began:.1f} s",
                      file=sys.stderr)
    finally:
        for tree in trees:
            if tree.client is not None:
                await tree.client.aclose()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meter = args.identity_meter
    checkouts = [("after" if args.compare else "current", REPO, meter)]
    checkouts += [("before" if len(args.compare) == 1 else f"before{i + 1}", root, meter) for i, root in
                  enumerate(args.compare)]  # fmt: skip
    if meter == "on-off":
        checkouts = [("on", REPO, "on"), ("off", REPO, "off")]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="preview-latency-") as scratch, ExitStack() as stack:
        trees = []
        for label, root, tree_meter in checkouts:
            folder = Path(scratch) / label
            (folder / "data").mkdir(parents=True)
            env = server_env(args, folder / "data", tree_meter)
            url = stack.enter_context(live_server.serve(args.generator, args.device, env, folder / "server.log",
                                                        checkout=root))  # fmt: skip
            imported = live_server.checked_imports(folder / "server.log", root)
            print(f"{label}: {root} serving at {url}, imports {imported}", file=sys.stderr)
            trees.append(Tree(label, root, url, tree_meter))
        try:
            asyncio.run(measure(args, trees))
        except BaseException:
            for label, _, _ in checkouts:  # the logs go with the scratch folder: show their ends first
                tail = (Path(scratch) / label / "server.log").read_text(errors="replace")[-3000:]
                print(f"--- {label} server log (end) ---\n{tail}", file=sys.stderr)
            raise
        stats = [asyncio.run(tree.executor_stats()) for tree in trees]
    report: dict[str, Any] = {
        "scenarios": args.scenarios, "sessions": args.sessions, "messages_per_client": args.messages,
        "rate_per_client": args.rate, "rounds": args.rounds, "finetune": args.finetune,
        "finetune_steps": args.finetune_steps, "photo": args.photo, "seconds": round(time.perf_counter() - began, 1),
        "trees": [{**tree.report(), "executor": stat} for tree, stat in zip(trees, stats)],
    }  # fmt: skip
    if args.compare or meter == "on-off":
        after = report["trees"][0]
        report["ratios"] = [{"after": after["label"], "before": before["label"], "rows": ratios(after, before)}
                            for before in report["trees"][1:]]  # fmt: skip
    emit_report(report, args.json, print_table)
    print(f"\n{report['seconds']} s in all")


if __name__ == "__main__":
    main()
