"""Checkpoint loaders: round trips in every format, strict key errors, pickle safety, the e4e layout."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from fluidsrv import weights
from fluidsrv.models.e4e import E4EConfig, Encoder4Editing
from fluidsrv.models.stylegan2 import Generator, GeneratorConfig
from fluidsrv.weights import (
    CheckpointError,
    check_state_dict,
    infer_e4e_config,
    infer_generator_config,
    load_e4e,
    load_encoder,
    load_generator,
    read_metadata,
    save_encoder,
    save_generator,
    split_e4e_state,
)
from tests.model_support import TINY_GENERATOR_W16, randomize_batchnorm_statistics

TINY_ENCODER = E4EConfig(  # drives the tiny generator: num_ws 8, w_dim 16
    num_ws=8,
    w_dim=16,
    input_size=32,
    stage_blocks=(1, 1, 2, 1),
    stage_widths=(8, 16, 24, 32),
    style_channels=8,
    se_reduction=4,
    coarse_end=2,
    middle_end=5,
)


@pytest.fixture
def tiny_generator() -> tuple[Generator, torch.Tensor]:
    torch.manual_seed(0)
    generator = Generator(TINY_GENERATOR_W16).eval()
    w_avg = torch.randn(16)  # [w_dim]
    return generator, w_avg


@pytest.fixture
def tiny_encoder() -> Encoder4Editing:
    torch.manual_seed(1)
    encoder = Encoder4Editing(TINY_ENCODER)
    randomize_batchnorm_statistics(encoder)
    return encoder.eval()


def _assert_same_state(actual: torch.nn.Module, expected: torch.nn.Module, tolerance: float = 0.0) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert list(actual_state) == list(expected_state)
    for key, value in expected_state.items():
        assert actual_state[key].dtype == value.dtype, key
        torch.testing.assert_close(actual_state[key], value, atol=tolerance, rtol=tolerance, msg=key)


def _render(generator: Generator) -> torch.Tensor:
    ws = torch.randn(2, generator.num_ws, generator.w_dim, generator=torch.Generator().manual_seed(3))  # [2, L, D]
    with torch.no_grad():
        return generator.synthesis(ws, noise_mode="const")  # [2, 3, 32, 32]


def _e4e_checkpoint(encoder: Encoder4Editing, generator: Generator, latent_avg: torch.Tensor) -> dict[str, Any]:
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in generator.state_dict().items()})
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": generator.resolution, "start_from_latent_avg": True}
    return {"state_dict": state, "latent_avg": latent_avg, "opts": opts}


# ------------------------------------------------------------------------------------------ generator round trips


def test_rosinality_pt_round_trip(tmp_path: Path, tiny_generator: tuple[Generator, torch.Tensor]) -> None:
    generator, w_avg = tiny_generator
    path = tmp_path / "rosinality.pt"
    torch.save({"g_ema": generator.state_dict(), "latent_avg": w_avg}, path)
    loaded, loaded_w_avg = load_generator(path)
    assert loaded.config == TINY_GENERATOR_W16
    _assert_same_state(loaded, generator)
    torch.testing.assert_close(loaded_w_avg, w_avg)
    torch.testing.assert_close(loaded.w_avg, w_avg)
    torch.testing.assert_close(_render(loaded), _render(generator))


def test_rosinality_training_checkpoint_with_args_namespace(
    tmp_path: Path, tiny_generator: tuple[Generator, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    generator, _ = tiny_generator
    path = tmp_path / "training.pt"
    checkpoint = {
        "g": generator.state_dict(),
        "d": {"convs.0.0.weight": torch.zeros(8, 3, 1, 1)},
        "g_ema": generator.state_dict(),
        "g_optim": {"state": {}, "param_groups": [{"lr": 0.002, "params": [0, 1]}]},
        "args": argparse.Namespace(size=32, latent=16, n_mlp=2),
    }
    torch.save(checkpoint, path)
    with caplog.at_level(logging.INFO, logger="fluidsrv.weights"):
        loaded, w_avg = load_generator(path)
    assert "estimating w_avg" in caplog.text
    _assert_same_state(loaded, generator)
    with torch.no_grad():
        z = torch.randn(20_000, 16, generator=torch.Generator().manual_seed(9))  # [S, z_dim]
        w = generator.mapping(z)[:, 0]  # [S, w_dim]
    # Both are sample means of the same distribution: they agree within a few standard errors.
    standard_error = w.std(dim=0) * (1 / 10_000 + 1 / 20_000) ** 0.5  # [w_dim]
    assert ((w_avg - w.mean(dim=0)).abs() < 5 * standard_error).all()
    _, again = load_generator(path)
    torch.testing.assert_close(again, w_avg, atol=0, rtol=0)  # fixed seed: deterministic


def test_e4e_pt_round_trip(
    tmp_path: Path, tiny_generator: tuple[Generator, torch.Tensor], tiny_encoder: Encoder4Editing
) -> None:
    generator, w_avg = tiny_generator
    latent_avg = w_avg.expand(8, -1).clone()  # [num_ws, w_dim], as e4e stores it
    path = tmp_path / "e4e.pt"
    torch.save(_e4e_checkpoint(tiny_encoder, generator, latent_avg), path)

    encoder, decoder, loaded_latent_avg = load_e4e(path)
    assert encoder.config == TINY_ENCODER
    _assert_same_state(encoder, tiny_encoder)
    _assert_same_state(decoder, generator)
    torch.testing.assert_close(loaded_latent_avg, latent_avg)
    images = torch.rand(2, 3, 32, 32) * 2 - 1  # [N, 3, H, W]
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), tiny_encoder(images))

    only_generator, only_w_avg = load_generator(path)
    _assert_same_state(only_generator, generator)
    torch.testing.assert_close(only_w_avg, w_avg)
    only_encoder, encoder_latent_avg = load_encoder(path)
    _assert_same_state(only_encoder, tiny_encoder)
    assert encoder_latent_avg is not None
    torch.testing.assert_close(encoder_latent_avg, latent_avg)


@pytest.mark.parametrize("half", [False, True])
def test_safetensors_generator_round_trip(
    tmp_path: Path, tiny_generator: tuple[Generator, torch.Tensor], half: bool
) -> None:
    generator, w_avg = tiny_generator
    path = tmp_path / "generator.safetensors"
    save_generator(path, generator, w_avg, extra_metadata={"license": "MIT"}, half=half)
    loaded, loaded_w_avg = load_generator(path)
    assert loaded.config == TINY_GENERATOR_W16
    tolerance = 1e-3 if half else 0.0  # fp16 keeps ~11 significant bits
    _assert_same_state(loaded, generator, tolerance)
    torch.testing.assert_close(loaded_w_avg, w_avg, atol=tolerance, rtol=tolerance)
    metadata = read_metadata(path)
    assert metadata["license"] == "MIT"
    assert metadata["format"] == weights.GENERATOR_FORMAT
    assert GeneratorConfig.from_dict(json.loads(metadata["config"])) == TINY_GENERATOR_W16
    if half:
        assert path.stat().st_size < 0.6 * sum(t.numel() * 4 for t in generator.state_dict().values())


def test_safetensors_encoder_round_trip_and_load_e4e(
    tmp_path: Path, tiny_generator: tuple[Generator, torch.Tensor], tiny_encoder: Encoder4Editing
) -> None:
    generator, w_avg = tiny_generator
    save_generator(tmp_path / "generator.safetensors", generator, w_avg)
    save_encoder(tmp_path / "encoder.safetensors", tiny_encoder, generator_file="generator.safetensors")

    encoder, stored_latent_avg = load_encoder(tmp_path / "encoder.safetensors")
    assert encoder.config == TINY_ENCODER and stored_latent_avg is None
    _assert_same_state(encoder, tiny_encoder)

    encoder, decoder, latent_avg = load_e4e(tmp_path / "encoder.safetensors")
    _assert_same_state(decoder, generator)
    torch.testing.assert_close(latent_avg, w_avg.expand(8, -1))  # falls back to the generator's w_avg

    explicit = torch.randn(8, 16)  # [num_ws, w_dim]
    save_encoder(tmp_path / "bare.safetensors", tiny_encoder, latent_avg=explicit)
    with pytest.raises(CheckpointError, match="names no generator"):
        load_e4e(tmp_path / "bare.safetensors")
    _, _, latent_avg = load_e4e(tmp_path / "bare.safetensors", generator_path=tmp_path / "generator.safetensors")
    torch.testing.assert_close(latent_avg, explicit)


def test_load_e4e_rejects_a_generator_of_another_size(
    tmp_path: Path, tiny_encoder: Encoder4Editing, tiny_generator: tuple[Generator, torch.Tensor]
) -> None:
    _, w_avg = tiny_generator
    other = Generator(GeneratorConfig(resolution=16, w_dim=16, n_mapping=2, channels={4: 8, 8: 8, 16: 8}))
    save_generator(tmp_path / "other.safetensors", other, w_avg)
    save_encoder(tmp_path / "encoder.safetensors", tiny_encoder, generator_file="other.safetensors")
    with pytest.raises(CheckpointError, match=r"predicts \[8, 16\] codes"):
        load_e4e(tmp_path / "encoder.safetensors")


# ------------------------------------------------------------------------------------------ strictness and safety


def _write_rosinality(path: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save({"g_ema": state}, path)


def _write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    config = json.dumps(TINY_GENERATOR_W16.to_dict())
    metadata = {"format": "fluidsrv-generator", "config": config}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)


@pytest.mark.parametrize("writer", [_write_rosinality, _write_safetensors], ids=["rosinality", "safetensors"])
def test_extra_and_missing_keys_fail_naming_them(
    tmp_path: Path, tiny_generator: tuple[Generator, torch.Tensor], writer: Any
) -> None:
    generator, _ = tiny_generator
    state = dict(generator.state_dict())
    writer(tmp_path / "extra", {**state, "bogus.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): bogus\.extra\.weight"):
        load_generator(tmp_path / "extra")

    del state["convs.1.conv.modulation.bias"]
    writer(tmp_path / "missing", state)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): convs\.1\.conv\.modulation\.bias"):
        load_generator(tmp_path / "missing")


def test_wrong_shapes_fail_naming_the_key(tmp_path: Path, tiny_encoder: Encoder4Editing) -> None:
    state = dict(tiny_encoder.state_dict())
    state["latlayer1.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"wrong shapes \(1\): latlayer1\.bias \(5,\) != \(32,\)"):
        check_state_dict(tiny_encoder, state, "test")


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it calls exec, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("container", ["torch_zip", "bare_pickle"])
@pytest.mark.parametrize("loader", [load_generator, load_encoder, load_e4e], ids=lambda f: f.__name__)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, container: str, loader: Any) -> None:
    marker = tmp_path / "marker.txt"
    payload = {"g_ema": {"style.1.weight": _RunsCodeWhenUnpickled(marker)}, "state_dict": {}}
    path = tmp_path / "evil.pt"
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        loader(path)
    assert not marker.exists()
    # The payload is real: an unsafe load does run it.
    if container == "torch_zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b"", b"\x00" * 64])
def test_unknown_format_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="unrecognized checkpoint format"):
        load_generator(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_generator(tmp_path / "absent.pt")


@pytest.mark.parametrize("first_byte", [0x80, ord("P")])
def test_safetensors_header_length_never_looks_like_a_pickle(
    tmp_path: Path, tiny_generator: tuple[Generator, torch.Tensor], first_byte: int
) -> None:
    """A safetensors header length whose low byte is 0x80 (a pickle's opcode) or 'P' still reads as safetensors."""
    generator, w_avg = tiny_generator
    path = tmp_path / "generator.safetensors"
    for padding in range(512):
        save_generator(path, generator, w_avg, extra_metadata={"padding": "x" * padding})
        if path.read_bytes()[0] == first_byte:
            break
    assert path.read_bytes()[0] == first_byte
    loaded, loaded_w_avg = load_generator(path)
    torch.testing.assert_close(loaded_w_avg, w_avg)
    torch.testing.assert_close(loaded.state_dict(), generator.state_dict())


def test_torch_file_without_a_generator_names_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"model": {"weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"no generator found.*\['model'\]"):
        load_generator(path)


def test_encoder_file_is_not_a_generator(tmp_path: Path, tiny_encoder: Encoder4Editing) -> None:
    save_encoder(tmp_path / "encoder.safetensors", tiny_encoder)
    with pytest.raises(CheckpointError, match="expected a 'fluidsrv-generator'"):
        load_generator(tmp_path / "encoder.safetensors")


def test_reserved_metadata_cannot_be_overridden(tmp_path: Path, tiny_generator: tuple[Generator, torch.Tensor]) -> None:
    generator, w_avg = tiny_generator
    with pytest.raises(ValueError, match="reserved"):
        save_generator(tmp_path / "g.safetensors", generator, w_avg, extra_metadata={"config": "{}"})


# ------------------------------------------------------------------------------------------ the official e4e layout


def test_full_e4e_checkpoint_layout_is_split_and_accepted(fixtures_dir: Path) -> None:
    manifest = json.loads((fixtures_dir / "e4e_ffhq_checkpoint.json").read_text())
    with torch.device("meta"):
        state = {key: torch.empty(shape) for key, shape in manifest["state_dict"].items()}
    encoder_state, decoder_state = split_e4e_state(state)
    assert len(encoder_state) + len(decoder_state) == len(state)

    encoder_config = infer_e4e_config(encoder_state)
    generator_config = infer_generator_config(decoder_state)
    assert encoder_config == E4EConfig()
    assert generator_config == GeneratorConfig(resolution=1024)
    assert manifest["latent_avg"] == [generator_config.num_ws, generator_config.w_dim]
    with torch.device("meta"):
        encoder, generator = Encoder4Editing(encoder_config), Generator(generator_config)
    check_state_dict(encoder, encoder_state, "encoder.*")  # raises on any mismatch
    check_state_dict(generator, decoder_state, "decoder.*")

    with pytest.raises(CheckpointError, match=r"outside encoder\./decoder\. \(1\): latent_avg"):
        split_e4e_state({**state, "latent_avg": torch.empty(18, 512, device="meta")})
