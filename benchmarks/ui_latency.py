"""Browser latency: slider input → preview painted, measured inside chromium with the app's performance marks.

Usage::

    .venv/bin/python benchmarks/ui_latency.py [--moves 100] [--generator embedded] [--device cpu]
                                              [--photo PATH] [--url http://127.0.0.1:8000] [--json out.json]

Starts ``fluidsrv serve`` as a subprocess on a free loopback port (unless ``--url`` names a running server),
uploads a photo in Debian's headless chromium, picks the largest face and waits for the editor. Then:

* **step**: ``--moves`` single slider moves, each waiting for its frame: the latency of one isolated move;
* **drag**: ``--moves`` moves paced by ``requestAnimationFrame`` (a continuous drag at the display rate); the
  app keeps one state in flight and sends only the newest waiting one, so some moves are never painted.

Each painted frame leaves two performance measures (``static/js/preview.js``): ``input-to-paint`` from the input
event of the state shown, and ``first-input-to-paint`` from the oldest input that was waiting for a frame (what
a dragging user perceives). Prints a table, then the JSON (or writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fluidsrv.client import Client
from fluidsrv.settings import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from benchmarks import live_server
from tests.browser_support import CHROMIUM, chromium_context, wait_booted, wait_new_frame

DEFAULT_PHOTO = REPO_ROOT.parent / "shared" / "photos" / "deepface_img12.jpg"
FAST_PREPARE_ENV = {
    # preparing the face is not what is measured: keep it short
    "FLUIDSRV_ENCODER": "project",
    "FLUIDSRV_PLUGIN_OPTIONS": json.dumps({"encoder.project": {"steps": 20}}),
    "FLUIDSRV_FINETUNE": "lowrank",
    "FLUIDSRV_FINETUNE_STEPS": "10",
    "FLUIDSRV_SEGMENTER": "landmarks",
    "FLUIDSRV_INPAINTER": "telea",
}
PREPARE_TIMEOUT_MS = 600_000

# Runs in the page: move the first slider ``moves`` times, one move per animation frame.
DRAG_SCRIPT = """
async (moves) => {
  const slider = document.querySelector("#slider-1");
  const min = Number(slider.min), max = Number(slider.max);
  for (let i = 0; i < moves; i++) {
    await new Promise((resolve) => requestAnimationFrame(resolve));
    slider.value = String(min + (max - min) * (0.5 + 0.45 * Math.sin(i / 7)));
    slider.dispatchEvent(new Event("input", { bubbles: true }));
  }
}
"""

# Runs in the page: one slider move to ``value`` (an input event, as a drag fires).
MOVE_SCRIPT = """
(value) => {
  const slider = document.querySelector("#slider-1");
  slider.value = String(value);
  slider.dispatchEvent(new Event("input", { bubbles: true }));
}
"""


@contextmanager
def serve(generator: str, device: str, data_dir: Path) -> Iterator[str]:
    """Run ``fluidsrv serve`` in a subprocess; yield its base URL once /api/health answers."""
    env = {**FAST_PREPARE_ENV, **os.environ, "FLUIDSRV_DATA_DIR": str(data_dir)}
    # the server's log stays out of the printed JSON
    with live_server.serve(generator, device, env, data_dir.parent / "server.log") as url:
        yield url


def percentile(values: list[float], fraction: float) -> float:
    """Return the ``fraction`` percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summarize(durations: list[float]) -> dict[str, float | int]:
    """Count, p50, p95, mean and max of durations in ms."""
    if not durations:
        return {"count": 0}
    return {
        "count": len(durations),
        "p50_ms": round(percentile(durations, 0.50), 2),
        "p95_ms": round(percentile(durations, 0.95), 2),
        "mean_ms": round(statistics.fmean(durations), 2),
        "max_ms": round(max(durations), 2),
    }


def take_measures(page: Any, name: str) -> list[float]:
    """Return and clear the durations of the performance measures ``name``."""
    durations: list[float] = page.evaluate(
        """(name) => {
            const values = performance.getEntriesByName(name).map((entry) => entry.duration);
            performance.clearMeasures(name);
            return values;
        }""",
        name,
    )
    return durations


def open_editor(page: Any, url: str, photo: Path) -> float:
    """Upload ``photo`` in the page, pick the largest face, wait for the first frame; return the seconds it took."""
    page.goto(url)
    wait_booted(page)
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector("#view-faces:not([hidden])", timeout=120_000)
    started = time.perf_counter()
    page.click("#face-list button")
    page.wait_for_selector("#view-editor:not([hidden])", timeout=PREPARE_TIMEOUT_MS)
    wait_new_frame(page, -1, timeout_ms=60_000)
    return round(time.perf_counter() - started, 2)


