"""The single device executor: priorities, fair share, round-robin, coalescing, step jobs, cancellation, OOM."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch

from fluidsrv.executor import SUPERSEDED, ExecutorError, GpuExecutor, Priority, is_out_of_memory
from fluidsrv.stages import Progress

WAIT = 10.0  # seconds; generous upper bound for anything in these tests (they take milliseconds)


@asynccontextmanager
async def running_executor(on_out_of_memory: Callable[[], int] | None = None,
                           **options: Any) -> AsyncIterator[GpuExecutor]:
    executor = GpuExecutor("cpu", on_out_of_memory=on_out_of_memory, **options)
    executor.start()
    try:
        yield executor
    finally:
        await executor.shutdown(timeout=WAIT)


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, WAIT))


async def wait_for_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT), "timed out waiting for the worker"


async def occupy_worker(executor: GpuExecutor, release: threading.Event) -> asyncio.Task[None]:
    """Keep the worker busy until ``release`` is set; return the task of that blocking job."""
    started = threading.Event()

    def block() -> None:
        started.set()
        release.wait(WAIT)

    task = asyncio.create_task(executor.run(block, priority=Priority.ENCODE, owner="blocker"))
    await wait_for_event(started)
    return task


def counting_job(steps: int, log: list[str], name: str,
                 before_step: Callable[[int], None] | None = None) -> Generator[Progress, None, str]:
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        log.append(f"{name}{step}")
        yield Progress(stage=name, step=step + 1, total=steps)
    return f"{name} done"


def test_run_executes_on_the_worker_thread_and_returns_the_result() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            worker = await executor.run(threading.get_ident, priority=Priority.FINALIZE)
            assert worker != threading.get_ident()
            total = await executor.run(lambda: int(torch.arange(5).sum()), priority=Priority.PREVIEW)
            assert total == 10

    run(scenario())


def test_only_the_newest_of_a_burst_of_previews_renders() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            rendered: list[tuple[str, int]] = []

            def render_for(owner: str) -> Callable[[int], str]:
                def render(state: int) -> str:
                    rendered.append((owner, state))
                    return f"{owner}:{state}"
                return render

            release = threading.Event()
            blocker = await occupy_worker(executor, release)
            burst_a = [executor.submit_preview("a", state, render_for("a")) for state in range(10)]
            burst_b = [executor.submit_preview("b", state, render_for("b")) for state in range(3)]
            assert executor.stats().queued == 2  # one pending preview per owner
            release.set()
            await blocker
            results_a = await asyncio.gather(*burst_a)
            results_b = await asyncio.gather(*burst_b)

            assert results_a == [SUPERSEDED] * 9 + ["a:9"]
            assert results_b == [SUPERSEDED] * 2 + ["b:2"]
            assert sorted(rendered) == [("a", 9), ("b", 2)]
            stats = executor.stats()
            assert stats.previews_coalesced == 11
            assert stats.previews_rendered == 2

    run(scenario())


def test_a_preview_after_a_started_preview_is_queued_not_coalesced() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            rendering, release = threading.Event(), threading.Event()

            def slow_render(state: int) -> int:
                rendering.set()
                release.wait(WAIT)
                return state

            first = executor.submit_preview("a", 1, slow_render)
            await wait_for_event(rendering)
            second = executor.submit_preview("a", 2, lambda state: state)
            release.set()
            assert await first == 1  # already running: it cannot be superseded
            assert await second == 2

    run(scenario())


def test_queued_jobs_run_by_priority_then_arrival() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            order: list[str] = []
            release = threading.Event()
            blocker = await occupy_worker(executor, release)
            encode = executor.run(lambda: order.append("encode"), priority=Priority.ENCODE)
            finetune = executor.run(lambda: order.append("finetune"), priority=Priority.FINETUNE)
            finalize = executor.run(lambda: order.append("finalize"), priority=Priority.FINALIZE)
            tasks = [asyncio.ensure_future(coroutine) for coroutine in (encode, finetune, finalize)]
            await asyncio.sleep(0)  # let the tasks enqueue in this order
            preview = executor.submit_preview("a", "p", lambda state: order.append("preview"))
            release.set()
            await asyncio.gather(blocker, preview, *tasks)
            # interactive jobs (the preview, then the finalize of the same owner) against the long ones by their
            # share; the long ones in arrival order (ENCODE and FINETUNE are one rank)
            assert order[0] == "preview" and sorted(order) == ["encode", "finalize", "finetune", "preview"]
            assert order.index("encode") < order.index("finetune")

    run(scenario())


def test_a_preview_overtakes_a_running_step_job_at_its_next_step() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            log: list[str] = []
            in_first_step, preview_queued = threading.Event(), threading.Event()

            def before_step(step: int) -> None:
                if step == 0:
                    in_first_step.set()
                    assert preview_queued.wait(WAIT)

            job = asyncio.create_task(executor.run_job(
                lambda: counting_job(3, log, "encode", before_step), priority=Priority.ENCODE, owner="a"))
            await wait_for_event(in_first_step)
            preview = executor.submit_preview("b", 7, lambda state: log.append(f"preview{state}"))
            preview_queued.set()
            assert await job == "encode done"
            await preview
            assert log == ["encode0", "preview7", "encode1", "encode2"]
            assert executor.stats().steps_run == 3

    run(scenario())


def test_progress_arrives_on_the_event_loop_in_order_before_the_result() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            loop_thread = threading.get_ident()
            received: list[tuple[int, int]] = []
            result = await executor.run_job(
                lambda: counting_job(4, [], "fit"), priority=Priority.FINETUNE, owner="a",
                on_progress=lambda progress: received.append((threading.get_ident(), progress.step)))
            assert result == "fit done"
            assert received == [(loop_thread, step) for step in (1, 2, 3, 4)]

    run(scenario())


def test_cancel_owner_stops_its_running_job_at_a_step_boundary_and_closes_the_generator() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            log: list[str] = []
            closed_on: list[int] = []
            in_second_step, cancelled = threading.Event(), threading.Event()

            def long_job() -> Generator[Progress, None, str]:
                try:
                    for step in range(100):
                        log.append(f"step{step}")
                        if step == 1:
                            in_second_step.set()
                            assert cancelled.wait(WAIT)
                        yield Progress("encode", step + 1, 100)
                    return "finished"
                finally:
                    closed_on.append(threading.get_ident())

            job = asyncio.create_task(executor.run_job(long_job, priority=Priority.ENCODE, owner="gone"))
            queued = asyncio.create_task(
                executor.run(lambda: log.append("never"), priority=Priority.FINETUNE, owner="gone"))
            other = asyncio.create_task(
                executor.run(lambda: "kept", priority=Priority.FINETUNE, owner="staying"))
            await wait_for_event(in_second_step)
            assert executor.cancel_owner("gone") == 2
            cancelled.set()
            with pytest.raises(asyncio.CancelledError):
                await job
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert await other == "kept"
            worker = await executor.run(threading.get_ident, priority=Priority.PREVIEW)

            assert log == ["step0", "step1"]  # the step in flight finished; no further step ran
            assert closed_on == [worker]  # the generator was closed, on the worker thread
            assert executor.stats().jobs_cancelled == 2

    run(scenario())


def test_cancelling_the_awaiting_task_cancels_the_job() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            closed = threading.Event()
            in_step, proceed = threading.Event(), threading.Event()

            def job() -> Generator[Progress, None, None]:
                try:
                    while True:
                        in_step.set()
                        proceed.wait(WAIT)
                        yield Progress("distil", 0, 0)
                finally:
                    closed.set()

            task = asyncio.create_task(executor.run_job(job, priority=Priority.FINETUNE, owner="a"))
            await wait_for_event(in_step)
            task.cancel()
            proceed.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_for_event(closed)

    run(scenario())


def test_out_of_memory_evicts_then_retries_once() -> None:
    async def scenario() -> None:
        evictions: list[str] = []
        attempts: list[int] = []

        def evict() -> int:
            evictions.append("evict")
            return 1234

        def flaky() -> str:
            attempts.append(1)
            if len(attempts) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return "rendered"

        async with running_executor(on_out_of_memory=evict) as executor:
            assert await executor.run(flaky, priority=Priority.FINALIZE, owner="a") == "rendered"
            assert len(attempts) == 2
            assert evictions == ["evict"]
            assert executor.stats().oom_recoveries == 1

    run(scenario())


def test_out_of_memory_twice_fails_with_a_clear_error_and_the_worker_survives() -> None:
    async def scenario() -> None:
        evictions: list[str] = []
        attempts: list[int] = []

        def always_out_of_memory() -> None:
            attempts.append(1)
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate; out of memory")

        def evict() -> int:
            evictions.append("evict")
            return 0

        async with running_executor(on_out_of_memory=evict) as executor:
            with pytest.raises(ExecutorError, match="out of memory") as error:
                await executor.run(always_out_of_memory, priority=Priority.ENCODE, owner="a")
            assert is_out_of_memory(error.value.__cause__ or error.value)
            assert len(attempts) == 2
            assert evictions == ["evict"]
            preview = executor.submit_preview("a", 3, lambda state: state * 2)
            assert await preview == 6

    run(scenario())


def test_a_step_job_that_runs_out_of_memory_is_rebuilt_from_its_factory_once() -> None:
    async def scenario() -> None:
        built: list[int] = []
        evictions: list[int] = []

        def factory() -> Generator[Progress, None, int]:
            built.append(1)
            attempt = len(built)

            def steps() -> Generator[Progress, None, int]:
                yield Progress("encode", 1, 2)
                if attempt == 1:
                    raise torch.OutOfMemoryError("CUDA out of memory")
                yield Progress("encode", 2, 2)
                return attempt

            return steps()

        def always_fails() -> Generator[Progress, None, int]:
            built.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory")
            yield Progress("never", 0, 0)

        def evict() -> int:
            evictions.append(1)
            return 0

        async with running_executor(on_out_of_memory=evict) as executor:
            assert await executor.run_job(factory, priority=Priority.ENCODE, owner="a") == 2
            assert (len(built), len(evictions)) == (2, 1)
            built.clear()
            with pytest.raises(ExecutorError, match="out of memory"):
                await executor.run_job(always_fails, priority=Priority.ENCODE, owner="a")
            assert (len(built), len(evictions)) == (2, 2)

    run(scenario())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_cuda_out_of_memory_error_is_recovered_from() -> None:
    async def scenario() -> None:
        evictions: list[int] = []

        def evict() -> int:
            evictions.append(1)
            return 0

        def allocate_too_much() -> None:
            torch.empty(2**40, dtype=torch.float32, device="cuda")  # 4 TiB

        executor = GpuExecutor("cuda", on_out_of_memory=evict)
        executor.start()
        try:
            baseline = await executor.run(torch.cuda.memory_allocated, priority=Priority.FINALIZE)
            with pytest.raises(ExecutorError, match="out of memory"):
                await executor.run(allocate_too_much, priority=Priority.ENCODE)
            assert evictions == [1]  # evicted once, retried once, then failed
            assert await executor.run(torch.cuda.memory_allocated, priority=Priority.FINALIZE) == baseline
            total = await executor.run(lambda: float(torch.ones(1000, device="cuda").sum()), priority=Priority.PREVIEW)
            assert total == 1000.0
        finally:
            await executor.shutdown(timeout=WAIT)

    run(scenario())


def test_the_worker_survives_every_kind_of_failure() -> None:
    async def scenario() -> None:
        def broken_hook() -> int:
            raise ValueError("hook broke")

        def bad_job() -> Generator[Progress, None, None]:
            yield Progress("encode", 1, 2)
            raise KeyError("missing")

        def not_progress() -> Generator[Any, None, None]:
            yield "not a Progress"

        def raises_base_exception() -> None:
            raise SystemExit(3)

        def out_of_memory() -> None:
            raise torch.OutOfMemoryError("CUDA out of memory")

        def broken_progress_callback(progress: Progress) -> None:
            raise RuntimeError("UI went away")

        async with running_executor(on_out_of_memory=broken_hook) as executor:
            with pytest.raises(ZeroDivisionError):
                await executor.run(lambda: 1 / 0, priority=Priority.FINALIZE)
            with pytest.raises(KeyError):
                await executor.run_job(bad_job, priority=Priority.ENCODE)
            with pytest.raises(TypeError, match="Progress"):
                await executor.run_job(not_progress, priority=Priority.ENCODE)
            with pytest.raises(ExecutorError, match="SystemExit"):
                await executor.run(raises_base_exception, priority=Priority.FINALIZE)
            with pytest.raises(ExecutorError, match="out of memory"):
                await executor.run(out_of_memory, priority=Priority.FINALIZE)
            with pytest.raises(ValueError, match="preview broke"):
                await executor.submit_preview("a", 1, lambda state: (_ for _ in ()).throw(ValueError("preview broke")))
            result = await executor.run_job(lambda: counting_job(2, [], "fit"), priority=Priority.FINETUNE,
                                            on_progress=broken_progress_callback)
            assert result == "fit done"
            assert executor.running
            assert await executor.run(lambda: "still alive", priority=Priority.PREVIEW) == "still alive"
            assert executor.stats().jobs_failed == 6

    run(scenario())


def test_shutdown_cancels_pending_work_closes_generators_and_refuses_new_work() -> None:
    async def scenario() -> None:
        executor = GpuExecutor("cpu")
        executor.start()
        closed, in_step, proceed = threading.Event(), threading.Event(), threading.Event()

        def started_job() -> Generator[Progress, None, None]:
            try:
                while True:
                    in_step.set()
                    proceed.wait(WAIT)
                    yield Progress("encode", 0, 0)
            finally:
                closed.set()

        job = asyncio.create_task(executor.run_job(started_job, priority=Priority.PREVIEW))
        await wait_for_event(in_step)  # the step job has started: it holds an open generator
        queued = asyncio.create_task(executor.run(lambda: None, priority=Priority.ENCODE))
        await asyncio.sleep(0)  # queued behind the running step, never started
        stopping = asyncio.create_task(executor.shutdown(timeout=WAIT))
        await asyncio.sleep(0)  # shutdown has cancelled everything and now joins the worker
        proceed.set()
        await stopping
        for task in (job, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert closed.is_set()
        assert not executor.running
        with pytest.raises(ExecutorError, match="not running"):
            await executor.run(lambda: None, priority=Priority.PREVIEW)

    run(scenario())


# ---- fair share, round-robin, cancel_previews, stats, injected out-of-memory -----------------------


class FakeClock:
    """The executor's clock in fairness tests: it moves only when a test job says it worked, so turn
    lengths are exact (binary fractions, so the credit arithmetic is exact too) and turn order is
    deterministic on a noisy machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def timed_steps(steps: int, turns: list[str], clock: FakeClock, seconds: float) -> Generator[Progress, None, int]:
    for step in range(steps):
        turns.append("L")
        clock.advance(seconds)
        yield Progress(stage="encode", step=step + 1, total=steps)
    return steps


