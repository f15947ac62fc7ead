"""GPU serving figures in one run of under ten minutes, printed as plain lines.

    .venv/bin/python benchmarks/gpu.py            # on a machine with CUDA (one shot, under 10 minutes)
    .venv/bin/python benchmarks/gpu.py --smoke    # tiny sizes on a CPU in seconds (tests/test_gpu_benchmark.py)

Sections, in this order (a section that fails prints its error and the run goes on; a global time guard,
``--budget`` seconds, skips or shortens what no longer fits):

1. ``synthesis``: ms per call of generator synthesis at 256² and 1024² (config-f widths, w_dim 512, random
   weights), batch 1 / 8 / 32: fp32 (cuDNN's TF32 as torch sets it), bf16 and fp16 autocast, each with and
   without channels-last activations; plus each autocast render's difference to fp32 (PSNR, max |Δ|).
2. ``memory``: bytes per session of tuned state on the device at 1024² (lowrank / full delta, and the tuned
   generator a cached session holds), and how many sessions fit in 80 GB.
3. ``previews``: p50 / p95 latency of 64 sessions dragging a slider at once through the real executor
   (:class:`fluidsrv.executor.GpuExecutor`, latest-wins per session), generator previewer, 1024², autocast.
4. ``pti``: seconds per face at 1024² with the server's defaults (:func:`fluidsrv.pti.pti_config`), lowrank and
   full, each after a 3-step warm-up; when the guard cuts a run short, the time per face is projected.
5. ``student``: the student previewer's preview ms (:func:`time_student`), when it imports.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fluidsrv.models.stylegan2 import Generator, GeneratorConfig
from fluidsrv.precision import autocast_dtype, inference_autocast

GB = 1e9
SESSION_MEMORY = 80 * GB  # "sessions per 80 GB"


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run (the full GPU run or the CPU smoke run)."""

    sizes: tuple[int, ...]  # synthesis resolutions
    batches: tuple[int, ...]
    iterations: int  # timed calls per synthesis case (fewer when a case is slow)
    case_seconds: float  # at most this long per synthesis case
    resolution: int  # of the memory, preview, PTI and student sections
    sessions: int  # concurrent preview sessions
    preview_seconds: float
    rate: float  # slider states each session sends per second
    pti_steps: int  # 0: the server's default for the resolution
    pti_warmup: int  # untimed PTI steps before each mode's timed run
    pti_cap_seconds: float  # at most this long per PTI mode
    student_options: Mapping[str, Any]
    budget: float  # the whole run's time guard, in seconds
    smoke: bool

    def config(self, resolution: int) -> GeneratorConfig:
        """The generator architecture at ``resolution``: config-f (rosinality's 1024² FFHQ shape), tiny for smoke."""
        if self.smoke:
            from fluidsrv.runtime import random_generator_config

            return random_generator_config(resolution)
        return GeneratorConfig(resolution=resolution, w_dim=512, n_mapping=8)  # empty channels: config-f widths


FULL = Plan(sizes=(256, 1024), batches=(1, 8, 32), iterations=10, case_seconds=4.0, resolution=1024, sessions=64,
            preview_seconds=15.0, rate=15.0, pti_steps=0, pti_warmup=3, pti_cap_seconds=150.0,
            student_options={"untrained": "true", "seconds": 8}, budget=540.0, smoke=False)
SMOKE = Plan(sizes=(16, 32), batches=(1, 2), iterations=2, case_seconds=0.5, resolution=32, sessions=4,
             preview_seconds=1.0, rate=10.0, pti_steps=2, pti_warmup=1, pti_cap_seconds=10.0,
             student_options={"untrained": "true", "seconds": 1, "max_steps": 2}, budget=120.0, smoke=True)


