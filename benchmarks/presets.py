"""Single-edit presets against the full edit path: time per photo, and fidelity to the generator's own edit.

Speed: each of ``--photos`` photos of ``../shared/photos-eval`` goes, in one in-process
:class:`~fluidsrv.service.EditService` with the server's defaults (the embedded generator), through

* the **preset** path: ``apply_preset`` (decode → detect → align → the preset's network → finalize's transfer and
  paste-back → JPEG), every face of the photo;
* the **full** path: upload (decode → detect) → prepare the largest face (align → e4e → pivotal tuning → distil) →
  the preset's slider at the preset's strength → finalize (the tuned generator's render → transfer → JPEG); a
  photo is prepared once and finalized once per preset (each preset's full time counts the prepare).

Reported: the median seconds of each and the speed-up (full / preset).

Fidelity (held-out faces, never trained on): the preset's edit of a face against the generator's own edit of it,
at the preset's side (128²): generated faces of seeds the training never draws from (``G(w)`` → ``G(w + S·d)``),
and real faces of ids ≥ 44,000 of ``../shared/data`` (``x`` → ``x + G(E(x) + S·d) − G(E(x))``, with the e4e code
``E(x)``). Beside the preset's PSNR: the PSNR of no edit at all, and the share of the edit's squared change the
preset draws. On the photos: PSNR of the preset's photo against the full path's photo over the face's inner crop,
beside the original photo's PSNR against the full path's (what "no edit" scores there).

    .venv/bin/python benchmarks/presets.py [--presets older,smile] [--photos 3] [--faces 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluidsrv.image_io import decode_image  # noqa: E402
from fluidsrv.presets import PRESETS_FOLDER, find_presets, load_preset, read_facts  # noqa: E402
from fluidsrv.service import EditService  # noqa: E402
from fluidsrv.settings import Settings  # noqa: E402
from fluidsrv.training.data import FaceShardDataset, to_model_range  # noqa: E402
from fluidsrv.training.preset import PairMaker, PresetTrainConfig, encoder_of, fidelity, find_direction  # noqa: E402

SHARED = ROOT.parent / "shared"
PHOTOS = ["deepface_img25.jpg", "deepface_img46.jpg", "deepface_img29.jpg", "deepface_img56.jpg",
          "deepface_img22.jpg", "gfpgan_Blake_Lively.jpg"]
HELDOUT_SKIP = 32  # the first held-out real faces are the training run's own evaluation set
EVAL_SEED = 20_000  # generated faces: a seed neither training (0) nor its evaluation (10,000) draws from


def region_psnr(a: np.ndarray, b: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """PSNR (dB) of two uint8 photos over ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    diff = a[y0:y1, x0:x1].astype(np.float64) - b[y0:y1, x0:x1].astype(np.float64)
    return 10.0 * math.log10(255.0**2 / max(float(np.mean(diff**2)), 1e-12))


def inner_box(service: EditService, session: Any) -> tuple[int, int, int, int]:
    """The bounding box of a prepared face's inner crop in photo pixels."""
    quad = session.prepared.alignment.inner.quad
    height, width = session.upload.pixels.shape[:2]
    x0, y0 = np.maximum(np.floor(quad.min(axis=0)).astype(int), 0)
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int)
    return int(x0), int(y0), int(min(x1, width)), int(min(y1, height))


async def speed(service: EditService, presets: dict[str, tuple[str, float]], photos: list[Path]) -> dict[str, Any]:
    """Per preset (name -> (direction, strength)): the preset path vs the full path on each photo, in seconds, and
    the PSNR of the preset's photo against the full path's on the face. A photo is prepared once; the full path's
    time of a preset is that prepare (upload included) plus its own finalize."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in presets}
    for path in photos:
        data = path.read_bytes()
        started = time.perf_counter()
        session, _ = await service.create(data, path.name)
        largest = max(range(len(session.faces)), key=lambda i: (session.faces[i].box[2] - session.faces[i].box[0]))
        await service.prepare(session, largest)
        await service.wait(session)
        prepare_seconds = time.perf_counter() - started
        original, box = session.upload.pixels, inner_box(service, session)
        for name, (direction, strength) in presets.items():
            started = time.perf_counter()
            preset_jpeg = await service.apply_preset(name, data)
            preset_seconds = time.perf_counter() - started
            started = time.perf_counter()
            service.set_sliders(session, {direction: strength}, commit=True)
            full_jpeg = await service.finalize(session)
            full_seconds = prepare_seconds + time.perf_counter() - started
            preset_photo = decode_image(preset_jpeg, max_pixels=10**9).pixels
            full_photo = decode_image(full_jpeg, max_pixels=10**9).pixels
            rows[name].append({
                "photo": path.name, "pixels": int(original.shape[0] * original.shape[1]), "faces": len(session.faces),
                "preset_s": round(preset_seconds, 3), "full_s": round(full_seconds, 2),
                "psnr_vs_full": round(region_psnr(preset_photo, full_photo, box), 2),
                "psnr_original_vs_full": round(region_psnr(original, full_photo, box), 2)})
            print(json.dumps({"preset": name, **rows[name][-1]}), flush=True)
    return {name: summary(found) for name, found in rows.items()}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of a preset's photos and its speed-up over the full path."""
    def median(key: str) -> float:
        return float(statistics.median(row[key] for row in rows))

    return {"photos": rows, "preset_s_median": round(median("preset_s"), 3),
            "full_s_median": round(median("full_s"), 2), "speedup": round(median("full_s") / median("preset_s"), 1),
            "psnr_vs_full_median": round(median("psnr_vs_full"), 2),
            "psnr_original_vs_full_median": round(median("psnr_original_vs_full"), 2)}


