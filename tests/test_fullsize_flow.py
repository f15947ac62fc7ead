"""The whole server flow at full size: a 1024² config-f generator and the official e4e encoder, through `serve`.

The checkpoints are public layouts with random weights, built key for key from the manifests in
``../shared/conformance``: the generator as a rosinality checkpoint (``g_ema`` + ``latent_avg``) passed as
``fluidsrv serve --generator PATH``; the encoder as an official e4e checkpoint (``state_dict`` with ``encoder.`` /
``decoder.`` halves, ``latent_avg`` [18, 512] and an ``opts`` dict) where the server looks for it, the weights cache
(``e4e_ffhq_encode.pt``). The server runs with the settings ``serve`` builds from the environment (every stage
plugin left at its default: ``FLUIDSRV_ENCODER=e4e,project``, the default previewer, ``photo_detail=transfer``)
on a real uvicorn; a client uploads a photo, picks its face, waits for the prepare over the websocket, moves a
slider, gets its preview, finalizes and downloads the JPEG.

One thing differs from the defaults, to stay under ~2 minutes on a shared CPU: ``FLUIDSRV_FINETUNE_STEPS=1``.
The fine-tune stays on (``lowrank``, the default mode) rather than ``FLUIDSRV_FINETUNE=none``, so the session's
1024² generator is a base generator plus a low-rank delta, as in production, and previews and finalize render
with it; one step proves that path at full size (~12 s at 1024² on an idle 2-core CPU, 40-65 s when other jobs
share it: the whole test then took 110 s), where the default 350 would take over an hour.
The e4e encoder must be the one used (not the ``project`` fallback): the test checks the active encoder in
``/api/config`` and the prepare's one-step "e4e" encode progress.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import websockets.sync.client
from PIL import Image

from fluidsrv.cli.serve import build_config
from fluidsrv.models.stylegan2 import Generator, GeneratorConfig
from fluidsrv.protocol import Frame, decode_frame
from fluidsrv.settings import Settings
from fluidsrv.weights_manager import WeightsManager
from tests.model_support import recipe_weights
from tests.server_support import SMALL_PHOTO, LiveServer

pytestmark = pytest.mark.slow

RESOLUTION = 1024
PREVIEW_SIDE = 512  # pipeline.preview_side(1024)
TIMEOUT = 240.0  # seconds any one answer may take (a prepare at 1024² on a busy CPU)


def rosinality_checkpoint(manifest: dict[str, list[int]], path: Path) -> None:
    """Write a random config-f generator as rosinality's ``{"g_ema", "latent_avg"}`` (keys: exactly the manifest)."""
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig(resolution=RESOLUTION)).eval()  # config-f: w_dim 512, 8 mapping layers
    state = generator.state_dict()
    assert {key: list(value.shape) for key, value in state.items()} == manifest, "not rosinality's 1024² layout"
    latent_avg = generator.estimate_w_avg(num_samples=2_000)  # [512]
    torch.save({"g_ema": state, "latent_avg": latent_avg}, path)


def official_e4e_checkpoint(manifest: dict[str, Any], generator_path: Path, path: Path) -> None:
    """Write an official-layout e4e FFHQ checkpoint: recipe weights for ``encoder.*`` (the conformance recipe), the
    generator of ``generator_path`` as ``decoder.*``, ``latent_avg`` [18, 512] and an ``opts`` dict."""
    shapes: dict[str, list[int]] = manifest["state_dict"]
    encoder = recipe_weights({key[len("encoder."):]: shape for key, shape in shapes.items()
                              if key.startswith("encoder.")})
    generator = torch.load(generator_path, weights_only=True)
    state = {f"encoder.{key}": value for key, value in encoder.items()}
    state.update({f"decoder.{key}": value for key, value in generator["g_ema"].items()})
    assert {key: list(value.shape) for key, value in state.items()} == shapes, "not the official e4e layout"
    num_ws, _ = manifest["latent_avg"]
    latent_avg = generator["latent_avg"].expand(num_ws, -1).clone()  # [18, 512]
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": RESOLUTION, "start_from_latent_avg": True,
            "exp_dir": "experiments/ffhq", "checkpoint_path": None, "lpips_lambda": 0.8}
    torch.save({"state_dict": state, "latent_avg": latent_avg, "opts": opts}, path)