class PreviewLoad:
    """Keeps one preview per owner always queued: each render queues its owner's next one before it ends."""

    def __init__(self, executor: GpuExecutor, owners: int, turns: list[str], clock: FakeClock, seconds: float,
                 limit: int = 200) -> None:
        self.executor, self.turns, self.clock, self.seconds, self.limit = executor, turns, clock, seconds, limit
        self.owners = [f"viewer{index}" for index in range(owners)]
        self.loop = asyncio.get_running_loop()
        self.futures: list[asyncio.Future[Any]] = []
        self.rendered = 0
        self.stopped = False

    def start(self) -> None:
        for owner in self.owners:
            self.futures.append(self.executor.submit_preview(owner, owner, self.render))

    def render(self, owner: str) -> None:
        self.turns.append("P")
        self.rendered += 1
        if self.rendered < self.limit:  # the limit ends a starved run instead of hanging the test
            asyncio.run_coroutine_threadsafe(self.resubmit(owner), self.loop).result(WAIT)
        self.clock.advance(self.seconds)

    async def resubmit(self, owner: str) -> None:
        if not self.stopped:
            self.futures.append(self.executor.submit_preview(owner, owner, self.render))

    async def stop(self) -> None:
        self.stopped = True
        assert SUPERSEDED not in await asyncio.gather(*self.futures)  # each owner's previews were sequential


