"""Bounded decoding: the server-wide pixel semaphore, the per-client pixel allowance and the header probe."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from fluidsrv.decode_budget import ClientPixelBudget, PixelBudget, probe_pixels
from fluidsrv.runtime import Runtime
from fluidsrv.web import create_app
from tests.server_support import ADMIN, gradient_image, small_settings

QUICK_DETECTOR = {"detector.dlib": {"max_side": 512, "upsample": 0}}
"""A faceless picture makes dlib scan twice, upsampled: keep that cheap here (these tests are about decoding)."""


def big_png(width: int, height: int) -> bytes:
    """A PNG of a smooth picture: a few KB on disk for many pixels (the amplification an attacker uses)."""
    buffer = io.BytesIO()
    Image.fromarray(gradient_image(height, width)).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def test_probe_reads_the_declared_size_from_the_header_only() -> None:
    data = big_png(640, 480)
    assert probe_pixels(data) == 640 * 480
    assert probe_pixels(b"not an image") == 0


def test_the_pixel_budget_never_holds_more_than_its_total_and_serves_in_order() -> None:
    budget = PixelBudget(100)
    order: list[str] = []

    async def decode(name: str, cost: int, seconds: float) -> None:
        async with budget.reserve(cost):
            assert budget.in_use <= budget.total
            order.append(name)
            await asyncio.sleep(seconds)

    async def main() -> None:
        await asyncio.gather(decode("a", 60, 0.05), decode("b", 60, 0.01), decode("c", 30, 0.01),
                             decode("huge", 1000, 0.01), decode("d", 10, 0.01))

    asyncio.run(main())
    assert budget.peak <= 100 and budget.in_use == 0 and budget.waiting == 0
    assert order == ["a", "b", "c", "huge", "d"]  # first come first served: the small "c" does not jump "b"


def test_a_cancelled_waiter_gives_its_place_back() -> None:
    budget = PixelBudget(10)

    async def main() -> None:
        async with budget.reserve(10):
            waiter = asyncio.ensure_future(budget.reserve(10).__aenter__())
            await asyncio.sleep(0)
            assert budget.waiting == 1
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert budget.waiting == 0
        async with budget.reserve(10):
            assert budget.in_use == 10

    asyncio.run(main())
    assert budget.in_use == 0


def test_the_client_budget_refills_over_a_minute() -> None:
    clients = ClientPixelBudget(per_minute=100)
    assert clients.take("a", 60, now=0.0) == 0.0
    assert clients.take("a", 60, now=0.0) == pytest.approx(12.0)  # 20 short: 20 / (100 per minute) = 12 s
    assert clients.take("b", 60, now=0.0) == 0.0  # another address has its own allowance
    assert clients.take("a", 60, now=12.0) == 0.0
    assert clients.take("c", 10_000, now=0.0) == 0.0  # one image the size of the whole allowance still goes


def test_concurrent_max_size_uploads_stay_within_the_decode_budget(tmp_path: Path) -> None:
    side = 3000  # 9 Mpx each; the budget lets two decode at once
    settings = small_settings(tmp_path, decode_pixel_budget=2 * side * side, max_pixels=side * side,
                              client_pixels_per_minute=10**12, plugin_options=QUICK_DETECTOR)
    data = big_png(side, side)
    with TestClient(create_app(settings, runtime=Runtime.build(settings))) as client:
        service = client.app.state.service  # type: ignore[attr-defined]

        async def upload_all() -> list[int]:
            async def one() -> int:
                try:
                    await service.create(data, "big.png", client="10.0.0.1")
                except Exception as error:  # a smooth picture has no face: a clean 422
                    return int(getattr(error, "status", 500))
                return 201

            return await asyncio.gather(*(one() for _ in range(8)))

        statuses = client.portal.call(upload_all)  # type: ignore[union-attr]
        assert statuses == [422] * 8
        decoding = client.get("/api/stats", headers=ADMIN).json()["decoding"]
        assert decoding["peak_pixels"] <= 2 * side * side and decoding["pixels_in_use"] == 0


def test_one_client_cannot_make_the_server_decode_without_limit(tmp_path: Path) -> None:
    settings = small_settings(tmp_path, client_pixels_per_minute=3 * 640 * 480, plugin_options=QUICK_DETECTOR)
    data = big_png(640, 480)
    with TestClient(create_app(settings, runtime=Runtime.build(settings))) as client:
        statuses = [client.post("/api/sessions", content=data, headers={"Content-Type": "image/png"}).status_code
                    for _ in range(4)]
        assert statuses == [422, 422, 422, 429]
        refused = client.post("/api/sessions", content=data, headers={"Content-Type": "image/png"}).json()
        assert refused["error"]["code"] == "decode_budget" and "try again in" in refused["error"]["message"]
        small = np.zeros((8, 8, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).save(buffer, "PNG")
        assert client.post("/api/sessions", content=buffer.getvalue(),  # a tiny image still fits the rest
                           headers={"Content-Type": "image/png"}).status_code == 422
