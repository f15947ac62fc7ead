"""The ray backend's preview slots: one call per session in flight, the newest waiting state wins, and a gate
shared by every session bounds the calls on their way to the preview replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fluidsrv.backends.ray_stages import LatestWins
from fluidsrv.executor import SUPERSEDED


class Renders:
    """Calls that finish only when released, recording which ran and how many ran at once."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.release = asyncio.Event()

    def call(self, name: str) -> Callable[[], Awaitable[str]]:
        async def render() -> str:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.ran.append(name)
            await self.release.wait()
            self.running -= 1
            return name

        return render


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_session_waiting_for_the_gate_sends_only_its_newest_state() -> None:
    async def scenario() -> tuple[list[object], list[str]]:
        renders = Renders()
        gate = asyncio.Semaphore(1)
        first, second = LatestWins(gate), LatestWins(gate)
        holding = asyncio.create_task(first.submit(renders.call("a1")))  # takes the gate
        await settle()
        states = [asyncio.create_task(second.submit(renders.call(f"b{i}"))) for i in range(3)]
        await settle()
        assert renders.ran == ["a1"]  # b waits for the gate, not in the replica's queue
        renders.release.set()
        return [await holding, *[await state for state in states]], renders.ran

    results, ran = asyncio.run(scenario())
    assert results == ["a1", SUPERSEDED, SUPERSEDED, "b2"]
    assert ran == ["a1", "b2"]


def test_the_gate_bounds_the_calls_in_flight_over_all_sessions() -> None:
    async def scenario() -> tuple[list[object], int]:
        renders = Renders()
        gate = asyncio.Semaphore(2)
        slots = [LatestWins(gate) for _ in range(4)]
        calls = [asyncio.create_task(slot.submit(renders.call(f"s{i}"))) for i, slot in enumerate(slots)]
        await settle()
        assert renders.running == 2
        renders.release.set()
        return [await call for call in calls], renders.most_at_once

    results, most_at_once = asyncio.run(scenario())
    assert results == ["s0", "s1", "s2", "s3"]  # every session gets its frame, in turn
    assert most_at_once == 2


def test_closing_a_slot_that_waits_for_the_gate_answers_it_and_frees_nothing_else() -> None:
    async def scenario() -> tuple[object, object]:
        renders = Renders()
        gate = asyncio.Semaphore(1)
        busy, waiting = LatestWins(gate), LatestWins(gate)
        holding = asyncio.create_task(busy.submit(renders.call("busy")))
        await settle()
        waiter = asyncio.create_task(waiting.submit(renders.call("never")))
        await settle()
        await waiting.close()
        renders.release.set()
        return await holding, await waiter

    assert asyncio.run(scenario()) == ("busy", SUPERSEDED)