async def step_job_under_preview_load(share: float, step_seconds: float, preview_seconds: float,
                                      steps: int = 10) -> list[str]:
    """Run a ``steps``-step job of owner "a" while 5 owners keep previews always queued; return the turns."""
    turns: list[str] = []
    clock = FakeClock()
    async with running_executor(long_job_share=share, clock=clock) as executor:
        release = threading.Event()
        blocker = await occupy_worker(executor, release)
        job = asyncio.create_task(executor.run_job(
            lambda: timed_steps(steps, turns, clock, step_seconds), priority=Priority.ENCODE, owner="a"))
        await asyncio.sleep(0)
        load = PreviewLoad(executor, 5, turns, clock, preview_seconds)
        load.start()
        release.set()
        await blocker
        assert await job == steps
        await load.stop()
    return turns


@pytest.mark.parametrize("share", [0.5, 0.25])
def test_a_step_job_gets_its_share_of_turns_while_previews_are_always_waiting(share: float) -> None:
    async def scenario() -> None:
        turns = await step_job_under_preview_load(share, step_seconds=1 / 64, preview_seconds=1 / 64)
        steps = [index for index, turn in enumerate(turns) if turn == "L"]
        gaps = [later - earlier - 1 for earlier, later in itertools.pairwise(steps)]
        expected = round((1 - share) / share)  # previews between two steps when both take equal time
        assert steps[0] == 1, turns  # previews win the first tie; the old scheduler ran all 200 previews first
        assert gaps == [expected] * 9, turns

    run(scenario())