@pytest.fixture(scope="module")
def weights(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the generator checkpoint, the weights cache holding the e4e checkpoint); removed after the module."""
    conformance = shared_dir / "conformance"
    folder = tmp_path_factory.mktemp("fullsize")
    cache = folder / "cache"
    cache.mkdir()
    generator_path = folder / "stylegan2-ffhq-config-f.pt"
    rosinality_checkpoint(json.loads((conformance / "stylegan2_rosinality_1024_cm2.json").read_text()),
                          generator_path)
    e4e_path = WeightsManager(cache_dir=cache).path_for("e4e-ffhq")  # where the e4e plugin looks for it
    official_e4e_checkpoint(json.loads((conformance / "e4e_ffhq_checkpoint.json").read_text()), generator_path,
                            e4e_path)
    yield generator_path, cache
    e4e_path.unlink()  # 1.1 GB
    generator_path.unlink()


def receive_json_until(connection: Any, wanted: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Read the socket until a JSON event of type ``wanted`` (binary frames are skipped); fail on an error."""
    while True:
        message = connection.recv(timeout=TIMEOUT)
        if isinstance(message, bytes):
            continue
        data: dict[str, Any] = json.loads(message)
        assert data.get("type") != "error", data
        if data.get("type") == wanted:
            return data
        seen.append(data)


def receive_preview(connection: Any, seq: int) -> Frame:
    """Read the socket until the preview frame of ``seq``; fail on an error."""
    while True:
        message = connection.recv(timeout=TIMEOUT)
        if isinstance(message, bytes):
            frame = decode_frame(message)
            if frame.kind == "preview" and frame.seq == seq:
                return frame
            continue
        assert json.loads(message).get("type") != "error", message


def test_a_photo_is_edited_end_to_end_with_a_1024_generator_and_the_official_e4e(
        weights: tuple[Path, Path], shared_dir: Path, tmp_path: Path) -> None:
    generator_path, cache = weights
    environment = {"FLUIDSRV_DATA_DIR": str(tmp_path / "data"), "FLUIDSRV_CACHE_DIR": str(cache),
                   "FLUIDSRV_DEVICE": "cpu", "FLUIDSRV_FINETUNE_STEPS": "1"}
    settings = Settings.from_env(environment, generator=str(generator_path), port=0)  # as `fluidsrv serve` does
    assert (settings.encoder, settings.finetune, settings.photo_detail) == ("e4e,project", "lowrank", "transfer")
    photo = (shared_dir / "photos" / SMALL_PHOTO).read_bytes()

    with LiveServer(config=build_config(settings)) as host, httpx.Client(base_url=f"http://{host}",
                                                                        timeout=TIMEOUT) as http:
        config = http.get("/api/config").json()
        assert config["generator"]["resolution"] == RESOLUTION and config["generator"]["num_ws"] == 18
        assert config["active"]["encoder"] == "e4e", config.get("skipped")
        assert "encoder" not in config.get("skipped", {})

        created = http.post("/api/sessions", files={"file": ("photo.jpg", photo, "image/jpeg")}).json()
        assert created["faces"], created
        session, token = created["session_id"], created["token"]
        headers = {"Authorization": f"Bearer {token}"}
        url = f"ws://{host}/api/sessions/{session}/ws?token={token}"
        with websockets.sync.client.connect(url, max_size=None) as connection:
            assert json.loads(connection.recv(timeout=TIMEOUT))["type"] == "state"
            assert http.post(f"/api/sessions/{session}/face", json={"index": 0}, headers=headers).status_code == 202
            seen: list[dict[str, Any]] = []
            receive_json_until(connection, "ready", seen)  # the whole prepare: align, encode, fine-tune, preview
            encodes = [event for event in seen if event.get("type") == "progress" and event["stage"] == "encode"]
            assert encodes and all(event["total"] == 1 and event["message"].startswith("e4e") for event in encodes)
            assert all(str(cache) not in event.get("message", "") for event in seen)  # no server path shown

            slider = http.get("/api/directions").json()["directions"][0]["name"]
            connection.send(json.dumps({"seq": 1, "values": {slider: 2.0}, "commit": True}))
            frame = receive_preview(connection, 1)
        with Image.open(io.BytesIO(frame.image)) as preview:
            assert preview.size == (PREVIEW_SIDE, PREVIEW_SIDE)  # the default previewer and photo detail at 1024²

        finalized = http.post(f"/api/sessions/{session}/finalize", headers=headers)
        assert finalized.status_code == 200, finalized.text
        result = http.get(finalized.json()["result"], headers=headers)
        assert result.status_code == 200 and result.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(result.content)) as final, Image.open(io.BytesIO(photo)) as upload:
        assert final.format == "JPEG" and final.size == upload.size
