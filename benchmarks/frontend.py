"""Face front-end latency: detect + landmarks, then FFHQ align (inner + outer crops), per photo and detector.

Usage::

    .venv/bin/python benchmarks/frontend.py [--photos DIR] [--detectors dlib,yunet] [--cache-dir DIR]
                                             [--size 1024] [--repeat 3] [--json out.json]

Every available detector plugin is measured unless ``--detectors`` names some. "detect" is the
plugin's ``detect()`` (its landmarks included: dlib's 68-point predictor, MediaPipe's FaceMesh);
"align" is :func:`fluidsrv.geometry.align_face` of the largest face (inner ``size`` crop plus the
1.5x outer crop). Times are medians over ``--repeat`` runs after one warm-up call per detector.
Prints a table, then the JSON (or writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluidsrv.geometry import align_face, face_landmarks
from fluidsrv.image_io import decode_image
from fluidsrv.plugins import StageCatalog, build_plugin_manager
from fluidsrv.settings import REPO_ROOT, default_cache_dir
from fluidsrv.stages import PluginContext

DEFAULT_PHOTOS = REPO_ROOT.parent / "shared" / "photos"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def median_ms(action: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Run ``action`` ``repeat`` times; return the median wall time in ms and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = action()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), result


def load_photo(path: Path) -> np.ndarray:
    """Decode a photo to uint8 RGB [H, W, 3], upright (as uploads are)."""
    return decode_image(path.read_bytes(), max_bytes=None).pixels


def measure_detector(detector: Any, photos: dict[str, np.ndarray], size: int, repeat: int) -> list[dict[str, Any]]:
    """Return one row per photo: faces found, detect ms, align ms (largest face), total ms."""
    detector.detect(next(iter(photos.values())))  # warm-up: lazy graph / model initialisation
    rows = []
    for name, photo in photos.items():
        detect_ms, faces = median_ms(partial(detector.detect, photo), repeat)
        align_ms = 0.0
        if faces:
            align_ms, _ = median_ms(partial(align_face, photo, face_landmarks(faces[0]), size=size), repeat)
        rows.append(
            {
                "photo": name,
                "pixels": f"{photo.shape[1]}x{photo.shape[0]}",
                "faces": len(faces),
                "detect_ms": round(detect_ms, 1),
                "align_ms": round(align_ms, 1),
                "total_ms": round(detect_ms + align_ms, 1),
            }
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Return the median per-photo detect / align / total times of a detector."""
    return {key: round(statistics.median(row[key] for row in rows), 1) for key in ("detect_ms", "align_ms", "total_ms")}


def print_table(results: dict[str, Any]) -> None:
    """Print one table per detector and a summary table."""
    for name, entry in results["detectors"].items():
        if "unavailable" in entry:
            print(f"\n{name}: unavailable: {entry['unavailable']}")
            continue
        print(f"\n{name}")
        print(f"  {'photo':26s} {'pixels':>10s} {'faces':>5s} {'detect ms':>10s} {'align ms':>9s} {'total ms':>9s}")
        for row in entry["photos"]:
            print(
                f"  {row['photo']:26s} {row['pixels']:>10s} {row['faces']:5d} {row['detect_ms']:10.1f}"
                f" {row['align_ms']:9.1f} {row['total_ms']:9.1f}"
            )
    print(f"\nmedian per photo (align: {results['size']} px inner + outer crop of the largest face)")
    print(f"  {'detector':12s} {'detect ms':>10s} {'align ms':>9s} {'total ms':>9s}")
    for name, entry in results["detectors"].items():
        if "median" in entry:
            median = entry["median"]
            print(f"  {name:12s} {median['detect_ms']:10.1f} {median['align_ms']:9.1f} {median['total_ms']:9.1f}")


def main(argv: list[str] | None = None) -> int:
    """Measure every requested, available detector on every photo and report the times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos (default ../shared/photos)"
    )
    parser.add_argument("--detectors", help="comma-separated detector names (default: every available one)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="weights cache for model-file plugins")
    parser.add_argument("--size", type=int, default=1024, help="inner crop size (default 1024)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the median is kept")
    parser.add_argument("--json", type=Path, help="write the JSON here instead of printing it")
    args = parser.parse_args(argv)

    paths = sorted(path for path in args.photos.iterdir() if path.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        print(f"no photos in {args.photos}", file=sys.stderr)
        return 2
    photos = {path.name: load_photo(path) for path in paths}
    cache_dir = args.cache_dir or default_cache_dir()
    context = PluginContext(torch.device("cpu"), REPO_ROOT / "weights", cache_dir)
    catalog = StageCatalog(build_plugin_manager(), context)
    names = args.detectors.split(",") if args.detectors else catalog.names("detector")

    results: dict[str, Any] = {
        "benchmark": "frontend",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "photos": str(args.photos),
        "size": args.size,
        "repeat": args.repeat,
        "detectors": {},
    }
    for name in names:
        reason = catalog.unavailable_reason("detector", name)
        if reason is not None:
            results["detectors"][name] = {"unavailable": reason}
            continue
        rows = measure_detector(catalog.create("detector", name), photos, args.size, args.repeat)
        results["detectors"][name] = {"median": summary(rows), "photos": rows}

    print_table(results)
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
        print(f"\nwrote {args.json}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