def heldout_fidelity(service: EditService, path: Path, faces: int) -> dict[str, Any]:
    """The preset's edits of held-out faces against the generator's own edits (see the module docstring)."""
    runtime = service.runtime
    facts, _ = read_facts(path)
    preset = load_preset(path, runtime.device)
    direction = find_direction(runtime.directions, facts.direction)
    config = PresetTrainConfig()
    pairs = PairMaker(runtime.generator, direction, facts.strength, runtime.spread, facts.resolution, config,
                      encoder_of(runtime))
    rng = torch.Generator().manual_seed(EVAL_SEED)
    figures = {"generated": fidelity(preset.network, *pairs.generated(faces, rng))}
    data = SHARED / "data"
    if pairs.encode is not None and data.is_dir():
        held = FaceShardDataset(data, "heldout", resolution=facts.resolution, limit=HELDOUT_SKIP + faces)
        real = to_model_range(torch.stack([held[i] for i in range(HELDOUT_SKIP, len(held))])).to(runtime.device)
        figures["real"] = fidelity(preset.network, *pairs.real(real))
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every preset's fidelity and speed, with the machine's facts."""
    folder = ROOT / "weights" / PRESETS_FOLDER
    found = find_presets(folder)
    names = [name for name in args.presets.split(",") if name] if args.presets else list(found)
    missing = [name for name in names if name not in found]
    if missing:
        raise SystemExit(f"no preset {', '.join(missing)} in {folder} (found: {', '.join(found) or 'none'})")
    photos = [SHARED / "photos-eval" / name for name in PHOTOS[: args.photos]]
    with tempfile.TemporaryDirectory(prefix="fluidsrv-bench-presets-") as scratch:
        settings = dataclasses.replace(Settings.from_env(device=args.device), data_dir=Path(scratch))
        service = await EditService.start(settings)
        try:
            report: dict[str, Any] = {"threads": torch.get_num_threads(), "device": str(service.runtime.device),
                                      "presets": {}}
            edits = {}
            for name in names:
                facts, _ = read_facts(found[name])
                edits[name] = (facts.direction, facts.strength)
                entry: dict[str, Any] = {"direction": facts.direction, "strength": facts.strength,
                                         "fidelity": heldout_fidelity(service, found[name], args.faces)}
                print(json.dumps({"preset": name, "fidelity": entry["fidelity"]}), flush=True)
                report["presets"][name] = entry
            if args.photos:
                for name, timing in (await speed(service, edits, photos)).items():
                    report["presets"][name]["speed"] = timing
        finally:
            await service.close()
    return report


def print_table(report: dict[str, Any]) -> None:
    """One row per preset: held-out PSNR (preset / no edit / change drawn) and the speed-up over the full path."""
    print("| preset | held-out PSNR, generated (no edit) | change drawn | held-out PSNR, real (no edit) | change drawn "
          "| preset s / photo | full s / photo | speed-up | PSNR vs full path on photos (original) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, entry in report["presets"].items():
        generated, real = entry["fidelity"]["generated"], entry["fidelity"].get("real", {})
        timing = entry.get("speed", {})
        real_drawn = f"{real['change_drawn']:.0%}" if real else "–"
        cells = [f"{name} ({entry['direction']} {entry['strength']:+g})",
                 f"{generated['psnr']} ({generated['psnr_unedited']})", f"{generated['change_drawn']:.0%}",
                 f"{real.get('psnr', '–')} ({real.get('psnr_unedited', '–')})", real_drawn,
                 str(timing.get("preset_s_median", "–")), str(timing.get("full_s_median", "–")),
                 f"{timing.get('speedup', '–')}×",
                 f"{timing.get('psnr_vs_full_median', '–')} ({timing.get('psnr_original_vs_full_median', '–')})"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    """Parse the arguments, run, print the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", help="comma-separated preset names (default: every shipped one)")
    parser.add_argument("--photos", type=int, default=3, help=f"photos timed per preset (at most {len(PHOTOS)})")
    parser.add_argument("--faces", type=int, default=64, help="held-out faces of each kind for fidelity")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print_table(report)


if __name__ == "__main__":
    main()