def measure_steps(page: Any, moves: int) -> dict[str, Any]:
    """Single moves, each waiting for its own frame."""
    take_measures(page, "fluidsrv:input-to-paint")
    for index in range(moves):
        before = int(page.evaluate("Number(document.querySelector('#preview').dataset.seq ?? -1)"))
        value = 2.0 * ((index % 9) - 4) / 4.0  # −2 … 2, never the same twice in a row
        page.evaluate(MOVE_SCRIPT, value)
        wait_new_frame(page, before)
    return {"input_to_paint": summarize(take_measures(page, "fluidsrv:input-to-paint"))}


def measure_drag(page: Any, moves: int) -> dict[str, Any]:
    """Moves at the display rate; the newest state wins, the rest are dropped."""
    take_measures(page, "fluidsrv:input-to-paint")
    take_measures(page, "fluidsrv:first-input-to-paint")
    before = int(page.evaluate("Number(document.querySelector('#preview').dataset.seq ?? -1)"))
    started = time.perf_counter()
    page.evaluate(DRAG_SCRIPT, moves)
    wait_new_frame(page, before, timeout_ms=120_000)
    page.wait_for_function("document.querySelector('#preview').dataset.settled === 'true'", timeout=120_000)
    elapsed = time.perf_counter() - started
    newest = take_measures(page, "fluidsrv:input-to-paint")
    oldest = take_measures(page, "fluidsrv:first-input-to-paint")
    return {
        "moves": moves,
        "frames_painted": len(newest),
        "painted_fps": round(len(newest) / elapsed, 1),
        "input_to_paint": summarize(newest),
        "first_input_to_paint": summarize(oldest),
    }


def print_table(result: dict[str, Any]) -> None:
    """Print the latencies as a table."""
    rows = [
        ("step: input → paint", result["step"]["input_to_paint"]),
        ("drag: newest input → paint", result["drag"]["input_to_paint"]),
        ("drag: oldest waiting input → paint", result["drag"]["first_input_to_paint"]),
    ]
    print(f"{'measure':38} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8} {'max ms':>8}")
    for label, stats in rows:
        print(f"{label:38} {stats.get('count', 0):>5} {stats.get('p50_ms', float('nan')):>8} "
              f"{stats.get('p95_ms', float('nan')):>8} {stats.get('mean_ms', float('nan')):>8} "
              f"{stats.get('max_ms', float('nan')):>8}")
    drag = result["drag"]
    print(f"drag: {drag['frames_painted']} frames painted for {drag['moves']} moves ({drag['painted_fps']} fps)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start (or use) a server, open the editor in chromium and measure."""
    if not CHROMIUM.is_file():
        raise SystemExit(f"{CHROMIUM} is absent: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="fluidsrv-ui-latency-") as scratch_dir:
        scratch = Path(scratch_dir)
        viewport = {"width": 1100, "height": 900}
        with serve_or_use(args, scratch) as url, Client(url) as server:
            config = server.config()  # a --url that is not a fluidsrv server fails here, before chromium starts
            with chromium_context(scratch / "profile", viewport=viewport) as context:
                page = context.new_page()
                prepare_seconds = open_editor(page, url, args.photo)
                step = measure_steps(page, args.moves)
                drag = measure_drag(page, args.moves)
    return {
        "benchmark": "ui_latency",
        "moves": args.moves,
        "generator": config["generator"],
        "previewer": config["active"].get("previewer"),
        "prepare_seconds": prepare_seconds,
        "browser": "Debian chromium (headless, --disable-gpu)",
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "step": step,
        "drag": drag,
    }


@contextmanager
def serve_or_use(args: argparse.Namespace, scratch: Path) -> Iterator[str]:
    """Yield ``--url`` as is, or the URL of a fresh ``fluidsrv serve``."""
    if args.url:
        yield args.url.rstrip("/")
        return
    with serve(args.generator, args.device, scratch / "data") as url:
        yield url


def main() -> None:
    """Parse arguments, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=100, help="slider moves per measurement (default 100)")
    parser.add_argument("--generator", default="embedded", help='"embedded", "random:RES" or a checkpoint path')
    parser.add_argument("--device", default="auto", help='"auto", "cpu" or "cuda"')
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="the photo to upload")
    parser.add_argument("--url", help="measure a running server instead of starting one")
    parser.add_argument("--json", type=Path, help="write the JSON here instead of printing it")
    args = parser.parse_args()
    assert args.moves >= 1, "--moves must be >= 1"
    result = run(args)
    print_table(result)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
