"""Fitting a step-wise job into a time budget: time its first steps, then fix how many steps it runs.

Only the job's own time counts (the caller times each step from its start to the ``yield`` that ends it), so
work that the device worker runs between two steps (other sessions' previews) never shortens a job. The first
step is timed but not used for the per-step estimate (it pays one-off costs: allocator growth, cuDNN algorithm
search, lazy imports).
"""

from __future__ import annotations

import math

PROBE_STEPS = 3
"""Steps after the first whose mean time sets the per-step estimate."""


class StepBudget:
    """How many of at most ``steps`` steps fit in ``seconds`` (None: all of them), decided after the probe."""

    def __init__(self, steps: int, seconds: float | None, probe: int = PROBE_STEPS) -> None:
        if steps < 1 or probe < 1 or (seconds is not None and seconds <= 0):
            raise ValueError("steps and probe must be >= 1 and seconds positive (or None)")
        self.steps = steps  # the most steps the job may run
        self.seconds = seconds  # the job's own time it may take; None = unbounded
        self.probe = probe
        self.total = steps  # the chosen step count (final once ``decided``)
        self.decided = seconds is None
        self.elapsed = 0.0  # seconds the recorded steps took
        self._probe_times: list[float] = []

    def record(self, step: int, seconds: float) -> None:
        """Note that step ``step`` (1-based) took ``seconds``; updates :attr:`total`."""
        self.elapsed += seconds
        if self.seconds is None:
            return
        if step > 1 and not self.decided:
            self._probe_times.append(seconds)
        if not self.decided and len(self._probe_times) >= self.probe:
            per_step = sum(self._probe_times) / len(self._probe_times)
            more = math.floor(max(0.0, self.seconds - self.elapsed) / max(per_step, 1e-9))
            self.total = max(step, min(self.steps, step + more))
            self.decided = True
        if self.elapsed >= self.seconds:  # a hard bound, also while probing (a step far slower than the first ones)
            self.total = step
            self.decided = True

    def done(self, step: int) -> bool:
        """Whether the job ends after step ``step``."""
        return step >= self.total
