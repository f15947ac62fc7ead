"""How well each outer head predictor (``fluidsrv/outer_seg.py``) finds the new head outside the inner crop.

Usage::

    .venv/bin/python benchmarks/outer_seg.py [--photos ../shared/photos-eval] [--limit N] [--json FILE]

For each photo: align its largest face at a 128² inner crop (the embedded generator's), parse the outer crop's
face+hair with the landmark segmenter, and keep the photos whose head reaches past the inner crop. Each is moved
by known head motions (rotations and shifts about the face, the outer crop warped as a whole); dlib's landmarks are
found on the old and the moved inner crop as finalize finds them on the two renders, and each predictor's new
head outside the inner crop is scored against the old head moved by the same motion (IoU there). The motion is a
similarity, which is the ``affine`` predictor's model: a real pose edit is not (``benchmarks/photo_edits.py
--compare-outer`` measures that); this isolates the landmarks, the warp's fade and its extrapolation.
Prints a line per photo, the mean IoU per predictor and motion, and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fluidsrv_plugins.detect_dlib import DlibDetector, predictor_path
from fluidsrv_plugins.segment_landmarks import LandmarkSegmenter

from fluidsrv.compose import parse_head, place_inner
from fluidsrv.geometry import align_face
from fluidsrv.image_io import decode_image
from fluidsrv.outer_seg import PREDICTORS, landmark_motion, predictor
from fluidsrv.settings import REPO_ROOT

SIZE = 128
MOTIONS = {  # name: (degrees, shift x, shift y) in outer-crop pixels, about the face centre
    "turn 6°": (6.0, 0.0, 0.0),
    "turn -10°": (-10.0, 0.0, 0.0),
    "shift 6,-4": (0.0, 6.0, -4.0),
    "turn 8° + shift -5,3": (8.0, -5.0, 3.0),
}
MIN_OUTSIDE = 50  # head pixels outside the inner crop for a photo to count


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (nan when both are empty)."""
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else float("nan")


def measure(path: Path, detector: DlibDetector, segmenter: LandmarkSegmenter) -> dict[str, Any] | None:
    """Every predictor's IoU outside the inner crop under every motion, for one photo (None: no head outside)."""
    photo = decode_image(path.read_bytes()).pixels
    faces = detector.detect(photo)
    if not faces:
        return None
    face = max(faces, key=lambda found: (found.box[2] - found.box[0]) * (found.box[3] - found.box[1]))
    if face.landmarks68 is None:
        return None
    alignment = align_face(photo, face.landmarks68, size=SIZE)
    old_outer, offset = alignment.outer_image, alignment.inner_offset
    side = old_outer.shape[0]
    region = place_inner(np.ones((SIZE, SIZE), dtype=bool), side, offset)
    old_head = parse_head(old_outer, segmenter)
    if int((old_head & ~region).sum()) < MIN_OUTSIDE:
        return None
    cx, cy = (float(value) for value in alignment.inner.to_crop_points(face.landmarks68).mean(axis=0) + offset)
    centre = (cx, cy)
    inner = slice(offset, offset + SIZE)
    scores: dict[str, dict[str, float]] = {}
    for motion_name, (angle, dx, dy) in MOTIONS.items():
        matrix = np.asarray(cv2.getRotationMatrix2D(centre, angle, 1.0), dtype=np.float64)
        matrix[:, 2] += np.array([dx, dy])
        new_outer = cv2.warpAffine(old_outer, matrix, (side, side), borderMode=cv2.BORDER_REPLICATE)
        truth = cv2.warpAffine(old_head.astype(np.uint8), matrix, (side, side), flags=cv2.INTER_NEAREST) > 0
        motion = landmark_motion(old_outer[inner, inner], new_outer[inner, inner])
        scores[motion_name] = {"unmoved": iou(old_head & ~region, truth & ~region)}
        for name in PREDICTORS:
            predicted = predictor(name).predict(old_head, truth & region, region,
                                                motion.in_outer(offset) if motion is not None else None)
            scores[motion_name][name] = iou(predicted.head & ~region, truth & ~region)
    return {"photo": path.name, "outside_pixels": int((old_head & ~region).sum()), "iou": scores}


def main(argv: list[str] | None = None) -> int:
    """Measure the photos, print per photo and the means."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=REPO_ROOT.parent / "shared" / "photos-eval")
    parser.add_argument("--limit", type=int, help="look at the first N photos (default all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    path = predictor_path()
    if path is None:
        raise SystemExit("dlib's 68-point predictor is not installed (pip install face-recognition-models)")
    detector, segmenter = DlibDetector(path), LandmarkSegmenter(path)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.limit]
    started = time.perf_counter()
    records = []
    for photo in photos:
        record = measure(photo, detector, segmenter)
        if record is None:
            continue
        records.append(record)
        cells = " ".join(f"{motion}: " + "/".join(f"{record['iou'][motion][name]:.2f}" for name in PREDICTORS)
                         for motion in MOTIONS)
        print(f"  {photo.name:22} outside {record['outside_pixels']:5d} px  {cells}", flush=True)
    columns = ("unmoved", *PREDICTORS)
    means = {motion: {name: round(statistics.fmean([r["iou"][motion][name] for r in records
                                                     if np.isfinite(r["iou"][motion][name])] or [float("nan")]), 3)
                      for name in columns} for motion in MOTIONS} if records else {}
    summary = {"benchmark": "outer_seg", "photos": len(photos), "with_head_outside": len(records),
               "seconds": round(time.perf_counter() - started, 1), "mean_iou_outside_inner_crop": means,
               "records": records}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({key: value for key, value in summary.items() if key != "records"}, indent=2))
    print(f"{'motion (mean IoU outside the inner crop)':40} " + " ".join(f"{name:>8}" for name in columns))
    for motion, row in means.items():
        print(f"{motion:40} " + " ".join(f"{row[name]:8.3f}" for name in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
