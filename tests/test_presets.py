"""Single-edit presets: the network learns an edit, preset files, applying one with no generator, the endpoint."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from starlette.testclient import TestClient

from fluidsrv import latents
from fluidsrv.cli import main
from fluidsrv.image_io import decode_image
from fluidsrv.models.preset import PresetNet, PresetNetConfig
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.plugins import catalog_for
from fluidsrv.presets import (
    PresetError,
    PresetFacts,
    apply_preset,
    check_name,
    find_presets,
    load_preset,
    read_facts,
    save_preset,
)
from fluidsrv.runtime import Runtime
from fluidsrv.settings import REPO_ROOT, Settings
from fluidsrv.stages import Direction
from fluidsrv.training.preset import PairMaker, PresetTrainConfig, fidelity, heldout_pairs, train_network
from fluidsrv.web import create_app
from tests.server_support import SMALL_PHOTO, gradient_image, png_bytes, small_settings

SHIPPED = REPO_ROOT / "weights" / "presets"
EVAL_PHOTO = "deepface_img25.jpg"  # 400×400, one face


class WarmerFaces:
    """A tiny learnable edit: smooth random 32² images, made warmer where they are mid-grey (a colour curve)."""

    def generated(self, count: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        coarse = torch.rand(count, 3, 4, 4, generator=rng) * 1.6 - 0.8
        images = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
        warmth = torch.tensor([0.3, 0.0, -0.3]).view(1, 3, 1, 1)
        return images, (images + warmth * (1.0 - images.abs())).clamp(-1, 1)

    def real(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("no real faces in this problem")


def test_an_untrained_preset_is_the_identity_and_training_learns_the_edit(one_thread: None) -> None:
    config = PresetTrainConfig(batch=4, lr=3e-3, eval_faces=16, bank=64, crop=24)  # a bank, and crops
    pairs = WarmerFaces()
    torch.manual_seed(0)
    network = PresetNet(PresetNetConfig(resolution=32, widths=(8, 16)))
    held = heldout_pairs(pairs, config, None)["generated"]
    assert torch.equal(network(held[0]), held[0])  # the residual head starts at zero
    before = fidelity(network, *held)
    assert before["change_drawn"] == 0.0 and before["psnr"] == before["psnr_unedited"]

    losses: list[float] = []
    train_network(network, pairs, config, max_steps=60, on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    after = fidelity(network, *held)  # images it never trained on
    assert after["psnr"] > before["psnr_unedited"] + 3.0 and after["change_drawn"] > 0.5


def test_generator_pairs_are_the_generators_own_edit(tiny: Generator) -> None:
    config = PresetTrainConfig()
    vector = torch.randn(1, tiny.w_dim, generator=torch.Generator().manual_seed(1))
    direction = Direction("tiny", "Tiny", vector, layers=(2, 6))
    spread = latents.latent_spread(tiny, n=1_000)
    pairs = PairMaker(tiny, direction, 2.0, spread, 16, config)
    ws = tiny.mapping(torch.randn(2, tiny.w_dim, generator=torch.Generator().manual_seed(2)))
    before, after = pairs.rendered_pair(ws)
    moved = latents.apply_sliders(ws, {"tiny": direction}, {"tiny": 2.0}, spread=spread)
    with torch.no_grad():
        expected = F.interpolate(tiny.synthesis(moved), size=(16, 16), mode="bilinear", align_corners=False,
                                 antialias=True).clamp(-1, 1)
    assert before.shape == (2, 3, 16, 16) and torch.allclose(after, expected, atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)


def write_tiny_preset(folder: Path, name: str = "tiny") -> Path:
    torch.manual_seed(3)
    network = PresetNet(PresetNetConfig(resolution=32, widths=(8, 16)))
    torch.nn.init.normal_(network.to_residual.weight, std=0.05)
    facts = PresetFacts(name=name, label="Tiny", direction="age", strength=2.0, generator_sha256="ab" * 32,
                        resolution=32, fidelity={"generated": {"psnr": 30.0}}, training={"steps": 1})
    path = folder / f"{name}.safetensors"
    save_preset(network, facts, path)
    return path


def test_preset_files_round_trip_and_bad_ones_are_refused(tmp_path: Path) -> None:
    path = write_tiny_preset(tmp_path)
    facts, config = read_facts(path)
    assert facts.describe()["strength"] == 2.0 and facts.label == "Tiny" and config.widths == (8, 16)
    assert facts.fidelity == {"generated": {"psnr": 30.0}}
    preset = load_preset(path)
    assert find_presets(tmp_path) == {"tiny": path}
    assert not next(preset.network.parameters()).requires_grad
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PresetError, match="not a readable"):
        read_facts(tmp_path / "junk.safetensors")
    with pytest.raises(PresetError, match="not a preset name"):
        check_name("../etc")
    with pytest.raises(PresetError, match="must be saved as"):
        save_preset(preset.network, facts, tmp_path / "other.safetensors")


@pytest.fixture
def no_generator(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Building or running any generator fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a preset must never build or run a generator")

    monkeypatch.setattr(Generator, "__init__", refuse)
    monkeypatch.setattr(Generator, "synthesis", refuse)
    monkeypatch.setattr(Generator, "mapping", refuse)
    yield


def shipped(name: str) -> Path:
    path = SHIPPED / f"{name}.safetensors"
    if not path.is_file():
        pytest.fail(f"the shipped preset {path} is missing")
    return path


def test_a_shipped_preset_changes_only_the_face_with_no_generator(shared_dir: Path, no_generator: None,
                                                                  one_thread: None) -> None:
    data = (shared_dir / "photos-eval" / EVAL_PHOTO).read_bytes()
    photo = decode_image(data, max_pixels=50_000_000).pixels
    settings = Settings.from_env(device="cpu", detector="dlib", segmenter="landmarks")
    catalog = catalog_for(settings)
    preset = load_preset(shipped("older"))
    edited, count = apply_preset(preset, catalog.create("detector", "dlib"), catalog.create("segmenter", "landmarks"),
                                 photo)
    assert count == 1 and edited.shape == photo.shape
    changed = np.any(edited != photo, axis=2)
    rows, columns = np.nonzero(changed)
    assert len(rows) > 2_000  # the face moved visibly
    from fluidsrv.geometry import align_face, face_landmarks
    from fluidsrv.pipeline import detect_faces

    quad = align_face(photo, face_landmarks(detect_faces(catalog.create("detector", "dlib"), photo)[0]),
                      size=128).inner.quad
    assert rows.min() >= quad[:, 1].min() - 1 and rows.max() <= quad[:, 1].max() + 1
    assert columns.min() >= quad[:, 0].min() - 1 and columns.max() <= quad[:, 0].max() + 1
    (x0, y0), (x1, y1) = np.floor(quad.min(axis=0)).astype(int) - 2, np.ceil(quad.max(axis=0)).astype(int) + 3
    outside = np.ones(photo.shape[:2], bool)
    outside[max(0, y0):y1, max(0, x0):x1] = False
    assert outside.any() and not changed[outside].any()


def test_the_cli_applies_a_shipped_preset_with_no_generator(shared_dir: Path, tmp_path: Path, no_generator: None,
                                                            one_thread: None, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    source = shared_dir / "photos-eval" / EVAL_PHOTO
    out = tmp_path / "older.jpg"
    assert main(["preset", "apply", str(source), "--preset", "smile", "-o", str(out), "--device", "cpu",
                 "--detector", "dlib"]) == 0
    assert "on 1 face(s)" in capsys.readouterr().err
    with Image.open(out) as result, Image.open(source) as original:
        assert result.format == "JPEG" and result.size == original.size
        before, after = np.asarray(original.convert("RGB"), np.int16), np.asarray(result.convert("RGB"), np.int16)
    top_rows = np.abs(after[:40] - before[:40]).mean()  # well above the face: only the JPEG re-encode differs
    assert top_rows < 2.0
    assert main(["preset", "apply", str(source), "--preset", "nope", "-o", str(out)]) == 2
    assert "no preset 'nope'" in capsys.readouterr().err
    assert main(["preset", "apply", str(source), "--preset", "smile", "-o", str(tmp_path / "x.png")]) == 2
    assert main(["preset", "train", "--direction", "age", "--strength", "1", "-o", str(tmp_path / "Bad.pt")]) == 2


# ---- the endpoint ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    return Runtime.build(small_settings(tmp_path_factory.mktemp("runtime")))


@pytest.fixture
def client(tmp_path: Path, runtime: Runtime, no_generator: None) -> Iterator[TestClient]:
    with TestClient(create_app(small_settings(tmp_path), runtime=runtime)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> bytes:
    return (shared_dir / "photos" / SMALL_PHOTO).read_bytes()


def test_the_presets_are_listed_with_their_facts(client: TestClient) -> None:
    listed = {preset["name"]: preset for preset in client.get("/api/presets").json()["presets"]}
    assert {"older", "smile"} <= set(listed)
    older = listed["older"]
    assert older["direction"] == "age" and older["strength"] > 0 and older["resolution"] == 128
    assert older["fidelity"]["generated"]["psnr"] > older["fidelity"]["generated"]["psnr_unedited"]


def test_applying_a_preset_answers_a_jpeg_of_the_photo(client: TestClient, photo: bytes) -> None:
    response = client.post("/api/presets/older/apply", files={"file": ("me.jpg", photo, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert 'filename="me-older.jpg"' in response.headers["content-disposition"]
    with Image.open(io.BytesIO(response.content)) as result, Image.open(io.BytesIO(photo)) as original:
        assert result.format == "JPEG" and result.size == original.size
    raw = client.post("/api/presets/smile/apply?face=0", content=photo, headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200, raw.text


@pytest.mark.parametrize(
    ("path", "data", "status", "code"),
    [
        ("/api/presets/nope/apply", None, 404, "unknown_preset"),
        ("/api/presets/Older%21/apply", None, 404, "unknown_preset"),  # not a preset name
        ("/api/presets/older/apply", b"this is not an image at all", 415, "unsupported_type"),
        ("/api/presets/older/apply", b"", 400, "empty_upload"),
        ("/api/presets/older/apply", png_bytes(gradient_image()), 422, "no_face"),
        ("/api/presets/older/apply?face=7", None, 422, "bad_face_index"),
        ("/api/presets/older/apply?face=-1", None, 422, "bad_face_index"),
    ],
)
def test_bad_preset_requests_get_clear_errors(client: TestClient, photo: bytes, path: str, data: bytes | None,
                                              status: int, code: str) -> None:
    response = client.post(path, files={"file": ("x.jpg", photo if data is None else data, "image/jpeg")})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_too_large_preset_uploads_are_refused(tmp_path: Path, runtime: Runtime, photo: bytes) -> None:
    limited = small_settings(tmp_path, max_upload_bytes=10_000, max_pixels=100_000)
    with TestClient(create_app(limited, runtime=runtime)) as client:
        response = client.post("/api/presets/older/apply", files={"file": ("big.jpg", photo, "image/jpeg")})
        assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"
        big = png_bytes(np.zeros((400, 400, 3), np.uint8))
        response = client.post("/api/presets/older/apply", content=big, headers={"Content-Type": "image/png"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"


# ---- the browser app -------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_the_app_shows_the_presets_as_one_click_buttons(runtime: Runtime, tmp_path: Path, shared_dir: Path) -> None:
    from tests.browser_support import chromium_context, require_chromium, wait_booted
    from tests.server_support import LiveServer

    require_chromium()
    photo_path = shared_dir / "photos" / SMALL_PHOTO
    app = create_app(small_settings(tmp_path / "server"), runtime=runtime)
    with LiveServer(app) as host, chromium_context(tmp_path / "profile") as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"http://{host}")
        wait_booted(page)
        page.set_input_files("#file-input", str(photo_path))
        page.wait_for_selector("#view-faces:not([hidden]) #preset-panel:not([hidden])")
        buttons = page.locator(".preset-button")
        assert {buttons.nth(i).get_attribute("data-preset") for i in range(buttons.count())} >= {"older", "smile"}
        with page.expect_response(lambda response: "/api/presets/smile/apply" in response.url) as answer:
            page.click(".preset-button[data-preset=smile]")
        assert answer.value.status == 200
        page.wait_for_selector("#view-result:not([hidden])")
        page.wait_for_function("document.querySelector('#result').naturalWidth > 0")
        size = page.evaluate("[document.querySelector('#result').naturalWidth, "
                             "document.querySelector('#result').naturalHeight]")
        with Image.open(photo_path) as original:
            assert tuple(size) == original.size
        assert page.get_attribute("#download", "download").endswith("-smile.jpg")
        page.click("#back-to-editor")
        page.wait_for_selector("#view-faces:not([hidden])")
        assert errors == []
