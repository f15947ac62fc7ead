"""The e4e encoder plugin: our safetensors and the official e4e .pt layout, matching the generator, the embedded /
cached file lookup, availability reasons, the untrained development mode, and the generator fingerprint check."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fluidsrv.models.e4e import Encoder4Editing
from fluidsrv.models.stylegan2 import Generator, GeneratorConfig
from fluidsrv.plugins import StageCatalog, build_plugin_manager
from fluidsrv.stages import Latents, PluginContext
from fluidsrv.training.encoder import ARCHITECTURES, FINGERPRINT_KEY, encoder_config, generator_fingerprint
from fluidsrv.weights import save_encoder
from tests.model_support import TINY_GENERATOR_W16, generator_with_w_avg, randomize_batchnorm_statistics

OTHER = GeneratorConfig(resolution=64, w_dim=16, n_mapping=2, channels={4: 16, 8: 16, 16: 8, 32: 8, 64: 8})

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator() -> Generator:
    return generator_with_w_avg(TINY_GENERATOR_W16, num_samples=200)


@pytest.fixture(scope="module")
def encoder() -> Encoder4Editing:
    torch.manual_seed(1)
    encoder = Encoder4Editing(encoder_config(ARCHITECTURES["tiny"], TINY_GENERATOR_W16))
    randomize_batchnorm_statistics(encoder)
    return encoder.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1


def latent_avg_for(generator: Generator) -> torch.Tensor:
    return (generator.w_avg + 0.1 * torch.arange(generator.num_ws)[:, None]).contiguous()  # [num_ws, w_dim]


def catalog(tmp_path: Path, **options: Any) -> StageCatalog:
    weights, cache = tmp_path / "weights", tmp_path / "cache"
    weights.mkdir(exist_ok=True)
    cache.mkdir(exist_ok=True)
    context = PluginContext(device=torch.device("cpu"), weights_dir=weights, cache_dir=cache)
    return StageCatalog(build_plugin_manager(load_entry_points=False), context, options={"encoder.e4e": options})


def encode(encoder_plugin: Any, image: torch.Tensor, generator: Generator) -> Latents:
    job = encoder_plugin.encode(image, generator)
    progress = next(job)
    assert progress.stage == "encode" and (progress.step, progress.total) == (1, 1)
    with pytest.raises(StopIteration) as stop:
        next(job)
    result: Latents = stop.value.value
    return result


def expected_ws(encoder: Encoder4Editing, image: torch.Tensor, latent_avg: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(image) + latent_avg  # [1, num_ws, w_dim]


def test_loads_our_safetensors(
    tmp_path: Path, generator: Generator, encoder: Encoder4Editing, image: torch.Tensor
) -> None:
    path = tmp_path / "encoder.safetensors"
    latent_avg = latent_avg_for(generator)
    save_encoder(path, encoder, latent_avg)
    plugin = catalog(tmp_path, encoder=str(path)).create("encoder", "e4e")
    latents = encode(plugin, image, generator)
    torch.testing.assert_close(latents.ws, expected_ws(encoder, image, latent_avg))
    torch.testing.assert_close(latents.w, latents.ws[:, 0])
    assert latents.ws.shape == (1, generator.num_ws, generator.w_dim)


def test_loads_the_official_e4e_key_layout(
    tmp_path: Path, generator: Generator, encoder: Encoder4Editing, image: torch.Tensor
) -> None:
    path = tmp_path / "e4e_tiny.pt"
    latent_avg = latent_avg_for(generator)
    state = {f"encoder.{key}": value for key, value in encoder.state_dict().items()}
    state.update({f"decoder.{key}": value for key, value in generator.state_dict().items()})
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": 32, "start_from_latent_avg": True}
    torch.save({"state_dict": state, "latent_avg": latent_avg, "opts": opts}, path)
    plugin = catalog(tmp_path, encoder=str(path)).create("encoder", "e4e")
    latents = encode(plugin, image, generator)
    torch.testing.assert_close(latents.ws, expected_ws(encoder, image, latent_avg))


def test_a_generator_the_encoder_does_not_fit_is_refused(tmp_path: Path, encoder: Encoder4Editing) -> None:
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, encoder, torch.zeros(TINY_GENERATOR_W16.w_dim))
    other = Generator(OTHER).eval()
    plugin = catalog(tmp_path, encoder=str(path)).create("encoder", "e4e")
    with pytest.raises(ValueError, match=r"no e4e encoder matches this generator \(64², 10 styles of width 16\)"):
        encode(plugin, torch.zeros(1, 3, 64, 64), other)


def test_embedded_and_cached_files_are_found_and_unavailability_explained(
    tmp_path: Path, generator: Generator, encoder: Encoder4Editing, image: torch.Tensor
) -> None:
    empty = catalog(tmp_path)
    reason = empty.unavailable_reason("encoder", "e4e") or ""
    assert "encoder-128.safetensors" in reason and "e4e_ffhq_encode.pt" in reason and "fetch e4e-ffhq" in reason
    assert "does not exist" in (
        catalog(tmp_path, encoder=str(tmp_path / "nope.pt")).unavailable_reason("encoder", "e4e") or ""
    )

    # an (unreadable) official checkpoint in the cache is skipped without being read: it is for 18 x 512 codes
    (tmp_path / "cache" / "e4e_ffhq_encode.pt").write_bytes(b"not a checkpoint")
    assert catalog(tmp_path).unavailable_reason("encoder", "e4e") is None
    with pytest.raises(ValueError, match=r"e4e_ffhq_encode\.pt"):
        encode(catalog(tmp_path).create("encoder", "e4e"), image, generator)

    # our embedded file in weights/ is used for the generator it fits
    latent_avg = latent_avg_for(generator)
    save_encoder(tmp_path / "weights" / "encoder-128.safetensors", encoder, latent_avg)
    latents = encode(catalog(tmp_path).create("encoder", "e4e"), image, generator)
    torch.testing.assert_close(latents.ws, expected_ws(encoder, image, latent_avg))


def test_untrained_mode_builds_a_random_encoder_for_any_generator(tmp_path: Path, generator: Generator) -> None:
    built = catalog(tmp_path, untrained="true")
    assert built.unavailable_reason("encoder", "e4e") is None
    plugin = built.create("encoder", "e4e")
    other = Generator(OTHER).eval()
    for model, side in ((generator, 32), (other, 64)):
        latents = encode(plugin, torch.zeros(1, 3, side, side), model)
        assert latents.ws.shape == (1, model.num_ws, model.w_dim) and torch.isfinite(latents.ws).all()
    first = encode(plugin, torch.zeros(1, 3, 32, 32), generator).ws
    torch.testing.assert_close(first, encode(plugin, torch.zeros(1, 3, 32, 32), generator).ws)  # built once


def test_a_different_generator_of_the_same_shape_is_warned_about(
    tmp_path: Path,
    generator: Generator,
    encoder: Encoder4Editing,
    image: torch.Tensor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "encoder.safetensors"
    save_encoder(
        path, encoder, latent_avg_for(generator), extra_metadata={FINGERPRINT_KEY: generator_fingerprint(generator)}
    )
    plugin = catalog(tmp_path, encoder=str(path)).create("encoder", "e4e")
    with caplog.at_level(logging.WARNING):
        encode(plugin, image, generator)
    assert "trained for generator" not in caplog.text
    torch.manual_seed(7)
    sibling = Generator(TINY_GENERATOR_W16).eval()
    with caplog.at_level(logging.WARNING):
        encode(plugin, image, sibling)
    assert "trained for generator" in caplog.text


def test_fingerprint_survives_fp16_storage(generator: Generator) -> None:
    copy = Generator(TINY_GENERATOR_W16).eval()
    copy.load_state_dict({key: value.half().float() for key, value in generator.state_dict().items()})
    assert generator_fingerprint(copy) == generator_fingerprint(generator)


def test_suits_says_without_loading_which_generators_no_file_predicts_codes_for(
    tmp_path: Path, generator: Generator, encoder: Encoder4Editing
) -> None:
    other = Generator(OTHER).eval()
    assert catalog(tmp_path, untrained="true").create("encoder", "e4e").suits(other) is None

    save_encoder(tmp_path / "weights" / "encoder-128.safetensors", encoder, latent_avg_for(generator))
    embedded = catalog(tmp_path).create("encoder", "e4e")
    assert embedded.suits(generator) is None
    reason = embedded.suits(other) or ""
    assert "no e4e encoder matches this generator (64², 10 styles of width 16)" in reason
    assert "encoder-128.safetensors (8 styles of width 16)" in reason and "'project' encoder" in reason

    # the official checkpoint is known to be for 18 x 512 codes: an unreadable one is never read to tell
    (tmp_path / "cache" / "e4e_ffhq_encode.pt").write_bytes(b"not a checkpoint")
    both = catalog(tmp_path).create("encoder", "e4e")
    assert "e4e_ffhq_encode.pt (18 styles of width 512)" in (both.suits(other) or "")
    ffhq_shaped = Generator(GeneratorConfig(resolution=1024, w_dim=512, n_mapping=1,
                                            channels={2**i: 4 for i in range(2, 11)}))
    assert both.suits(ffhq_shaped) is None

    # an e4e .pt named by the option cannot be told without loading it: encoding tells
    (tmp_path / "mine.pt").write_bytes(b"not read")
    assert catalog(tmp_path, encoder=str(tmp_path / "mine.pt")).create("encoder", "e4e").suits(other) is None
