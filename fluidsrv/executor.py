"""The single device executor: one worker thread owns the GPU (or CPU); the event loop never blocks.

Every piece of model work goes through one :class:`GpuExecutor`. Async code submits work and awaits an
``asyncio.Future``; the worker thread runs one *turn* at a time, always picking the most urgent job:

- ``await run(fn, ...)`` runs a short callable once (e.g. decode + detect, a finalize render).
- ``await run_job(job_factory, ...)`` drives a step-wise job (a :data:`fluidsrv.stages.StepJob`
  generator): the worker runs ONE step per turn and puts the job back in the queue, so a preview
  submitted meanwhile is rendered before the job's next step. Each yielded :class:`Progress` is
  handed to ``on_progress`` on the event loop.
- ``submit_preview(owner, state, render)`` renders ``render(state)``; previews of one owner coalesce:
  while a preview of that owner still waits in the queue, a newer one replaces its state and the
  older future resolves to :data:`SUPERSEDED` (not an error), so only the newest slider state renders.

Order: at every turn boundary the worker first takes a cancelled job (to close it), else picks a
*class*, then a job within it:

- Two classes: *interactive* jobs (``Priority.PREVIEW`` and ``Priority.FINALIZE``: what a person waits
  on after a gesture or a click) and *long jobs* (``Priority.ENCODE`` / ``FINETUNE``: preparing a face;
  calls and step jobs alike). When only one class has waiting jobs it gets the whole worker. When both
  wait, long jobs get ``long_job_share`` of the worker's time and interactive jobs the rest, each turn
  timed with ``clock`` (``time.perf_counter``): the executor keeps a *credit* for the long class; a
  contested turn of ``t`` seconds adds ``long_job_share * t`` to it and, when it was a long job's turn,
  subtracts ``t``. A long job runs when the credit is positive, an interactive one otherwise (they win
  ties). The credit is clamped to ``[-long_job_share, 1 - long_job_share] * fair_share_window``, so after
  one long turn either class catches up alone for at most ``fair_share_window`` (1 s) of its own work;
  turns run while only one class waits move the credit back to zero at that same rate, so history older
  than about the window is forgotten and a class that sat idle cannot monopolise the worker later.
- Within the interactive class, owners take turns whatever the priority (the owner whose last interactive
  turn started longest ago first; then PREVIEW before FINALIZE; then first-come), so one session's
  finalize waits for at most one preview of each other session, and a session that finalizes back to
  back gets one turn in N + 1 rather than half the worker. Within the long class: lower priority first,
  then the owner served longest ago, then first-come. Either way three owners' queued calls run
  A, B, C, A, B, C, two owners' step jobs alternate steps, and one owner's jobs run in arrival order.
  The last turn of at most 4096 (class, owner) pairs is kept.

Cancellation: ``cancel_owner(owner)`` (a client left) and cancelling the awaiting task both cancel
the job's future; a running step job stops at its next step boundary and its generator is closed
(its ``finally`` blocks run on the worker thread, where its tensors live). ``cancel_previews(owner)``
cancels only the owner's queued, not yet started preview and leaves its other jobs alone.

Out of memory: when a job raises ``torch.OutOfMemoryError`` (or a ``RuntimeError`` saying "out of
memory"), the worker calls ``on_out_of_memory()`` (the session store spills idle sessions), empties
the CUDA cache and retries once: a callable or preview is called again, a step job is rebuilt from
its factory and restarts from its first step. A second failure fails the job with
``ExecutorError("out of memory ...")``. No exception ever stops the worker: it fails that job only.

Threading: the submit methods, ``cancel_owner``, ``cancel_previews`` and ``shutdown`` are called
on the event loop thread; ``stats()`` may be called from anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import torch

from fluidsrv.stages import Progress, StepJob

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")

_OWNER_MEMORY: Final = 4096  # (priority, owner) pairs whose last turn is remembered; the oldest go first

Owner = str
"""Who a job belongs to: a session id. ``cancel_owner`` and preview coalescing work per owner."""


class Priority(enum.IntEnum):
    """Job priorities; a lower value runs first: preview > finalize > encode / fine-tune."""

    PREVIEW = 0
    FINALIZE = 1
    ENCODE = 2
    FINETUNE = 2  # same rank as ENCODE (an alias): encode, fine-tune and distil queue first-come first-served


class Superseded(enum.Enum):
    """The result of a preview that a newer preview of the same owner replaced before it ran."""

    PREVIEW = "superseded"


SUPERSEDED: Final = Superseded.PREVIEW
"""What a coalesced-away preview future resolves to (compare with ``is``)."""


class ExecutorError(RuntimeError):
    """The executor could not run a job: it is not running, or the device ran out of memory."""


@dataclass(frozen=True)
class ExecutorStats:
    """A snapshot of the executor's counters (for /api and benchmarks)."""

    queued: int  # jobs waiting in the queue (the running one not included)
    running: bool  # whether the worker is inside a turn right now
    jobs_completed: int  # jobs whose future received a result (previews included)
    jobs_failed: int  # jobs whose future received an exception
    jobs_cancelled: int  # jobs dropped because their owner left or their future was cancelled
    steps_run: int  # steps of step jobs run
    previews_rendered: int
    previews_coalesced: int  # queued previews replaced by a newer one of the same owner
    oom_recoveries: int  # times on_out_of_memory ran before a retry
    busy_seconds: float  # wall time the worker spent running turns
    preview_seconds: float = 0.0  # the part of busy_seconds spent on interactive jobs (previews and finalize)
    long_job_seconds: float = 0.0  # the part spent on long jobs (encode, fine-tune)
    max_wait_seconds: float = 0.0  # longest a queued job has been waiting for its next turn right now
    long_job_credit: float = 0.0  # the fair-share credit of long jobs (seconds; see the module docstring)


