"""The identity meter in Debian's chromium: it appears with the editor, moves as a slider goes to its extremes and
shows the final photo's reading after finalize (real uvicorn on loopback, a tiny generator, dlib's descriptor).

Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fluidsrv.runtime import Runtime
from fluidsrv.settings import REPO_ROOT
from fluidsrv.web import create_app
from tests.browser_support import chromium_context, drag_slider, require_chromium, wait_booted, wait_new_frame
from tests.server_support import SMALL_PHOTO, LiveServer, small_settings

pytestmark = pytest.mark.browser

ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
FIRST_SLIDER = "#slider-1"
METER = "#identity"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    settings = small_settings(tmp_path_factory.mktemp("identity-server"), identity_meter="dlib", identity_rate=4.0)
    with LiveServer(create_app(settings, runtime=Runtime.build(settings))) as host:
        yield f"http://{host}"


@pytest.fixture
def page(tmp_path: Path, base_url: str) -> Iterator[Any]:
    with chromium_context(tmp_path / "profile", viewport={"width": 1100, "height": 900}) as context:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(base_url)
        wait_booted(page)
        yield page
        assert errors == [], f"uncaught errors in the page: {errors}"


def meter_distance(page: Any) -> float:
    return float(page.get_attribute(METER, "data-distance"))


def wait_distance(page: Any, test: str, value: float, timeout_ms: int = 120_000) -> float:
    """Wait until the meter's distance is ``test`` ("above" / "below") ``value``; return it."""
    page.wait_for_function(
        """([selector, above, value]) => {
            const distance = document.querySelector(selector).dataset.distance;
            return distance !== undefined && (above ? Number(distance) > value : Number(distance) < value);
        }""",
        arg=[METER, test == "above", value],
        timeout=timeout_ms,
    )
    return meter_distance(page)


def test_the_meter_moves_as_a_slider_goes_to_its_extremes(page: Any, shared_dir: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.set_input_files("#file-input", str(shared_dir / "photos" / SMALL_PHOTO))
    page.wait_for_selector("#view-faces:not([hidden])")
    page.locator(".face-box").nth(0).click()
    page.wait_for_selector("#view-editor:not([hidden])", timeout=120_000)
    wait_new_frame(page, -1, timeout_ms=60_000)
    page.wait_for_selector(f"{METER}:not([hidden])", timeout=10_000)
    assert page.get_attribute(METER, "data-threshold") == "0.6"
    marker, track = page.locator(f"{METER} .identity-marker").bounding_box(), page.locator(
        f"{METER} [role=meter]").bounding_box()
    assert abs(marker["x"] - (track["x"] + track["width"] / 2)) < 3, "the threshold marker is not half way"

    neutral = wait_distance(page, "above", -1.0)  # the unedited face's reading: the photo's own person
    assert neutral < 0.3 and page.get_attribute(METER, "data-same-person") == "true"
    page.screenshot(path=str(ARTIFACTS / "identity-01-neutral.png"))

    drag_slider(page, FIRST_SLIDER, 0.99)  # one extreme
    high = wait_distance(page, "above", neutral + 0.1)
    page.wait_for_timeout(1_500)  # the reading of the released state (the newest) follows the drag's
    high = max(high, meter_distance(page))
    page.screenshot(path=str(ARTIFACTS / "identity-02-extreme.png"))

    page.locator(f"{FIRST_SLIDER} ~ button").first.click()  # the slider's reset: back to the person
    back = wait_distance(page, "below", neutral + 0.05)
    drag_slider(page, FIRST_SLIDER, 0.01)  # the other extreme
    low = wait_distance(page, "above", back + 0.05)
    page.screenshot(path=str(ARTIFACTS / "identity-03-other-extreme.png"))
    fill = page.locator(f"{METER} .identity-fill").bounding_box()
    assert fill["width"] > 0.1 * track["width"] * low / 0.6, "the bar does not show the distance"
    print(f"identity distance: neutral {neutral:.3f}, one extreme {high:.3f}, reset {back:.3f}, other {low:.3f}")

    page.click("#finalize")
    page.wait_for_selector("#view-result:not([hidden])", timeout=120_000)
    page.wait_for_selector("#result-identity:not([hidden])")
    text = page.text_content("#result-identity") or ""
    assert "Identity drift" in text and "threshold 0.6" in text
    page.screenshot(path=str(ARTIFACTS / "identity-04-result.png"))
