"""Bounded decoding: how many pixels are being decoded at once (server-wide), and per client each minute.

A small compressed file can hold a huge image (a 157 KB PNG of 49 Mpx costs seconds of CPU and ~270 MB to
decode). :class:`PixelBudget` is a semaphore counted in pixels: an upload reserves its width × height before
its pixels are decoded and holds it while faces are found, so the memory of concurrent decodes stays bounded
however many arrive at once (the rest wait in line, first come first served). :class:`ClientPixelBudget`
bounds what one client address may make the server decode per minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image

from fluidsrv.errors import UserError
from fluidsrv.image_io import SUPPORTED_FORMATS


def probe_pixels(data: bytes) -> int:
    """The pixel count an image's header declares (no pixel is decoded); 0 when the header is unreadable."""
    try:
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as image:
            width, height = image.size
            return max(0, int(width)) * max(0, int(height))
    except Exception:  # the decoder reports the real problem with its own clear error
        return 0


@dataclass(eq=False)
class _Waiter:
    cost: int
    granted: asyncio.Future[None]


class PixelBudget:
    """A first-come first-served semaphore of ``total`` pixels (an image larger than the total runs alone)."""

    def __init__(self, total: int) -> None:
        assert total >= 1
        self.total = total
        self.in_use = 0
        self.peak = 0  # the most pixels ever reserved at once
        self._waiting: list[_Waiter] = []

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block, waiting in line until they are free."""
        cost = min(max(1, pixels), self.total)
        if not self._waiting and self.in_use + cost <= self.total:
            self._take(cost)
        else:
            waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
            self._waiting.append(waiter)
            try:
                await waiter.granted  # the releaser took our cost for us before waking us
            except BaseException:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                    self._grant()
                elif waiter.granted.done() and not waiter.granted.cancelled():
                    self._give_back(cost)
                raise
        try:
            yield
        finally:
            self._give_back(cost)

    @property
    def waiting(self) -> int:
        """How many reservations wait in line."""
        return len(self._waiting)

    def _take(self, cost: int) -> None:
        self.in_use += cost
        self.peak = max(self.peak, self.in_use)

    def _give_back(self, cost: int) -> None:
        self.in_use -= cost
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.in_use + self._waiting[0].cost <= self.total:
            waiter = self._waiting.pop(0)
            if waiter.granted.done():
                continue
            self._take(waiter.cost)
            waiter.granted.set_result(None)


class ClientPixelBudget:
    """Per client address, at most ``per_minute`` pixels decoded a minute (a token bucket refilled continuously)."""

    def __init__(self, per_minute: int, max_clients: int = 4096) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (allowance, updated)

    def take(self, client: str, pixels: int, now: float) -> float:
        """Spend ``pixels`` of the client's allowance; return 0, or the seconds to wait when it is short."""
        allowance, updated = self._buckets.pop(client, (float(self.per_minute), now))
        allowance = min(float(self.per_minute), allowance + (now - updated) * self.per_minute / 60.0)
        cost = min(pixels, self.per_minute)  # one image as large as the whole allowance is still possible
        wait = 0.0
        if cost > allowance:
            wait = (cost - allowance) * 60.0 / self.per_minute
        else:
            allowance -= cost
        self._buckets[client] = (allowance, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


@contextlib.asynccontextmanager
async def decode_share(budget: PixelBudget, per_client: ClientPixelBudget, data: bytes, client: str | None,
                       max_pixels: int) -> AsyncIterator[None]:
    """Hold the pixels ``data`` declares in ``budget`` for the block, first charging them to ``client`` (an address;
    None: not charged): a 429 ``decode_budget`` when it had too many decoded this minute. An image declaring more
    than ``max_pixels`` costs nothing (the decoder refuses it from its header)."""
    declared = probe_pixels(data)
    pixels = declared if declared <= max_pixels else 0
    if client is not None:
        wait = per_client.take(client, pixels, time.monotonic())
        if wait > 0:
            raise UserError(f"this address has had too many pixels decoded this minute; try again in "
                            f"{math.ceil(wait)} s", status=429, code="decode_budget")
    async with budget.reserve(pixels):
        yield