class Deadline:
    """The run's global time guard."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        """Seconds left."""
        return self.end - time.perf_counter()


def say(line: str) -> None:
    """Print one result line now."""
    print(line, flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Return cached, unused blocks to the device (CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_generator(config: GeneratorConfig, device: torch.device, seed: int = 0) -> Generator:
    """A randomly initialised generator on ``device`` (eval, no gradients), its w_avg estimated."""
    torch.manual_seed(seed)
    generator = Generator(config).to(device).eval().requires_grad_(False)
    generator.estimate_w_avg(num_samples=1_000)
    return generator


def random_ws(generator: Generator, count: int, seed: int, psi: float = 0.7) -> torch.Tensor:
    """``count`` mapped random ws [count, num_ws, w_dim] on the generator's device."""
    device = generator.w_avg.device
    z = torch.randn(count, generator.w_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        return generator.mapping(z, truncation_psi=psi)


# ------------------------------------------------------------------------------------------------ 1. synthesis


def time_synthesis(generator: Generator, ws: torch.Tensor, precision: str, channels_last: bool, plan: Plan) -> float:
    """Median ms of one ``synthesis(ws)`` call (float32 out) after two warm-up calls."""
    device = ws.device
    generator.channels_last_on_cuda = channels_last
    times: list[float] = []
    try:
        with torch.inference_mode(), inference_autocast(device, precision):
            for _ in range(2):
                generator.synthesis(ws).float()
            sync(device)
            began = time.perf_counter()
            while len(times) < plan.iterations and (not times or time.perf_counter() - began < plan.case_seconds):
                start = time.perf_counter()
                image = generator.synthesis(ws).float()
                sync(device)
                times.append(time.perf_counter() - start)
            assert image.dtype == torch.float32
    finally:
        generator.channels_last_on_cuda = False
    return 1000 * statistics.median(times)


def autocast_error(generator: Generator, ws: torch.Tensor, precision: str) -> str:
    """How far the ``precision`` render of ``ws`` is from the fp32 one: PSNR (images in [-1, 1]) and max |Δ|."""
    with torch.inference_mode():
        exact = generator.synthesis(ws).float()
        with inference_autocast(ws.device, precision):
            fast = generator.synthesis(ws).float()
    mse = float((fast - exact).square().mean())
    psnr = 10 * math.log10(4.0 / max(mse, 1e-12))
    return f"PSNR {psnr:.1f} dB, max |Δ| {float((fast - exact).abs().max()):.4f}"


def section_synthesis(plan: Plan, device: torch.device, deadline: Deadline) -> None:
    """Synthesis ms per resolution, batch and precision."""
    half = autocast_dtype(device, "auto")
    variants: list[tuple[str, str, bool]] = [("fp32", "fp32", False)]
    if half is not None:
        name = str(half).removeprefix("torch.")
        variants += [(f"autocast-{name}", "auto", False), (f"autocast-{name}+channels_last", "auto", True)]
        if half != torch.float16:
            variants += [("autocast-float16", "fp16", False), ("autocast-float16+channels_last", "fp16", True)]
    else:
        say(f"synthesis: autocast is off on {device.type} (fp32 only)")
    for resolution in plan.sizes:
        generator = random_generator(plan.config(resolution), device)
        for batch in plan.batches:
            ws = random_ws(generator, batch, seed=batch)
            for label, precision, channels_last in variants:
                if deadline.left() < 30:
                    say(f"synthesis {resolution} batch {batch} {label}: skipped (time guard)")
                    continue
                try:
                    ms = time_synthesis(generator, ws, precision, channels_last, plan)
                    say(f"synthesis {resolution} batch {batch} {label}: {ms:.2f} ms ({ms / batch:.2f} ms per image)")
                except Exception as error:  # e.g. out of memory at batch 32: report, go on
                    say(f"synthesis {resolution} batch {batch} {label}: failed ({type(error).__name__}: {error})")
                    free(device)
        for precision in ("bf16", "fp16") if half is not None else ():
            difference = autocast_error(generator, random_ws(generator, 1, 9), precision)
            say(f"synthesis {resolution} {precision} (auto picks {half}) vs fp32, batch 1: {difference}")
        del generator
        free(device)


# ------------------------------------------------------------------------------------------------ 2. memory


def new_tensor_bytes(base: Generator, tuned: Generator) -> int:
    """Bytes of the tensors ``tuned`` holds that it does not share with ``base`` (what one cached session adds)."""
    shared = {tensor.data_ptr() for tensor in [*base.parameters(), *base.buffers()]}
    tensors = [*tuned.parameters(), *tuned.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.data_ptr() not in shared)


def one_step_delta(generator: Generator, mode: str) -> dict[str, torch.Tensor]:
    """A delta of ``mode`` after one PTI step (its shapes and bytes are a session's)."""
    from fluidsrv.pti import PTIConfig, finetune

    ws = random_ws(generator, 1, seed=3)
    with torch.no_grad():
        target = generator.synthesis(random_ws(generator, 1, seed=4))
    job = finetune(generator, target, ws, PTIConfig(mode=mode, steps=1, locality_weight=0.0, frame_every=0))  # type: ignore[arg-type]
    while True:
        try:
            next(job)
        except StopIteration as stop:
            delta: dict[str, torch.Tensor] = stop.value
            return delta


def section_memory(plan: Plan, device: torch.device, generator: Generator) -> None:
    """Bytes per session of tuned state on the device, and sessions per 80 GB."""
    from fluidsrv.pti import apply_delta, delta_nbytes

    base_bytes = sum(t.numel() * t.element_size() for t in [*generator.parameters(), *generator.buffers()])
    say(f"memory {plan.resolution}: base generator {base_bytes:,} bytes (shared by every session)")
    for mode in ("lowrank", "full"):
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        delta = one_step_delta(generator, mode)
        sync(device)
        stored = delta_nbytes(delta)
        measured = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else stored
        began = time.perf_counter()
        tuned = apply_delta(generator, delta)
        sync(device)
        rebuild = 1000 * (time.perf_counter() - began)
        cached = new_tensor_bytes(generator, tuned)
        room = SESSION_MEMORY - base_bytes
        say(f"memory {plan.resolution} {mode}: delta {stored:,} bytes per session (allocator {measured:,}), "
            f"tuned generator of a cached session +{cached:,} bytes (apply_delta {rebuild:.0f} ms on a cache miss)")
        say(f"sessions per 80 GB {plan.resolution} {mode}: {int(room // max(stored, 1)):,} stored deltas, "
            f"{int(room // max(stored + cached, 1)):,} with their tuned generators cached")
        del delta, tuned


# ------------------------------------------------------------------------------------------------ 3. previews


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def drag_sessions(plan: Plan, device: torch.device, renders: list[Callable[[float], Any]]) -> dict[str, Any]:
    """Every session drags a slider at ``plan.rate`` states/s for ``plan.preview_seconds`` through one executor."""
    from fluidsrv.executor import SUPERSEDED, GpuExecutor

    executor = GpuExecutor(device)
    executor.start()
    latencies: list[float] = []
    counts = {"superseded": 0, "errors": 0}
    try:
        await asyncio.gather(*(executor.submit_preview(f"s{i}", 0.0, render) for i, render in enumerate(renders)))

        def record(sent: float) -> Callable[[asyncio.Future[Any]], None]:
            def done(future: asyncio.Future[Any]) -> None:
                if future.cancelled() or future.exception() is not None:
                    counts["errors"] += 1
                elif future.result() is SUPERSEDED:
                    counts["superseded"] += 1
                else:
                    latencies.append(time.perf_counter() - sent)
            return done

        async def drag(index: int, render: Callable[[float], Any], end: float) -> list[asyncio.Future[Any]]:
            futures = []
            await asyncio.sleep(index / len(renders) / plan.rate)  # the sessions' states interleave
            value = 0.0
            while time.perf_counter() < end:
                value = (value + 0.25) % 6.0
                future = executor.submit_preview(f"s{index}", value - 3.0, render)
                future.add_done_callback(record(time.perf_counter()))
                futures.append(future)
                await asyncio.sleep(1.0 / plan.rate)
            return futures

        began = time.perf_counter()
        end = began + plan.preview_seconds
        sent = await asyncio.gather(*(drag(i, render, end) for i, render in enumerate(renders)))
        await asyncio.wait([future for futures in sent for future in futures], timeout=60)
        seconds = time.perf_counter() - began
    finally:
        await executor.shutdown()
    return {"latencies": latencies, "seconds": seconds, "sent": sum(len(f) for f in sent), **counts}


def render_session(renderer: Any, pivot: torch.Tensor, direction: torch.Tensor, value: float) -> Any:
    """One session's preview of slider ``value``: what the service's preview render does (render, to uint8)."""
    from fluidsrv.convert import tensor_to_image

    return tensor_to_image(renderer.render(pivot + value * direction))


def section_previews(plan: Plan, device: torch.device, generator: Generator) -> None:
    """Preview latency of ``plan.sessions`` concurrent sessions through the real executor."""
    from fluidsrv_plugins.preview_generator import GeneratorRenderer

    from fluidsrv.pti import LORA_DOWN, LORA_UP, apply_delta

    template = one_step_delta(generator, "lowrank")
    direction = torch.randn(1, 1, generator.w_dim, device=device)
    direction = direction / direction.norm()
    pivots = random_ws(generator, plan.sessions, seed=11)
    renders: list[Callable[[float], Any]] = []
    for index in range(plan.sessions):
        rng = torch.Generator().manual_seed(100 + index)
        delta = {key: (torch.randn(value.shape, generator=rng) * 1e-3).to(device) if key.endswith(LORA_UP) else value
                 for key, value in template.items() if key.endswith((LORA_UP, LORA_DOWN))}
        renderer = GeneratorRenderer(apply_delta(generator, delta), max_side=512, precision="auto")
        renders.append(functools.partial(render_session, renderer, pivots[index : index + 1], direction))
    result = asyncio.run(drag_sessions(plan, device, renders))
    latencies = [1000 * value for value in result["latencies"]]
    if not latencies:
        say(f"preview {plan.sessions} sessions: no frame arrived ({result})")
        return
    side = min(plan.resolution, 512)
    say(f"preview {plan.sessions} sessions at {plan.rate:g} states/s each, {plan.resolution}² rendered, "
        f"{side}² frames, every tuned generator held: "
        f"p50 {percentile(latencies, 0.5):.0f} ms, p95 {percentile(latencies, 0.95):.0f} ms, "
        f"max {max(latencies):.0f} ms; {len(latencies) / result['seconds']:.1f} frames/s; "
        f"{result['superseded']} of {result['sent']} states superseded, {result['errors']} errors")


# ------------------------------------------------------------------------------------------------ 4. PTI


def section_pti(plan: Plan, device: torch.device, generator: Generator, deadline: Deadline) -> None:
    """PTI seconds per face with the server's defaults, lowrank and full."""
    from fluidsrv.perceptual import finetune_distance
    from fluidsrv.pti import PTIConfig, delta_nbytes, finetune, pti_config
    from fluidsrv.settings import default_cache_dir

    distance = finetune_distance(default_cache_dir(), device)
    target_ws, pivot = random_ws(generator, 1, seed=21), random_ws(generator, 1, seed=22)
    with torch.no_grad():
        target = generator.synthesis(target_ws)  # a reachable "face"

    def run(config: PTIConfig) -> tuple[int, int, float, dict[str, torch.Tensor]]:
        job = finetune(generator, target, pivot, config, distance)
        began, steps, total = time.perf_counter(), 0, config.steps
        while True:
            try:
                progress = next(job)
                steps, total = progress.step, progress.total
            except StopIteration as stop:
                sync(device)
                return steps, total, time.perf_counter() - began, stop.value

    for mode in ("lowrank", "full"):
        left = deadline.left() - (60 if mode == "lowrank" else 30)  # leave the student and the other mode time
        if left < 20:
            say(f"pti {plan.resolution} {mode}: skipped (time guard)")
            continue
        config = pti_config(plan.resolution, mode, steps=plan.pti_steps, distance_name=distance.name, frame_every=0)
        run(PTIConfig(mode=config.mode, steps=plan.pti_warmup, lr=config.lr, frame_every=0))  # allocator, cuDNN
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = min(plan.pti_cap_seconds, left / (2 if mode == "lowrank" else 1))
        steps, _, took, delta = run(pti_config(plan.resolution, mode, steps=plan.pti_steps, distance_name=distance.name,
                                               frame_every=0, seconds=seconds))
        per_step = took / max(steps, 1)
        peak = f", peak {torch.cuda.max_memory_allocated(device) / GB:.2f} GB" if device.type == "cuda" else ""
        cut = "" if steps >= config.steps else f" (time guard {seconds:.0f} s; {config.steps} steps: " \
                                                f"{per_step * config.steps:.1f} s projected)"
        say(f"pti {plan.resolution} {mode}: {took:.1f} s per face, {steps}/{config.steps} steps, "
            f"{1000 * per_step:.0f} ms per step, lr {config.learning_rate:g}, distance {distance.name}, "
            f"delta {delta_nbytes(delta):,} bytes{peak}{cut}")


# ------------------------------------------------------------------------------------------------ 5. student


def time_student(generator: Generator, device: torch.device, options: Mapping[str, Any], iterations: int) -> None:
    """Time the student previewer: its fit (distill) on ``generator`` and then the median ms of one preview."""
    try:
        from fluidsrv_plugins.preview_student import StudentPreviewer

        from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR, default_cache_dir
        from fluidsrv.stages import PluginContext
    except Exception as error:  # the student is being written: any import problem means "not available"
        say(f"student: not available ({type(error).__name__}: {error})")
        return
    context = PluginContext(device=device, weights_dir=EMBEDDED_WEIGHTS_DIR, cache_dir=default_cache_dir(),
                            options=dict(options))
    previewer = StudentPreviewer(context)
    reason = previewer.suits(generator)
    if reason is not None:
        say(f"student: not available ({reason})")
        return
    ws = random_ws(generator, 1, seed=31)
    edits = (random_ws(generator, 4, seed=32) - generator.w_avg) * 0.5  # [4, num_ws, w_dim] stand-in sliders
    began = time.perf_counter()
    job = previewer.fit(generator, ws, edits)
    while True:
        try:
            next(job)
        except StopIteration as stop:
            renderer = stop.value
            break
    fit_seconds = time.perf_counter() - began
    times = []
    with torch.inference_mode():
        for index in range(iterations + 2):
            start = time.perf_counter()
            image = renderer.render(ws + 0.1 * index * edits[:1])
            sync(device)
            if index >= 2:
                times.append(time.perf_counter() - start)
    say(f"student {generator.resolution}: preview {1000 * statistics.median(times):.2f} ms "
        f"(median of {len(times)}, {tuple(image.shape[-2:])} frames, {image.dtype}), fit {fit_seconds:.1f} s")


# ------------------------------------------------------------------------------------------------ main


def guarded(name: str, deadline: Deadline, needs: float, run: Callable[[], None]) -> None:
    """Run one section unless fewer than ``needs`` seconds are left; print its error instead of stopping."""
    if deadline.left() < needs:
        say(f"{name}: skipped (time guard: {deadline.left():.0f} s left)")
        return
    began = time.perf_counter()
    try:
        run()
    except Exception as error:
        say(f"{name}: failed ({type(error).__name__}: {error})")
        traceback.print_exc(file=sys.stderr)
    say(f"{name}: section took {time.perf_counter() - began:.1f} s")


def describe(device: torch.device) -> str:
    """One line on the device and torch."""
    if device.type != "cuda":
        return f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(device)
    return (f"device: {props.name} ({props.total_memory / GB:.0f} GB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}, "
            f"TF32 conv {torch.backends.cudnn.allow_tf32} matmul {torch.backends.cuda.matmul.allow_tf32}")


def main(argv: list[str] | None = None) -> int:
    """Run every section within the time guard and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, in seconds (a test runs this)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--budget", type=float, help="the whole run's time guard in seconds (540; smoke 120)")
    parser.add_argument("--sections", default="synthesis,memory,previews,pti,student")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.device == "auto":
        device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    else:
        device = torch.device(args.device)
    deadline = Deadline(args.budget if args.budget is not None else plan.budget)
    wanted = {name.strip() for name in args.sections.split(",")}
    say(describe(device))
    began = time.perf_counter()
    if "synthesis" in wanted:
        guarded("synthesis", deadline, 30, lambda: section_synthesis(plan, device, deadline))
    shared: dict[str, Generator] = {}

    def generator() -> Generator:
        if "g" not in shared:
            shared["g"] = random_generator(plan.config(plan.resolution), device, seed=1)
        return shared["g"]

    if "memory" in wanted:
        guarded("memory", deadline, 20, lambda: section_memory(plan, device, generator()))
    if "previews" in wanted:
        guarded("previews", deadline, plan.preview_seconds + 30, lambda: section_previews(plan, device, generator()))
    if "pti" in wanted:
        guarded("pti", deadline, 40, lambda: section_pti(plan, device, generator(), deadline))
    if "student" in wanted:
        guarded("student", deadline, 20,
                lambda: time_student(generator(), device, plan.student_options, iterations=plan.iterations))
    say(f"total: {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