@pytest.mark.parametrize(("share", "step_seconds", "preview_seconds"),
                         [(0.5, 1 / 16, 1 / 64), (0.25, 1 / 128, 1 / 32), (0.75, 1 / 32, 1 / 32)])
def test_long_jobs_time_stays_within_one_turn_of_their_share(share: float, step_seconds: float,
                                                              preview_seconds: float) -> None:
    async def scenario() -> None:
        turns = await step_job_under_preview_load(share, step_seconds, preview_seconds, steps=20)
        long_time = total = 0.0
        last_step = max(index for index, turn in enumerate(turns) if turn == "L")
        for turn in turns[:last_step + 1]:  # while both classes waited
            long_time += step_seconds if turn == "L" else 0.0
            total += step_seconds if turn == "L" else preview_seconds
            assert abs(long_time - share * total) <= max(step_seconds, preview_seconds), turns

    run(scenario())


def test_the_credit_is_clamped_and_forgotten_while_only_one_class_waits() -> None:
    async def scenario() -> None:
        turns: list[str] = []
        clock = FakeClock()
        async with running_executor(long_job_share=0.5, fair_share_window=1 / 16, clock=clock) as executor:
            release = threading.Event()
            blocker = await occupy_worker(executor, release)

            def big_turn() -> None:
                turns.append("BIG")
                clock.advance(1 / 4)

            big = asyncio.create_task(executor.run(big_turn, priority=Priority.ENCODE, owner="f"))
            job = asyncio.create_task(executor.run_job(
                lambda: timed_steps(5, turns, clock, 1 / 64), priority=Priority.ENCODE, owner="a"))
            await asyncio.sleep(0)
            load = PreviewLoad(executor, 5, turns, clock, 1 / 64)
            load.start()
            release.set()
            await asyncio.gather(blocker, big)
            assert await job == 5
            await load.stop()
            assert turns[:2] == ["P", "BIG"]  # the first long job to arrive goes first within the long class
            # BIG left previews owed 1/8 s of credit, clamped to 1/32 (1/16 s of previews): 4 previews repay
            # it, the 5th makes it positive; unclamped the step would wait 16 previews
            assert turns.index("L") - turns.index("BIG") - 1 == 5, turns
            assert -1 / 32 <= executor.stats().long_job_credit <= 1 / 32
            await executor.run(lambda: clock.advance(1 / 16), priority=Priority.ENCODE)  # nothing else waits
            assert executor.stats().long_job_credit == 0.0  # a window of one-class work forgets the history

    run(scenario())


