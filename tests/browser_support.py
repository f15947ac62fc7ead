"""Helpers for the real-browser tests and the UI latency benchmark: Debian chromium through Playwright."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PREVIEW = "#preview"


def require_chromium() -> Path:
    """Return Debian's chromium; skip the test when absent (fail instead with FLUIDSRV_REQUIRE_SHARED=1)."""
    if CHROMIUM.is_file():
        return CHROMIUM
    message = f"{CHROMIUM} is absent (install Debian's chromium: apt-get install -y chromium)"
    if os.environ.get("FLUIDSRV_REQUIRE_SHARED") == "1":
        pytest.fail(message + " and FLUIDSRV_REQUIRE_SHARED=1")
    pytest.skip(message)


@contextmanager
def chromium_context(user_data_dir: Path, **options: Any) -> Iterator[Any]:
    """A headless chromium with a new empty profile in ``user_data_dir``; yields the browser context."""
    from playwright.sync_api import sync_playwright

    assert not user_data_dir.exists() or not any(user_data_dir.iterdir()), "the profile must start empty"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            **options,
        )
        try:
            yield context
        finally:
            context.close()


def wait_booted(page: Any) -> None:
    """Wait until the app has loaded the server's config and resumed (or not) a session."""
    page.wait_for_selector("body[data-booted=true]", timeout=20_000)


def painted_seq(page: Any) -> int:
    """The seq of the preview frame on the canvas (-1 before the first)."""
    value = page.evaluate(f"document.querySelector('{PREVIEW}').dataset.seq")
    return -1 if value is None else int(value)


def wait_new_frame(page: Any, after_seq: int, timeout_ms: int = 20_000) -> int:
    """Wait until a frame newer than ``after_seq`` is painted and nothing is in flight; return its seq."""
    page.wait_for_function(
        """([selector, after]) => {
            const canvas = document.querySelector(selector);
            return canvas.dataset.settled === "true" && Number(canvas.dataset.seq ?? -1) > after;
        }""",
        arg=[PREVIEW, after_seq],
        timeout=timeout_ms,
    )
    return painted_seq(page)


def canvas_pixels(page: Any, selector: str = PREVIEW) -> np.ndarray:
    """Read a canvas back as uint8 RGB [H, W, 3]."""
    data = page.evaluate(
        """(selector) => {
            const canvas = document.querySelector(selector);
            const image = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
            return { width: canvas.width, height: canvas.height, data: Array.from(image.data) };
        }""",
        selector,
    )
    rgba = np.asarray(data["data"], dtype=np.uint8).reshape(data["height"], data["width"], 4)  # [H, W, 4]
    return rgba[..., :3]  # [H, W, 3]


def drag_slider(page: Any, selector: str, to_fraction: float, steps: int = 8) -> None:
    """Drag the thumb of the range input ``selector`` from its centre to ``to_fraction`` of its width."""
    box = page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not visible"
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * to_fraction, y, steps=steps)
    page.mouse.up()


def latency_measures(page: Any, name: str = "fluidsrv:input-to-paint") -> list[float]:
    """Return the durations (ms) of the app's performance measures called ``name``."""
    durations: list[float] = page.evaluate(
        "(name) => performance.getEntriesByName(name).map((entry) => entry.duration)", name
    )
    return durations
