"""Admission to the expensive jobs: at most ``limit`` run at once, the rest wait in line and know their place.

Preparing a face is the longest job on the one device worker. Running many at once only makes each of them
slower (their steps interleave), so :class:`AdmissionQueue` lets ``limit`` in and queues the rest first-come
first-served; every waiter is told its place (how many are ahead of it) whenever it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

OnPlace = Callable[[int], None]
"""Told how many jobs are ahead of a waiter (its queue position, 1 = next)."""


@dataclass(eq=False)
class _Waiter:
    admitted: asyncio.Future[None]
    on_place: OnPlace
    told: int = field(default=-1)


class AdmissionQueue:
    """Lets at most ``limit`` holders in at once; the others wait first-come first-served (on the event loop)."""

    def __init__(self, limit: int) -> None:
        assert limit >= 1
        self.limit = limit
        self._running = 0
        self._waiting: list[_Waiter] = []

    @property
    def running(self) -> int:
        """How many holders are inside now."""
        return self._running

    @property
    def waiting(self) -> int:
        """How many wait in line."""
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def admit(self, on_place: OnPlace) -> AsyncIterator[None]:
        """Wait for a place (``on_place(n)`` tells the position while waiting), hold it for the ``with`` block."""
        if self._running < self.limit and not self._waiting:
            self._running += 1
        else:
            waiter = _Waiter(asyncio.get_running_loop().create_future(), on_place)
            self._waiting.append(waiter)
            self._tell_places()
            try:
                await waiter.admitted  # the releaser counted us in before waking us
            except BaseException:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                    self._tell_places()
                elif waiter.admitted.done() and not waiter.admitted.cancelled():
                    self._release()  # admitted and cancelled in the same tick: hand the place on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self._running -= 1
        while self._waiting and self._running < self.limit:
            waiter = self._waiting.pop(0)
            if waiter.admitted.done():
                continue
            self._running += 1
            waiter.admitted.set_result(None)
        self._tell_places()

    def _tell_places(self) -> None:
        for place, waiter in enumerate(self._waiting, start=1):
            if waiter.told != place:
                waiter.told = place
                waiter.on_place(place)
