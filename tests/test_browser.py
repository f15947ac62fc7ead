"""The browser app in Debian's chromium (Playwright) against real uvicorn on loopback, on a tiny generator.

Screenshots of every step go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from fluidsrv.runtime import Runtime
from fluidsrv.settings import REPO_ROOT
from fluidsrv.web import create_app
from tests.browser_support import (
    canvas_pixels,
    chromium_context,
    drag_slider,
    latency_measures,
    painted_seq,
    require_chromium,
    wait_booted,
    wait_new_frame,
)
from tests.server_support import SMALL_PHOTO, LiveServer, gradient_image, png_bytes, small_settings

pytestmark = pytest.mark.browser

ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
FIRST_SLIDER = "#slider-1"  # the first slider the app builds
PHONE_WIDTH = 375


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    # previews come from the student previewer (untrained: the 32² generator has no student file), as in production
    options = {**small_settings(Path()).plugin_options, "previewer.student": {"untrained": "true", "seconds": 0.5}}
    settings = small_settings(tmp_path_factory.mktemp("browser-server"), previewer="student", plugin_options=options)
    runtime = Runtime.build(settings)
    assert runtime.active_stages()["previewer"] == "student"
    app = create_app(settings, runtime=runtime)
    with LiveServer(app) as host:
        yield f"http://{host}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, base_url: str) -> Iterator[Any]:
    """One chromium with a new empty profile for the module; each test gets its own tab (own sessionStorage)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    with chromium_context(profile, viewport={"width": 1100, "height": 900}) as context:
        yield context


@pytest.fixture
def page(browser: Any, base_url: str) -> Iterator[Any]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(base_url)
    wait_booted(page)
    yield page
    page.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def notice_code(page: Any) -> str:
    page.wait_for_selector("#notice:not([hidden])", timeout=20_000)
    return str(page.get_attribute("#notice", "data-code"))


