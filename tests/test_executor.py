"""The single device executor: priorities, preview coalescing, step jobs, cancellation, out-of-memory."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch

from fluidsrv.executor import SUPERSEDED, ExecutorError, GpuExecutor, Priority, is_out_of_memory
from fluidsrv.stages import Progress

WAIT = 10.0  # seconds; generous upper bound for anything in these tests (they take milliseconds)


@asynccontextmanager
async def running_executor(on_out_of_memory: Callable[[], int] | None = None) -> AsyncIterator[GpuExecutor]:
    executor = GpuExecutor("cpu", on_out_of_memory=on_out_of_memory)
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
            assert order == ["preview", "finalize", "encode", "finetune"]

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
        closed = threading.Event()
        release = threading.Event()
        blocker = await occupy_worker(executor, release)

        def started_job() -> Generator[Progress, None, None]:
            try:
                while True:
                    yield Progress("encode", 0, 0)
            finally:
                closed.set()

        job = asyncio.create_task(executor.run_job(started_job, priority=Priority.PREVIEW))
        queued = asyncio.create_task(executor.run(lambda: None, priority=Priority.ENCODE))
        await asyncio.sleep(0)
        release.set()
        await blocker
        while executor.stats().steps_run == 0:  # let the step job start so it holds an open generator
            await asyncio.sleep(0.001)
        await executor.shutdown(timeout=WAIT)
        for task in (job, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert closed.is_set()
        assert not executor.running
        with pytest.raises(ExecutorError, match="not running"):
            await executor.run(lambda: None, priority=Priority.PREVIEW)

    run(scenario())
