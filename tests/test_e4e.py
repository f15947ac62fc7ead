"""Encoder4Editing: official key layout, the conformance golden, and small configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fluidsrv.models.e4e import E4EConfig, Encoder4Editing, GradualStyleBlock
from tests.model_support import recipe_weights

ENCODER_PREFIX = "encoder."


def _encoder_manifest(fixtures_dir: Path) -> dict[str, list[int]]:
    """Key -> shape of the official encoder half (prefix removed), in manifest order."""
    manifest = json.loads((fixtures_dir / "e4e_ffhq_checkpoint.json").read_text())["state_dict"]
    encoder_keys = (key for key in manifest if key.startswith(ENCODER_PREFIX))
    return {key.removeprefix(ENCODER_PREFIX): manifest[key] for key in encoder_keys}


def _small_config(**overrides: object) -> E4EConfig:
    values: dict[str, object] = {
        "num_ws": 8,  # a 32² generator
        "w_dim": 16,
        "input_size": 32,
        "stage_blocks": (1, 1, 2, 1),
        "stage_widths": (8, 8, 16, 16),
        "style_channels": 8,
        "se_reduction": 4,
    }
    values.update(overrides)
    return E4EConfig(**values)  # type: ignore[arg-type]


def test_default_config_has_exactly_the_official_encoder_keys(fixtures_dir: Path) -> None:
    expected = _encoder_manifest(fixtures_dir)
    with torch.device("meta"):
        encoder = Encoder4Editing(E4EConfig())
    actual = {key: list(tensor.shape) for key, tensor in encoder.state_dict().items()}
    assert set(actual) == set(expected), (sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual)))
    assert actual == expected
    assert list(actual) == list(expected)  # same order too: the golden recipe seeds by position


@pytest.mark.slow  # full IR-SE-50 + 18 style blocks at 256²: ~7 s alone, > 20 s on a busy machine
def test_official_golden_codes(fixtures_dir: Path) -> None:
    golden = torch.load(fixtures_dir / "e4e_encoder_golden.pt", weights_only=True)
    with torch.device("meta"):
        encoder = Encoder4Editing(E4EConfig())
    encoder.load_state_dict(recipe_weights(_encoder_manifest(fixtures_dir)), strict=True, assign=True)
    encoder.eval()
    with torch.no_grad():
        codes = encoder(golden["input"].float())  # [1, 18, 512]
    expected = golden["codes"]
    assert codes.shape == expected.shape == (1, 18, 512)
    assert (codes - expected).abs().max().item() <= 1e-3
    assert expected.abs().max().item() > 0.05  # the golden is not trivially zero


def test_small_config_forward_shapes_and_w0_plus_deltas() -> None:
    torch.manual_seed(0)
    config = _small_config()
    encoder = Encoder4Editing(config).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1  # [N, 3, H, W]
    with torch.no_grad():
        codes = encoder(images)  # [2, 8, 16]
        w0, deltas = encoder.encode_parts(images)
    assert codes.shape == (2, config.num_ws, config.w_dim)
    assert torch.equal(deltas[:, 0], torch.zeros_like(w0))
    torch.testing.assert_close(codes, w0.unsqueeze(1) + deltas)
    assert deltas[:, 1:].abs().amin(dim=-1).max() > 0  # later layers really get their own delta
    assert not torch.allclose(codes[0], codes[1])  # depends on the image


def test_progressive_deltas_limit_which_layers_move() -> None:
    torch.manual_seed(0)
    encoder = Encoder4Editing(_small_config()).eval()
    images = torch.rand(1, 3, 32, 32) * 2 - 1  # [N, 3, H, W]
    with torch.no_grad():
        only_w0 = encoder(images, num_deltas=0)  # [1, 8, 16]
        three = encoder(images, num_deltas=3)
        full = encoder(images)
    assert torch.allclose(only_w0, only_w0[:, :1].expand_as(only_w0))
    torch.testing.assert_close(three[:, :4], full[:, :4])
    torch.testing.assert_close(three[:, 4:], only_w0[:, 4:])


def test_split_reads_coarse_middle_fine_maps_for_any_resolution() -> None:
    config = E4EConfig.for_resolution(256, input_size=128)
    assert config.num_ws == 14 and config.resolution == 256
    with torch.device("meta"):
        encoder = Encoder4Editing(config)
    sides = [style.spatial for style in encoder.styles if isinstance(style, GradualStyleBlock)]
    assert sides == [8] * 3 + [16] * 4 + [32] * 7
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in style.modules()) for style in encoder.styles]
    assert convs == [3] * 3 + [4] * 4 + [5] * 7  # strided convs down to 1×1


def test_config_round_trips_through_json() -> None:
    config = _small_config(coarse_end=2, middle_end=5)
    restored = E4EConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.stage_blocks, tuple)
    with pytest.raises(ValueError, match="unknown"):
        E4EConfig.from_dict({**config.to_dict(), "depth": 50})


@pytest.mark.parametrize(
    "overrides",
    [{"num_ws": 7}, {"input_size": 48}, {"stage_blocks": (1, 1, 1)}, {"coarse_end": 5, "middle_end": 4}],
)
def test_invalid_configs_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _small_config(**overrides)


def test_wrong_input_size_is_rejected() -> None:
    encoder = Encoder4Editing(_small_config())
    with pytest.raises(AssertionError, match="expected"):
        encoder(torch.zeros(1, 3, 64, 64))
