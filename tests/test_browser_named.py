"""The app on the README's defaults (embedded models): the named sliders are there and "Age" moves the preview."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fluidsrv.runtime import Runtime
from fluidsrv.settings import Settings
from fluidsrv.web import create_app
from tests.browser_support import canvas_pixels, chromium_context, require_chromium, wait_booted, wait_new_frame
from tests.server_support import SMALL_PHOTO, LiveServer

pytestmark = pytest.mark.browser

NAMED = ("Age", "Gender (→ male)", "Smile", "Mouth open", "Eyes open", "Head turn", "Head tilt (up)")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    folder = tmp_path_factory.mktemp("embedded-server")
    # the defaults of `fluidsrv serve`, with fewer fine-tuning steps to keep the test short
    settings = Settings(data_dir=folder / "data", cache_dir=folder / "cache", finetune_steps=10, device="cpu")
    with LiveServer(create_app(settings, runtime=Runtime.build(settings))) as host:
        yield f"http://{host}"


@pytest.fixture
def page(tmp_path: Path, base_url: str) -> Iterator[Any]:
    with chromium_context(tmp_path / "profile", viewport={"width": 1100, "height": 900}) as context:
        page = context.new_page()
        page.goto(base_url)
        wait_booted(page)
        yield page


def test_the_named_sliders_are_listed_and_age_changes_the_preview(page: Any, shared_dir: Path) -> None:
    for label in NAMED:
        assert page.get_by_label(label, exact=True).count() == 1, f"no {label!r} slider"
    page.set_input_files("#file-input", str(shared_dir / "photos" / SMALL_PHOTO))
    page.wait_for_selector("#view-faces:not([hidden])")
    page.locator(".face-box").nth(0).click()
    page.wait_for_selector("#view-editor:not([hidden])", timeout=120_000)
    first_seq = wait_new_frame(page, -1, timeout_ms=60_000)
    before = canvas_pixels(page)
    assert before.shape[0] >= 256, "the preview is the aligned crop at 256 px or more"

    age = page.get_by_label("Age", exact=True)
    age.fill(age.get_attribute("max") or "3")
    age.dispatch_event("input")
    age.dispatch_event("change")
    wait_new_frame(page, first_seq, timeout_ms=60_000)
    after = canvas_pixels(page)
    changed = np.abs(after.astype(int) - before.astype(int)).max(axis=2) > 12  # [H, W]
    assert changed.mean() > 0.01, "Age at +max did not change the preview"
    rim = np.concatenate([changed[0], changed[-1], changed[:, 0], changed[:, -1]])
    assert rim.mean() < 0.02, "the crop's rim moved (the edit fades out before the inner crop's border)"