def test_owners_take_turns_within_a_priority() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            order: list[str] = []
            release = threading.Event()
            blocker = await occupy_worker(executor, release)
            tasks = [asyncio.create_task(executor.run(functools.partial(order.append, f"{owner}{index}"),
                                                      priority=Priority.FINALIZE, owner=owner))
                     for owner in "abc" for index in range(3)]
            await asyncio.sleep(0)
            release.set()
            await asyncio.gather(blocker, *tasks)
            assert order == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]

    run(scenario())


def test_two_owners_step_jobs_alternate_while_one_owners_jobs_run_in_order() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            log: list[str] = []
            release = threading.Event()
            blocker = await occupy_worker(executor, release)
            jobs = [asyncio.create_task(executor.run_job(
                        functools.partial(counting_job, steps, log, name), priority=Priority.ENCODE, owner=owner))
                    for name, owner, steps in (("a", "a", 3), ("b", "b", 3), ("x", "a", 2))]
            await asyncio.sleep(0)
            release.set()
            await asyncio.gather(blocker, *jobs)
            assert log == ["a0", "b0", "a1", "b1", "a2", "b2", "x0", "x1"]

    run(scenario())


def test_cancel_previews_drops_only_the_queued_preview_and_leaves_the_step_job_running() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            log: list[str] = []
            in_step, proceed = threading.Event(), threading.Event()

            def before_step(step: int) -> None:
                if step == 0:
                    in_step.set()
                    assert proceed.wait(WAIT)

            job = asyncio.create_task(executor.run_job(
                lambda: counting_job(3, log, "prepare", before_step), priority=Priority.ENCODE, owner="s"))
            await wait_for_event(in_step)
            mine = executor.submit_preview("s", 1, lambda state: log.append(f"s{state}"))
            theirs = executor.submit_preview("t", 2, lambda state: log.append(f"t{state}"))
            assert executor.cancel_previews("s") == 1
            assert executor.cancel_previews("s") == 0
            proceed.set()
            assert await job == "prepare done"
            await theirs
            assert mine.cancelled()
            assert log == ["prepare0", "t2", "prepare1", "prepare2"]

            rendering, release = threading.Event(), threading.Event()

            def slow_render(state: int) -> int:
                rendering.set()
                release.wait(WAIT)
                return state

            started = executor.submit_preview("s", 3, slow_render)
            await wait_for_event(rendering)
            assert executor.cancel_previews("s") == 0  # a started preview is not cancelled
            release.set()
            assert await started == 3

    run(scenario())