def is_out_of_memory(error: BaseException) -> bool:
    """Return whether ``error`` is a device out-of-memory error (CUDA, MPS or CPU allocator)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class _Job:
    """One queued piece of work; a subclass defines what one turn on the worker does."""

    def __init__(self, priority: Priority, owner: Owner | None, loop: asyncio.AbstractEventLoop) -> None:
        self.priority = priority
        self.owner = owner
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.seq = 0  # first-come order, set by the executor when first queued
        self.waiting_since = 0.0  # the executor's clock when it last entered the queue
        self.started = False  # the worker has taken it at least once (set under the executor lock)
        self.cancelled = False  # stop at the next turn boundary

    def turn(self, executor: GpuExecutor) -> tuple[bool, Any]:
        """Run one turn on the worker; return (finished, result)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the job holds (a step job's generator); runs on the worker thread."""


class _CallJob(_Job):
    """A short callable, run once."""

    def __init__(self, fn: Callable[[], Any], priority: Priority, owner: Owner | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(priority, owner, loop)
        self.fn = fn

    def turn(self, executor: GpuExecutor) -> tuple[bool, Any]:
        """Call the function (with one retry after out-of-memory)."""
        return True, executor._call_with_oom_retry(self.fn, self)


class _PreviewJob(_Job):
    """A preview render; its state, render function and future are replaced while it waits."""

    def __init__(self, state: Any, render: Callable[[Any], Any], owner: Owner,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(Priority.PREVIEW, owner, loop)
        self.state = state
        self.render = render

    def turn(self, executor: GpuExecutor) -> tuple[bool, Any]:
        """Render the newest state (with one retry after out-of-memory)."""
        state, render = self.state, self.render  # frozen: a started preview is never coalesced into
        result = executor._call_with_oom_retry(lambda: render(state), self)
        executor._count(previews_rendered=1)
        return True, result


class _StepJobRunner(_Job):
    """A step-wise job: one generator step per turn, rebuilt from its factory once after out-of-memory."""

    def __init__(self, factory: Callable[[], StepJob[Any]], on_progress: Callable[[Progress], None] | None,
                 priority: Priority, owner: Owner | None, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(priority, owner, loop)
        self.factory = factory
        self.on_progress = on_progress
        self.generator: StepJob[Any] | None = None
        self.retried_after_oom = False

    def turn(self, executor: GpuExecutor) -> tuple[bool, Any]:
        """Run the next step; finished when the generator returns."""
        out_of_memory = False
        try:
            if self.generator is None:
                self.generator = self.factory()
            progress = next(self.generator)
        except StopIteration as stop:
            self.generator = None
            return True, stop.value
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if self.retried_after_oom:
                raise executor._out_of_memory_error(self) from error
            out_of_memory = True
        if out_of_memory:  # recover outside the except block so the traceback's tensors can be freed
            self.close()
            self.retried_after_oom = True
            executor._recover_from_oom(self)
            return False, None  # re-queued: the next turn rebuilds the job from its factory
        if not isinstance(progress, Progress):
            raise TypeError(f"a step job must yield Progress, got {type(progress).__name__}")
        executor._count(steps_run=1)
        if self.on_progress is not None:
            _call_on_loop(self.loop, functools.partial(self._deliver_progress, progress))
        return False, None

    def _deliver_progress(self, progress: Progress) -> None:
        """Hand one progress report to the callback (on the event loop)."""
        if self.cancelled or self.future.done() or self.on_progress is None:
            return
        try:
            self.on_progress(progress)
        except Exception:
            logger.exception("on_progress callback of a %s job failed", self.priority.name.lower())

    def close(self) -> None:
        """Close the generator, running its ``finally`` blocks."""
        generator, self.generator = self.generator, None
        if generator is not None:
            try:
                generator.close()
            except Exception:
                logger.exception("closing a cancelled step job raised")


def _is_long(job: _Job) -> bool:
    """Whether a job is of the long class (encode, fine-tune: preparing a face) rather than interactive."""
    return job.priority >= Priority.ENCODE


def _call_on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop``: right away when already on it, else thread-safely soon."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        callback()
        return
    with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed, nobody is waiting any more
        loop.call_soon_threadsafe(callback)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _cancel(future: asyncio.Future[Any]) -> None:
    future.cancel()


class GpuExecutor:
    """Runs all device work on one worker thread, most urgent first; see the module docstring."""

    def __init__(self, device: torch.device | str = "cpu",
                 on_out_of_memory: Callable[[], int] | None = None, *,
                 long_job_share: float = 0.5, fair_share_window: float = 1.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0.0 < long_job_share < 1.0:
            raise ValueError(f"long_job_share must be between 0 and 1, not {long_job_share!r}")
        if not fair_share_window > 0.0:
            raise ValueError(f"fair_share_window must be positive, not {fair_share_window!r}")
        self.device = torch.device(device)
        self._on_out_of_memory = on_out_of_memory
        self._long_job_share = long_job_share
        self._clock = clock  # seconds; tests pass a fake one to count turns without wall-time noise
        self._credit_bounds = (-long_job_share * fair_share_window, (1.0 - long_job_share) * fair_share_window)
        self._credit = 0.0  # long jobs' fair-share credit in seconds; see the module docstring
        self._turns = 0
        self._last_served: dict[tuple[bool, Owner | None], int] = {}  # (long class?, owner); oldest turn first
        self._lock = threading.Condition()
        self._queue: list[_Job] = []  # small (about one preview per client plus a few jobs): a list and min()
        self._pending_previews: dict[Owner, _PreviewJob] = {}  # queued, not yet started
        self._current: _Job | None = None
        self._next_seq = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counters = dict.fromkeys(
            ("jobs_completed", "jobs_failed", "jobs_cancelled", "steps_run", "previews_rendered",
             "previews_coalesced", "oom_recoveries"), 0)
        self._busy_seconds = 0.0
        self._preview_seconds = 0.0
        self._long_job_seconds = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                if self._stopping:
                    raise ExecutorError("a shut-down executor cannot be restarted")
                return
            self._thread = threading.Thread(target=self._work, name="fluidsrv-device", daemon=True)
            self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel every queued and running job, close their generators and join the worker thread."""
        with self._lock:
            thread, already_stopping = self._thread, self._stopping
            self._stopping = True
            doomed = [] if already_stopping else self._mark_cancelled_locked(lambda job: True)
            self._lock.notify_all()
        for job in doomed:
            _call_on_loop(job.loop, functools.partial(_cancel, job.future))
        if thread is not None and thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
            if thread.is_alive():
                logger.warning("the device worker did not stop within %.0f s (a step is still running)", timeout)

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive and accepting work."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- submitting work ---------------------------------------------------------------------

    async def run(self, fn: Callable[[], T], *, priority: Priority, owner: Owner | None = None) -> T:
        """Run the short callable ``fn`` on the worker and return its result (or raise its exception)."""
        job = _CallJob(fn, priority, owner, asyncio.get_running_loop())
        self._enqueue(job)
        result: T = await job.future
        return result

    async def run_job(self, job_factory: Callable[[], StepJob[T]], *, priority: Priority,
                      owner: Owner | None = None, on_progress: Callable[[Progress], None] | None = None) -> T:
        """Drive the step job ``job_factory()`` one step per turn; return the generator's return value.

        ``job_factory`` is called on the worker thread (again, once, after an out-of-memory error);
        ``on_progress`` receives each yielded :class:`Progress` on the event loop, in order, before the
        result arrives. Raises ``asyncio.CancelledError`` when the owner is cancelled.
        """
        job = _StepJobRunner(job_factory, on_progress, priority, owner, asyncio.get_running_loop())
        self._enqueue(job)
        result: T = await job.future
        return result

    def submit_preview(self, owner: Owner, state: S, render: Callable[[S], T]) -> asyncio.Future[T | Superseded]:
        """Queue ``render(state)`` at preview priority, replacing ``owner``'s still-queued preview.

        Returns a future of the render result, or of :data:`SUPERSEDED` when a newer preview of the
        same owner replaced this one before it started. Call on the event loop thread.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_running_locked()
            pending = self._pending_previews.get(owner)
            if pending is not None and not pending.started and not pending.cancelled and pending.loop is loop:
                superseded = pending.future
                pending.state, pending.render = state, render
                pending.future = loop.create_future()
                pending.future.add_done_callback(functools.partial(self._on_future_done, pending))
                self._counters["previews_coalesced"] += 1
                future: asyncio.Future[Any] = pending.future
            else:
                job = _PreviewJob(state, render, owner, loop)
                self._enqueue_locked(job)
                self._pending_previews[owner] = job
                future = job.future
                superseded = None
        if superseded is not None:
            _set_result(superseded, SUPERSEDED)
        return future

    def cancel_owner(self, owner: Owner) -> int:
        """Cancel every queued and running job of ``owner`` (a closed client); return how many.

        Their futures are cancelled now; a running step job stops at its next step boundary and its
        generator is closed on the worker thread.
        """
        with self._lock:
            doomed = self._mark_cancelled_locked(lambda job: job.owner == owner)
            self._lock.notify_all()
        for job in doomed:
            _call_on_loop(job.loop, functools.partial(_cancel, job.future))
        return len(doomed)

    def cancel_previews(self, owner: Owner) -> int:
        """Cancel ``owner``'s queued, not yet started preview (its other jobs stay); return how many."""
        with self._lock:
            doomed = self._mark_cancelled_locked(
                lambda job: isinstance(job, _PreviewJob) and job.owner == owner and not job.started)
        for job in doomed:
            _call_on_loop(job.loop, functools.partial(_cancel, job.future))
        return len(doomed)

    def stats(self) -> ExecutorStats:
        """Return a snapshot of the queue and the counters."""
        with self._lock:
            now = self._clock()
            waits = [now - job.waiting_since for job in self._queue if not job.cancelled]
            return ExecutorStats(queued=len(self._queue), running=self._current is not None,
                                 busy_seconds=self._busy_seconds, preview_seconds=self._preview_seconds,
                                 long_job_seconds=self._long_job_seconds, max_wait_seconds=max(waits, default=0.0),
                                 long_job_credit=self._credit, **self._counters)

    # ---- queue (callers hold self._lock) -------------------------------------------------------

    def _check_running_locked(self) -> None:
        if self._thread is None or self._stopping or not self._thread.is_alive():
            raise ExecutorError("the device executor is not running")

    def _enqueue(self, job: _Job) -> None:
        with self._lock:
            self._check_running_locked()
            self._enqueue_locked(job)

    def _enqueue_locked(self, job: _Job) -> None:
        job.seq = self._next_seq
        self._next_seq += 1
        job.future.add_done_callback(functools.partial(self._on_future_done, job))
        job.waiting_since = self._clock()
        self._queue.append(job)
        self._lock.notify()

    def _pop_next_locked(self) -> tuple[_Job, bool]:
        """Take the next job (see "Order" in the module docstring); return it and whether both classes waited."""
        cancelled = [job for job in self._queue if job.cancelled]
        interactive = [job for job in self._queue if not job.cancelled and not _is_long(job)]
        long_jobs = [job for job in self._queue if not job.cancelled and _is_long(job)]
        contested = bool(interactive and long_jobs)
        if cancelled:
            job = min(cancelled, key=lambda j: j.seq)
        elif long_jobs and (not interactive or self._credit > 0.0):
            job = min(long_jobs, key=lambda j: (int(j.priority), self._last_served.get((True, j.owner), -1), j.seq))
        else:  # owners take turns whatever the priority: a finalize is not starved by other sessions' previews
            job = min(interactive, key=lambda j: (self._last_served.get((False, j.owner), -1), int(j.priority), j.seq))
        self._queue.remove(job)
        job.started = True
        self._forget_pending_preview_locked(job)
        if not job.cancelled:
            self._turns += 1
            key = (_is_long(job), job.owner)
            self._last_served.pop(key, None)
            self._last_served[key] = self._turns  # re-inserted: the dict stays ordered oldest turn first
            if len(self._last_served) > _OWNER_MEMORY:
                del self._last_served[next(iter(self._last_served))]
        return job, contested

    def _account_locked(self, job: _Job, seconds: float, contested: bool) -> None:
        """Add one turn's time to its class and move the long jobs' fair-share credit."""
        long_job = _is_long(job)
        self._busy_seconds += seconds
        if long_job:
            self._long_job_seconds += seconds
        else:
            self._preview_seconds += seconds
        share, credit = self._long_job_share, self._credit
        if contested:
            credit += share * seconds - (seconds if long_job else 0.0)
        elif credit < 0.0:  # uncontested: forget history at the rate it would be repaid
            credit = min(0.0, credit + share * seconds)
        else:
            credit = max(0.0, credit - (1.0 - share) * seconds)
        low, high = self._credit_bounds
        self._credit = min(max(credit, low), high)

    def _forget_pending_preview_locked(self, job: _Job) -> None:
        """Stop offering ``job`` for coalescing (it started or was cancelled)."""
        owner = job.owner
        if isinstance(job, _PreviewJob) and owner is not None and self._pending_previews.get(owner) is job:
            del self._pending_previews[owner]

    def _mark_cancelled_locked(self, select: Callable[[_Job], bool]) -> list[_Job]:
        """Flag the selected jobs cancelled; drop the never-started ones from the queue; return them all."""
        candidates = [*self._queue, *([self._current] if self._current is not None else [])]
        doomed = [job for job in candidates if not job.cancelled and select(job)]
        for job in doomed:
            job.cancelled = True
            self._counters["jobs_cancelled"] += 1
            if not job.started:
                self._queue.remove(job)
            self._forget_pending_preview_locked(job)
        return doomed

    def _on_future_done(self, job: _Job, future: asyncio.Future[Any]) -> None:
        """When an awaiting task is cancelled its future is too: stop the job (on the loop thread)."""
        if future.cancelled() and future is job.future:
            with self._lock:
                self._mark_cancelled_locked(lambda candidate: candidate is job)

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counters[name] += value

    # ---- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        """The worker thread: take the most urgent job, run one turn, re-queue it if unfinished."""
        if self.device.type == "cuda" and self.device.index is not None:
            try:
                torch.cuda.set_device(self.device)
            except Exception:  # jobs will fail one by one with the real error; the worker stays up
                logger.exception("could not select %s on the device worker", self.device)
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if not self._queue:
                    return  # stopping, and every cancelled job has been closed
                job, contested = self._pop_next_locked()
                self._current = job
            began = self._clock()
            outcome = self._run_turn(job)
            ended = self._clock()
            with self._lock:
                self._current = None
                self._account_locked(job, ended - began, contested)
                if outcome is None:  # keeps its seq (first-come order); if cancelled meanwhile, it is
                    job.waiting_since = ended  # taken first next time and closed
                    self._queue.append(job)
            if outcome is not None:  # resolved after the accounting, so stats() already counts it
                _call_on_loop(job.loop, outcome)

    def _run_turn(self, job: _Job) -> Callable[[], None] | None:
        """Run one turn of ``job``; return what resolves its future when it ended (None: unfinished); never raises."""
        if job.cancelled:
            job.close()
            return functools.partial(_cancel, job.future)
        try:
            finished, result = job.turn(self)
        except BaseException as error:
            job.close()
            if not isinstance(error, Exception) or isinstance(error, StopIteration):
                wrapped = ExecutorError(f"a {job.priority.name.lower()} job raised {type(error).__name__}: {error}")
                wrapped.__cause__ = error
                error = wrapped
            logger.debug("a %s job failed", job.priority.name.lower(), exc_info=error)
            self._count(jobs_failed=1)
            return functools.partial(_set_exception, job.future, error)
        if not finished:
            return None
        self._count(jobs_completed=1)
        return functools.partial(_set_result, job.future, result)

    # ---- out of memory (worker thread) -------------------------------------------------------

    def _call_with_oom_retry(self, fn: Callable[[], T], job: _Job) -> T:
        """Call ``fn``; after an out-of-memory error free memory and call it once more."""
        try:
            return fn()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
        self._recover_from_oom(job)  # outside the except block: the failed call's frames are gone
        try:
            return fn()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            raise self._out_of_memory_error(job) from error

    def _recover_from_oom(self, job: _Job) -> None:
        """Ask the session store to spill idle sessions, collect garbage and empty the CUDA cache."""
        freed = 0
        if self._on_out_of_memory is not None:
            try:
                freed = self._on_out_of_memory()
            except Exception:
                logger.exception("the on_out_of_memory hook failed")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._count(oom_recoveries=1)
        logger.warning("out of memory on %s in a %s job of %s: freed %d bytes of idle sessions, retrying once",
                       self.device, job.priority.name.lower(), job.owner, freed)

    def _out_of_memory_error(self, job: _Job) -> ExecutorError:
        return ExecutorError(
            f"out of memory on {self.device} while running a {job.priority.name.lower()} job, even after "
            "evicting idle sessions and retrying once; try again later or with a smaller image")
