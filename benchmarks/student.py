"""The preview student against the generator previewer: speed at 128² and 1024², quality and distill time at 128².

Speed (``--speed``): one preview frame of the ``generator`` previewer (synthesis + the wire downscale) against one
of the ``student`` previewer (modulator + decoder, anchored), interleaved in one run so machine noise hits both;
at 128² with the embedded generator and student, at 1024² with a config-f-shaped generator and an untrained student
of the default 1024 shape (random weights: the cost does not depend on them). Reported: median ms and the ratio.

Quality (``--faces``, default 6): held-out faces of ``../shared/data`` (ids ≥ 44,000, never trained on) go through
the server's own prepare stages — the active encoder, pivotal tuning with the server's defaults, the student's
distill step with its default budget — then ``--edits`` random slider edits each (1–2 of the server's sliders at
uniform strengths over their whole range) are rendered by the tuned generator (the truth) and by the student.
Reported per face and pooled (mean of per-edit PSNR, and PSNR of the pooled MSE, which hard edits dominate;
plus the share of the edits' squared pixel change the student draws, 1 − MSE(student) / MSE(no change)): PSNR and
MS-SSIM of the student's preview (anchored, what users see) against the truth
at the student's side, the same for the un-anchored student and for "no change" (the unedited render: how far
the edits move the image, the floor a previewer must beat), and the distill step's seconds.

    .venv/bin/python benchmarks/student.py                   # everything
    .venv/bin/python benchmarks/student.py --faces 0         # speed only
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluidsrv.distill import StudentRenderer, sample_edits  # noqa: E402
from fluidsrv.models.stylegan2 import Generator  # noqa: E402
from fluidsrv.perceptual import ms_ssim, psnr  # noqa: E402
from fluidsrv.pipeline import preview_side, render_preview  # noqa: E402
from fluidsrv.stages import PluginContext, StepJob  # noqa: E402


def drain(job: StepJob[object]) -> object:
    """Run a step job to its end and return its result."""
    try:
        while True:
            next(job)
    except StopIteration as done:
        return done.value


def median_ms(render: object, ws: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of ``render(ws)`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        render(ws)  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def speed_row(label: str, generator: Generator, student_options: dict[str, object], repeats: int) -> None:
    """Print generator-previewer vs student-previewer ms for ``generator``, interleaved."""
    from fluidsrv_plugins.preview_generator import GeneratorPreviewer
    from fluidsrv_plugins.preview_student import StudentPreviewer

    context = PluginContext(device=torch.device("cpu"), weights_dir=ROOT / "weights", cache_dir=Path("/nonexistent"),
                            options=student_options)
    ws = generator.mapping(torch.randn(1, generator.w_dim, generator=torch.Generator().manual_seed(0)))
    edits = 0.3 * torch.randn(4, generator.num_ws, generator.w_dim)
    exact = drain(GeneratorPreviewer().fit(generator, ws, edits))
    from fluidsrv.distill import DistillConfig, distill

    student = StudentPreviewer(context).student_for(generator)
    fast = drain(distill(student, generator, ws, edits, DistillConfig(max_steps=1, min_steps=1, targets=2)))
    moved = ws + edits[:1]
    side = preview_side(generator.resolution)

    def frame_of(renderer: object) -> object:  # what the server does per preview: render, then size to P×P
        return lambda ws: render_preview(renderer, ws, side)  # type: ignore[arg-type]

    generator_times, student_times = [], []
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            frame_of(exact)(moved)  # type: ignore[operator]
            frame_of(fast)(moved)  # type: ignore[operator]
        for _ in range(repeats):  # alternate, so noise hits both alike
            generator_times.append(median_ms(frame_of(exact), moved, 1))
            student_times.append(median_ms(frame_of(fast), moved, 1))
    g, s = statistics.median(generator_times), statistics.median(student_times)
    print(f"{label}: generator preview {g:8.1f} ms ({generator.resolution}² render) | student preview {s:6.1f} ms "
          f"({student.side}² render) | both sized to the {side}² frame | student {g / s:5.1f}x faster")


def quality(faces: int, edits_per_face: int, data_dir: Path, student_file: Path | None) -> None:
    """Prepare held-out faces with the server's stages and compare student previews with the tuned generator."""
    from fluidsrv.pipeline import finetune_face
    from fluidsrv.pti import apply_delta
    from fluidsrv.runtime import Runtime
    from fluidsrv.settings import Settings
    from fluidsrv.training.data import FaceShardDataset, to_model_range

    options = {"previewer.student": {"student": str(student_file)}} if student_file else {}
    runtime = Runtime.build(Settings.from_env(device="cpu", previewer="student", plugin_options=options))
    stages = runtime.stages()
    edits = runtime.slider_edits()
    generator = runtime.generator
    dataset = FaceShardDataset(data_dir, "heldout", resolution=generator.resolution, limit=faces)
    print(f"quality: {dataset.num_faces} held-out faces, {edits_per_face} edits each over {len(edits)} sliders; "
          f"encoder {runtime.active_stages()['encoder']}, finetune {runtime.settings.finetune}")
    pooled: dict[str, list[float]] = {key: [] for key in ("student", "raw", "nochange", "ssim", "ssim_raw")}
    errors: dict[str, list[float]] = {key: [] for key in ("student", "raw", "nochange")}  # per-edit MSE
    distill_seconds = []
    for index in range(dataset.num_faces):
        target = to_model_range(dataset[index][None])  # [1, 3, R, R]
        latents = drain(stages.encoder.encode(target, generator))
        ws = latents.ws  # type: ignore[attr-defined]
        delta = drain(finetune_face(stages, target, ws)) if runtime.settings.finetune != "none" else {}
        tuned = apply_delta(generator, delta) if delta else generator  # type: ignore[arg-type]
        started = time.perf_counter()
        renderer = drain(stages.previewer.fit(tuned, ws, edits))
        distill_seconds.append(time.perf_counter() - started)
        assert isinstance(renderer, StudentRenderer)
        moves = sample_edits(edits, edits_per_face, 2, torch.Generator().manual_seed(100 + index))
        student = renderer.student
        with torch.inference_mode():
            truth = student.to_student_side(tuned.synthesis(ws + moves, noise_mode="const")).clamp(-1, 1)
            shown = torch.cat([renderer.render(ws + move[None]) for move in moves])
            raw = torch.cat([renderer.raw(ws + move[None]) for move in moves]).clamp(-1, 1)
            unedited = renderer.state["anchor"].clamp(-1, 1).expand_as(truth)
        row = {"student": psnr(shown, truth), "raw": psnr(raw, truth), "nochange": psnr(unedited, truth),
               "ssim": ms_ssim(shown, truth), "ssim_raw": ms_ssim(raw, truth)}
        for key, values in row.items():
            pooled[key].extend(float(v) for v in values)
        for key, images in (("student", shown), ("raw", raw), ("nochange", unedited)):
            errors[key].extend(float(v) for v in (images - truth).square().mean(dim=(1, 2, 3)))
        print(f"  face {dataset.face_id(index)}: student {row['student'].mean():5.2f} dB (MS-SSIM "
              f"{row['ssim'].mean():.3f}) | un-anchored {row['raw'].mean():5.2f} dB | no change "
              f"{row['nochange'].mean():5.2f} dB | distill {distill_seconds[-1]:.1f} s")
    mean = {key: statistics.fmean(values) for key, values in pooled.items() if values}
    if mean:
        pooled_db = {key: 10 * math.log10(4.0 / max(statistics.fmean(values), 1e-12)) for key, values in errors.items()}
        captured = 1.0 - sum(errors["student"]) / max(sum(errors["nochange"]), 1e-12)
        print(f"quality pooled ({len(pooled['student'])} edits): student {mean['student']:.2f} dB, MS-SSIM "
              f"{mean['ssim']:.3f} | un-anchored {mean['raw']:.2f} dB, MS-SSIM {mean['ssim_raw']:.3f} | no change "
              f"{mean['nochange']:.2f} dB | distill median {statistics.median(distill_seconds):.1f} s, max "
              f"{max(distill_seconds):.1f} s")
        print(f"quality pooled MSE: student {pooled_db['student']:.2f} dB | un-anchored {pooled_db['raw']:.2f} dB | "
              f"no change {pooled_db['nochange']:.2f} dB | share of the edits' pixel change the student draws "
              f"{100 * captured:.0f} %")


def main() -> None:
    """Parse arguments and run the speed rows and the quality table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=6, help="held-out faces for the quality table (0: skip)")
    parser.add_argument("--edits", type=int, default=16, help="random slider edits per face")
    parser.add_argument("--repeats", type=int, default=15, help="timed frames per previewer")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed rows")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--student", type=Path, help="the 128² student file (default: the embedded one)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the face shards")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_speed:
        from fluidsrv.runtime import build_random_generator, load_base_generator, random_generator_config

        embedded, _ = load_base_generator("embedded", ROOT / "weights")
        options: dict[str, object] = {"student": str(args.student)} if args.student else {}
        speed_row("128² embedded", embedded.eval().requires_grad_(False), options, args.repeats)
        big = build_random_generator(random_generator_config(1024)).eval().requires_grad_(False)
        speed_row("1024² config-f", big, {"untrained": "true"}, max(3, args.repeats // 3))
    if args.faces > 0:
        quality(args.faces, args.edits, args.data, args.student)


if __name__ == "__main__":
    main()