def test_stats_split_busy_time_by_class_and_report_the_longest_wait() -> None:
    async def scenario() -> None:
        async with running_executor() as executor:
            release = threading.Event()
            blocker = await occupy_worker(executor, release)
            preview = executor.submit_preview("a", 1, lambda state: time.sleep(0.02))
            await asyncio.sleep(0.05)
            assert executor.stats().max_wait_seconds >= 0.04
            release.set()
            await asyncio.gather(blocker, preview)
            stats = executor.stats()
            assert stats.max_wait_seconds == 0.0
            assert stats.long_job_seconds >= 0.04  # the blocker ran for at least the 0.05 s sleep
            assert stats.preview_seconds >= 0.015
            assert stats.busy_seconds == pytest.approx(stats.preview_seconds + stats.long_job_seconds)

    run(scenario())


def test_long_job_share_is_validated() -> None:
    for share in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="long_job_share"):
            GpuExecutor("cpu", long_job_share=share)


@pytest.mark.parametrize("kind", ["call", "preview", "step"])
def test_an_injected_cuda_out_of_memory_error_is_retried_once_then_fails_only_that_job(kind: str) -> None:
    async def scenario() -> None:
        evictions: list[int] = []
        attempts: list[int] = []

        def evict() -> int:
            evictions.append(1)
            return 0

        def flaky() -> str:
            attempts.append(1)
            if len(attempts) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
            return "ok"

        def always() -> str:
            attempts.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def steps(fn: Callable[[], str]) -> Generator[Progress, None, str]:
            value = fn()
            yield Progress("encode", 1, 1)
            return value

        def submit(fn: Callable[[], str]) -> asyncio.Future[Any]:
            if kind == "call":
                return asyncio.ensure_future(executor.run(fn, priority=Priority.FINALIZE, owner="a"))
            if kind == "preview":
                return executor.submit_preview("a", None, lambda state: fn())
            return asyncio.ensure_future(executor.run_job(
                functools.partial(steps, fn), priority=Priority.FINALIZE, owner="a"))

        async with running_executor(on_out_of_memory=evict) as executor:
            assert await submit(flaky) == "ok"
            assert (len(attempts), len(evictions)) == (2, 1)
            attempts.clear()
            release = threading.Event()
            blocker = await occupy_worker(executor, release)
            doomed = submit(always)
            following = asyncio.ensure_future(executor.run(lambda: "next", priority=Priority.ENCODE, owner="b"))
            await asyncio.sleep(0)
            release.set()
            await blocker
            with pytest.raises(ExecutorError, match="out of memory") as error:
                await doomed
            assert isinstance(error.value.__cause__, torch.cuda.OutOfMemoryError)
            assert await following == "next"
            assert (len(attempts), len(evictions)) == (2, 2)
            stats = executor.stats()
            assert (stats.oom_recoveries, stats.jobs_failed) == (2, 1)
            assert executor.running

    run(scenario())


def test_a_finalize_takes_its_turn_among_other_sessions_previews() -> None:
    async def scenario() -> None:
        turns: list[str] = []
        clock = FakeClock()
        async with running_executor(clock=clock) as executor:
            release = threading.Event()
            blocker = await occupy_worker(executor, release)
            load = PreviewLoad(executor, 5, turns, clock, 1 / 64)
            load.start()

            def finalize() -> None:
                turns.append("F")
                clock.advance(1 / 64)

            done = [asyncio.create_task(executor.run(finalize, priority=Priority.FINALIZE, owner="f"))
                    for _ in range(3)]
            release.set()
            await asyncio.gather(blocker, *done)
            await load.stop()
            finals = [index for index, turn in enumerate(turns) if turn == "F"]
            # one turn per owner in rotation: between two finalizes of "f", each of the 5 viewers renders once
            assert finals[0] <= 5 and all(later - earlier == 6 for earlier, later in itertools.pairwise(finals)), turns

    run(scenario())