def test_upload_pick_slide_undo_finalize_download(page: Any, shared_dir: Path, tmp_path: Path) -> None:
    photo_path = shared_dir / "photos" / SMALL_PHOTO
    with Image.open(photo_path) as original:
        original_size = original.size

    # upload: the faces are outlined where the server found them, at the displayed scale
    with page.expect_response(lambda response: response.url.endswith("/api/sessions")) as answer:
        page.set_input_files("#file-input", str(photo_path))
    session = answer.value.json()
    page.wait_for_selector("#view-faces:not([hidden])")
    page.wait_for_function("document.querySelector('#photo').complete")
    photo_box = page.locator("#photo").bounding_box()
    outlines = page.locator(".face-box")
    assert outlines.count() == len(session["faces"]) >= 1
    x0, y0, x1, y1 = session["faces"][0]["box"]
    scale = photo_box["width"] / session["width"]
    outline = outlines.nth(0).bounding_box()
    assert abs(outline["x"] - (photo_box["x"] + x0 * scale)) < 2
    assert abs(outline["y"] - (photo_box["y"] + y0 * scale)) < 2
    assert abs(outline["width"] - (x1 - x0) * scale) < 2
    assert abs(outline["height"] - (y1 - y0) * scale) < 2
    shot(page, "01-faces")

    # pick the face: align / encode / fine-tune / distill, then the editor with a first frame
    outlines.nth(0).click()
    with contextlib.suppress(PlaywrightTimeout):  # on a fast machine preparing may end before a step shows
        page.wait_for_selector("#progress-steps li.active", timeout=10_000)
        shot(page, "02-progress")
    page.wait_for_selector("#view-editor:not([hidden])", timeout=60_000)
    first_seq = wait_new_frame(page, -1)
    assert canvas_pixels(page, "#progress-frame").shape[0] > 1, "no intermediate frame was shown while preparing"
    before = canvas_pixels(page)
    assert before.shape == (256, 256, 3)  # the aligned photo crop at the preview side
    shot(page, "03-editor")

    # drag a slider: the preview changes; releasing it commits an undo step
    drag_slider(page, FIRST_SLIDER, 0.95)
    edited_seq = wait_new_frame(page, first_seq)
    edited = canvas_pixels(page)
    assert np.abs(edited.astype(int) - before.astype(int)).mean() > 1.0, "the slider did not change the preview"
    assert float(page.input_value(FIRST_SLIDER)) > 0
    assert page.is_enabled("#undo")
    assert latency_measures(page), "painting a frame leaves an input-to-paint performance measure"
    shot(page, "04-slider-dragged")

    # hold B: the unedited face; release: the edit again
    page.keyboard.down("b")
    page.wait_for_selector("#preview[data-showing=before]")
    assert np.array_equal(canvas_pixels(page), before)
    page.keyboard.up("b")
    page.wait_for_selector("#preview[data-showing=after]")
    assert np.array_equal(canvas_pixels(page), edited)

    # undo (button) restores the earlier frame exactly; redo (keyboard) brings the edit back
    page.click("#undo")
    undone_seq = wait_new_frame(page, edited_seq)
    assert np.array_equal(canvas_pixels(page), before), "undo did not restore the earlier frame"
    assert float(page.input_value(FIRST_SLIDER)) == 0
    shot(page, "05-undone")
    page.locator("#preview").click()  # focus outside any text field
    page.keyboard.press("Control+Shift+Z")
    redone_seq = wait_new_frame(page, undone_seq)
    assert np.array_equal(canvas_pixels(page), edited)

    # the SeFa panel: a layer range and a count become new sliders of this session, and they move the face
    page.click("#sefa-panel > summary")
    page.fill("#sefa-start", "1")
    page.fill("#sefa-stop", "6")
    page.fill("#sefa-k", "2")
    with page.expect_response(lambda response: response.url.endswith("/directions/sefa")) as sefa_answer:
        page.click("#sefa-form button[type=submit]")
    added = sefa_answer.value.json()["directions"]
    assert sefa_answer.value.status == 200 and len(added) == 2
    new_slider = f'input[type=range][data-direction="{added[0]["name"]}"]'
    page.wait_for_selector(new_slider)
    shown = canvas_pixels(page)
    drag_slider(page, new_slider, 0.05)
    redone_seq = wait_new_frame(page, redone_seq)
    assert np.abs(canvas_pixels(page).astype(int) - shown.astype(int)).mean() > 1.0
    shot(page, "06-sefa-sliders")
    page.click("#undo")  # back to the redone edit, so the reload below shows it
    redone_seq = wait_new_frame(page, redone_seq)
    assert np.array_equal(canvas_pixels(page), edited)

    # phone width: nothing sticks out sideways
    page.set_viewport_size({"width": PHONE_WIDTH, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE_WIDTH
    shot(page, "07-editor-phone")
    page.set_viewport_size({"width": 1100, "height": 900})

    # a reload resumes the session from sessionStorage, at the same slider state
    page.reload()
    wait_booted(page)
    page.wait_for_selector("#view-editor:not([hidden])")
    wait_new_frame(page, -1)
    assert np.array_equal(canvas_pixels(page), edited)
    assert page.locator(new_slider).count() == 1  # the session's own sliders come back too
    assert redone_seq > 0

    # finalize: the whole photo, downloadable at its original resolution
    page.click("#finalize")
    page.wait_for_selector("#view-result:not([hidden])", timeout=60_000)
    page.wait_for_function("document.querySelector('#result').complete")
    shot(page, "08-result")
    with page.expect_download() as download_info:
        page.click("#download")
    downloaded = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(downloaded)
    assert downloaded.name.endswith("-edited.jpg")
    with Image.open(downloaded) as result:
        assert result.format == "JPEG" and result.size == original_size


def test_errors_are_explained_with_what_to_do(page: Any) -> None:
    # a photo without a face, dropped on the page
    page.evaluate(
        """(bytes) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], "gradient.png", { type: "image/png" }));
            document.querySelector("#dropzone").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        list(png_bytes(gradient_image())),
    )
    assert notice_code(page) == "no_face"
    assert "No face" in page.inner_text("#notice") and page.is_visible("#notice-action")
    shot(page, "10-error-no-face")

    # bytes that are no image at all
    page.click("#notice-dismiss")
    not_an_image = {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}
    page.set_input_files("#file-input", files=[not_an_image])
    assert notice_code(page) == "unsupported_type"

    # a stored session the server does not know: the app says it expired and offers a new upload
    page.evaluate(
        "(value) => sessionStorage.setItem('fluidsrv.session', value)",
        json.dumps({"sessionId": "0" * 32, "token": "x" * 43, "filename": "old.jpg"}),
    )
    page.reload()
    wait_booted(page)
    assert notice_code(page) == "unknown_session"
    assert page.is_visible("#view-upload") and page.evaluate("sessionStorage.getItem('fluidsrv.session')") is None
    shot(page, "11-error-session-expired")

    # /api/config "features": this server has SeFa and the tools, but no CLIP weights for text prompts
    assert page.is_hidden("#prompt-panel")
    assert page.get_attribute("#sefa-panel", "hidden") is None and page.is_visible("#nav-tools")


def test_a_dropped_websocket_reconnects_and_keyboard_editing_goes_on(page: Any, shared_dir: Path) -> None:
    sockets: list[tuple[Any, Any]] = []

    def proxy(route: Any) -> None:
        sockets.append((route, route.connect_to_server()))  # forwards every message both ways

    page.route_web_socket("**/ws*", proxy)
    page.set_input_files("#file-input", str(shared_dir / "photos" / SMALL_PHOTO))
    page.wait_for_selector("#view-faces:not([hidden])")
    page.keyboard.press("Enter")  # keyboard only: the first face's button has the focus
    page.wait_for_selector("#view-editor:not([hidden])", timeout=60_000)
    seq = wait_new_frame(page, -1)
    before = canvas_pixels(page)

    page_side, server_side = sockets[-1]
    server_side.close()
    page_side.close(code=1012, reason="the test drops the connection")
    page.wait_for_selector("#connection:not([hidden])")
    shot(page, "20-reconnecting")
    page.wait_for_selector("#connection", state="hidden", timeout=20_000)
    assert len(sockets) >= 2

    assert page.evaluate("document.activeElement.id") == FIRST_SLIDER.lstrip("#")  # the editor focused it
    page.keyboard.press("Home")  # the slider to its minimum
    wait_new_frame(page, max(seq, painted_seq(page)))
    assert float(page.input_value(FIRST_SLIDER)) < 0
    assert np.abs(canvas_pixels(page).astype(int) - before.astype(int)).mean() > 1.0


def test_optional_panels_appear_when_the_server_has_their_routes(page: Any) -> None:
    """The text prompt stays hidden on this server (no CLIP weights); a faked feature makes it appear."""

    def with_clip_plugin(route: Any) -> None:
        config = route.fetch().json()
        config["features"]["text"] = True
        route.fulfill(json=config)

    page.route("**/api/config", with_clip_plugin)
    page.route("**/api/tools", lambda route: route.fulfill(json={"mix": True, "morph": False, "loop": True}))
    page.reload()
    wait_booted(page)
    page.wait_for_selector("#nav-tools:not([hidden])")
    assert page.get_attribute("#sefa-panel", "hidden") is None
    assert page.get_attribute("#prompt-panel", "hidden") is None
    page.click("#nav-tools")
    assert page.is_visible("#tool-mix") and page.is_visible("#tool-loop") and page.is_hidden("#tool-morph")
    shot(page, "30-tools")
    page.click("#nav-editor")
    assert page.is_visible("#view-upload")



CSP_WATCH = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  const where = `${event.sourceFile}:${event.lineNumber}`;
  window.cspViolations.push(`${event.effectiveDirective} blocked ${event.blockedURI} at ${where}`);
});
"""
"""Collects the page's Content-Security-Policy violations from its first script on."""


def test_the_app_runs_under_its_content_security_policy(browser: Any, base_url: str, shared_dir: Path) -> None:
    page = browser.new_page()
    page.add_init_script(CSP_WATCH)
    console: list[str] = []
    errors: list[str] = []
    page.on("console", lambda message: console.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        policy = page.goto(base_url).headers["content-security-policy"]
        assert "'unsafe-inline'" not in policy and "frame-ancestors 'none'" in policy
        wait_booted(page)

        # upload: the photo (a blob: URL) and the faces' thumbnails (data: URLs) show
        page.set_input_files("#file-input", str(shared_dir / "photos" / SMALL_PHOTO))
        page.wait_for_selector("#view-faces:not([hidden])")
        page.wait_for_function("""() => {
            const images = [document.querySelector('#photo'), ...document.querySelectorAll('#face-list img')];
            return images.every((image) => image.complete && image.naturalWidth > 0);
        }""")
        assert page.locator("#face-list img").count() >= 1

        # pick a face: progress frames, then previews over the websocket as a slider moves
        page.locator(".face-box").nth(0).click()
        page.wait_for_selector("#view-editor:not([hidden])", timeout=60_000)
        seq = wait_new_frame(page, -1)
        drag_slider(page, FIRST_SLIDER, 0.9)
        wait_new_frame(page, seq)
        shot(page, "40-under-csp")

        assert page.evaluate("window.cspViolations") == []
        assert [text for text in console if "Content Security Policy" in text] == []
        assert errors == []

        # the watcher does see a violation: an inline script is refused
        page.evaluate("""() => document.head.appendChild(
            Object.assign(document.createElement('script'), { textContent: 'window.inlineRan = true' }))""")
        page.wait_for_function("window.cspViolations.length > 0")
        assert page.evaluate("window.inlineRan") is None
        assert page.evaluate("window.cspViolations")[0].startswith("script-src-elem blocked inline")
    except PlaywrightTimeout as error:  # a blocked image or socket shows as a wait that never ends: say why
        raise AssertionError(f"{error}\nCSP violations: {page.evaluate('window.cspViolations')}") from None
    finally:
        page.close()
