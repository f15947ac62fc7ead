"""StyleGAN2 generator / discriminator: rosinality conformance, golden outputs, ops and API behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import signal
from torch.nn import functional as F

from fluidsrv.latents import mix_styles
from fluidsrv.models.ops import fused_bias_leaky_relu, make_fir_kernel, upfirdn2d
from fluidsrv.models.stylegan2 import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    GeneratorConfig,
    ModulatedConv2d,
    config_f_channels,
)
from tests.model_support import build_golden_generator, golden_generator_config, tiny_generator

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COPIED_FIXTURES = [
    "stylegan2_rosinality_256_cm2.json",
    "stylegan2_rosinality_512_cm2.json",
    "stylegan2_rosinality_1024_cm2.json",
    "stylegan2_rosinality_discriminator_128_cm2.json",
    "stylegan2_rosinality_discriminator_1024_cm2.json",
    "stylegan2_small_golden.pt",
]


def load_manifest(name: str) -> dict[str, tuple[int, ...]]:
    with open(FIXTURES / name) as handle:
        return {key: tuple(shape) for key, shape in json.load(handle).items()}


def state_dict_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def meta_state_dict(manifest: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in manifest.items()}


def tiny_discriminator(resolution: int = 16, seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    config = DiscriminatorConfig(resolution=resolution, channels={r: 8 for r in (4, 8, 16, 32)})
    return Discriminator(config)


# ---------------------------------------------------------------------------------------------------------------
# Conformance with rosinality checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_fixture_copies_equal_shared(shared_dir: Path) -> None:
    for name in COPIED_FIXTURES:
        assert (FIXTURES / name).read_bytes() == (shared_dir / "conformance" / name).read_bytes(), name


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_generator_keys_and_shapes_equal_manifest(resolution: int) -> None:
    manifest = load_manifest(f"stylegan2_rosinality_{resolution}_cm2.json")
    with torch.device("meta"):
        generator = Generator(GeneratorConfig(resolution=resolution))
    shapes = state_dict_shapes(generator)
    assert shapes == manifest
    assert list(shapes) == list(manifest)  # rosinality's key order too, so exports look like the original
    if resolution == 1024:
        assert len(shapes) == 171
    assert generator.num_ws == 2 * int(math.log2(resolution)) - 2


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_generator_loads_manifest_state_dict_strictly(resolution: int) -> None:
    manifest = load_manifest(f"stylegan2_rosinality_{resolution}_cm2.json")
    with torch.device("meta"):
        generator = Generator(GeneratorConfig(resolution=resolution))
    result = generator.load_state_dict(meta_state_dict(manifest), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "w_avg" not in generator.state_dict()  # non-persistent: rosinality checkpoints have no such key


def test_generator_rejects_state_dict_with_a_missing_key() -> None:
    manifest = load_manifest("stylegan2_rosinality_256_cm2.json")
    state = meta_state_dict(manifest)
    del state["convs.3.noise.weight"]
    with torch.device("meta"):
        generator = Generator(GeneratorConfig(resolution=256))
    with pytest.raises(RuntimeError, match=r"convs\.3\.noise\.weight"):
        generator.load_state_dict(state, strict=True, assign=True)


@pytest.mark.parametrize("resolution", [128, 1024])
def test_discriminator_keys_and_shapes_equal_manifest(resolution: int) -> None:
    manifest = load_manifest(f"stylegan2_rosinality_discriminator_{resolution}_cm2.json")
    with torch.device("meta"):
        discriminator = Discriminator(DiscriminatorConfig(resolution=resolution))
    assert state_dict_shapes(discriminator) == manifest
    assert list(state_dict_shapes(discriminator)) == list(manifest)
    result = discriminator.load_state_dict(meta_state_dict(manifest), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_golden_state_dict_loads_strictly(stylegan2_golden: dict[str, Any]) -> None:
    generator = Generator(golden_generator_config(stylegan2_golden))
    result = generator.load_state_dict(stylegan2_golden["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert generator.num_ws == stylegan2_golden["config"]["n_latent"] == 10


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance, f"max abs diff {difference:.3g} > {tolerance}"


@torch.no_grad()
def test_golden_w_from_z(golden_generator: Generator, stylegan2_golden: dict[str, Any]) -> None:
    assert_close(golden_generator.mapping(stylegan2_golden["z"]), stylegan2_golden["w_from_z"])


@torch.no_grad()
def test_golden_img_from_z(golden_generator: Generator, stylegan2_golden: dict[str, Any]) -> None:
    ws = golden_generator.mapping(stylegan2_golden["z"])  # [2, 10, 64]
    assert_close(golden_generator.synthesis(ws, noise_mode="const"), stylegan2_golden["img_from_z"])
    assert_close(golden_generator(stylegan2_golden["z"]), stylegan2_golden["img_from_z"])


@torch.no_grad()
def test_golden_img_truncated(golden_generator: Generator, stylegan2_golden: dict[str, Any]) -> None:
    ws = golden_generator.mapping(stylegan2_golden["z"], truncation_psi=0.7, w_avg=stylegan2_golden["mean_latent"])
    assert_close(golden_generator.synthesis(ws), stylegan2_golden["img_truncated_0.7"])


@torch.no_grad()
def test_golden_img_from_w_plus(golden_generator: Generator, stylegan2_golden: dict[str, Any]) -> None:
    w_plus, expected = stylegan2_golden["w_plus"], stylegan2_golden["img_from_w_plus"]
    assert_close(golden_generator.synthesis(w_plus), expected)
    for i in range(2):  # batch 1 takes the weight-modulation path, batch 2 the activation-scaling one
        assert_close(golden_generator.synthesis(w_plus[i : i + 1]), expected[i : i + 1])


@torch.no_grad()
def test_golden_in_both_memory_layouts(stylegan2_golden: dict[str, Any]) -> None:
    generator = build_golden_generator(stylegan2_golden)
    layouts: list[bool] = []
    hook = generator.convs[-1].register_forward_hook(
        lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
    )
    for channels_last in (True, False):
        generator.channels_last_on_cpu = channels_last
        for batch in (slice(0, 1), slice(0, 2)):
            img = generator.synthesis(stylegan2_golden["w_plus"][batch])
            assert img.is_contiguous()
            assert_close(img, stylegan2_golden["img_from_w_plus"][batch])
    hook.remove()
    assert layouts == [True, True, False, False]  # the layout reaches the last layer


@torch.no_grad()
def test_golden_img_mixed(golden_generator: Generator, stylegan2_golden: dict[str, Any]) -> None:
    ws = golden_generator.mapping(stylegan2_golden["z"])  # [2, 10, 64]
    mixed = mix_styles(ws, ws.flip(0), start=4, stop=golden_generator.num_ws)
    assert_close(golden_generator.synthesis(mixed), stylegan2_golden["img_mixed_inject4"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_golden_on_cuda(golden_generator: Generator, stylegan2_golden: dict[str, Any]) -> None:
    generator = build_golden_generator(stylegan2_golden).cuda()
    torch.backends.cudnn.allow_tf32 = False
    img = generator.synthesis(stylegan2_golden["w_plus"].cuda()).cpu()
    assert_close(img, stylegan2_golden["img_from_w_plus"])


# ---------------------------------------------------------------------------------------------------------------
# Generator API
# ---------------------------------------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    config = GeneratorConfig(resolution=64, w_dim=32, n_mapping=3, channels={4: 16, 8: 16, 16: 8, 32: 8, 64: 4})
    restored = GeneratorConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and hash(restored) == hash(config)
    assert dict(restored.channels) == {4: 16, 8: 16, 16: 8, 32: 8, 64: 4}
    assert GeneratorConfig.from_dict(GeneratorConfig().to_dict()) == GeneratorConfig()
    discriminator = DiscriminatorConfig(resolution=128, channel_multiplier=1)
    assert DiscriminatorConfig.from_dict(json.loads(json.dumps(discriminator.to_dict()))) == discriminator


def test_config_defaults_are_config_f() -> None:
    config = GeneratorConfig()
    assert (config.resolution, config.w_dim, config.n_mapping, config.lr_mlp) == (1024, 512, 8, 0.01)
    assert config.blur_kernel == (1, 3, 3, 1)
    assert dict(config.channels) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    assert dict(GeneratorConfig(resolution=256, channel_multiplier=1).channels) == config_f_channels(256, 1)
    assert config_f_channels(256, 1)[256] == 64
    assert config.num_ws == 18


def test_config_rejects_bad_values() -> None:
    with pytest.raises(AssertionError, match="power of two"):
        GeneratorConfig(resolution=100)
    with pytest.raises(AssertionError, match="lacks widths"):
        GeneratorConfig(resolution=16, channels={4: 8, 8: 8})
    with pytest.raises(AssertionError, match="unknown GeneratorConfig keys"):
        GeneratorConfig.from_dict({"resolution": 16, "size": 16})


def test_properties() -> None:
    generator = tiny_generator(resolution=32)
    assert (generator.resolution, generator.w_dim, generator.num_ws) == (32, 16, 8)
    ws = generator.mapping(torch.randn(3, 16))
    assert ws.shape == (3, 8, 16)
    assert torch.equal(ws[:, 0], ws[:, -1])  # w broadcast to every layer
    assert generator.synthesis(ws).shape == (3, 3, 32, 32)


@torch.no_grad()
def test_noise_modes() -> None:
    generator = tiny_generator()
    for name, buffer in generator.noises.named_buffers():
        assert buffer.abs().sum() > 0, name
    for block in [generator.conv1, *generator.convs]:
        block.noise.weight.fill_(0.5)  # make the noise visible (rosinality initialises the strength to 0)
    ws = generator.mapping(torch.randn(1, 16)).repeat(2, 1, 1)  # two identical samples

    const = generator.synthesis(ws, noise_mode="const")
    assert torch.equal(const, generator.synthesis(ws, noise_mode="const"))
    assert torch.equal(const[0], const[1])  # the stored noise is shared by the batch

    none = generator.synthesis(ws, noise_mode="none")
    assert torch.equal(none, generator.synthesis(ws, noise_mode="none"))
    assert (none - const).abs().max() > 1e-3

    torch.manual_seed(1)
    random = generator.synthesis(ws, noise_mode="random")
    assert (random[0] - random[1]).abs().max() > 1e-3  # fresh noise per sample
    assert (random - const).abs().max() > 1e-3 and (random - none).abs().max() > 1e-3

    for buffer in generator.noises.buffers():
        buffer.zero_()
    assert_close(generator.synthesis(ws, noise_mode="const"), none, tolerance=1e-6)

    with pytest.raises(AssertionError, match="noise_mode"):
        generator.synthesis(ws, noise_mode="sometimes")  # type: ignore[arg-type]


@torch.no_grad()
def test_truncation() -> None:
    generator = tiny_generator()
    z = torch.randn(4, 16)
    untruncated = generator.mapping(z)
    assert torch.equal(generator.mapping(z, truncation_psi=1.0), untruncated)

    w_avg = generator.estimate_w_avg(num_samples=512, batch_size=200)  # [16]
    assert torch.equal(generator.w_avg, w_avg) and w_avg.abs().sum() > 0
    assert_close(generator.mapping(z, truncation_psi=0.0), w_avg.expand(4, 6, 16), tolerance=1e-6)
    half = generator.mapping(z, truncation_psi=0.5)
    assert_close(half, (untruncated + w_avg) / 2, tolerance=1e-6)

    per_layer = torch.randn(6, 16)  # e.g. an e4e latent_avg [num_ws, w_dim]
    assert_close(generator.mapping(z, truncation_psi=0.0, w_avg=per_layer), per_layer.expand(4, 6, 16), 1e-6)


@torch.no_grad()
def test_estimate_w_avg_is_the_mean_of_mapped_z() -> None:
    generator = tiny_generator()
    estimate = generator.estimate_w_avg(num_samples=300, batch_size=128, seed=3).clone()
    rng = torch.Generator().manual_seed(3)
    z = torch.cat([torch.randn(n, 16, generator=rng) for n in (128, 128, 44)])  # same draws, same chunks
    assert_close(estimate, generator.style(z).mean(dim=0), tolerance=1e-5)
    other_seed = generator.estimate_w_avg(num_samples=300, seed=4)
    assert (other_seed - estimate).abs().max() > 0


@pytest.mark.parametrize("batch", [1, 2])
def test_generator_backward_reaches_every_parameter(batch: int) -> None:
    generator = tiny_generator().train()
    for block in [generator.conv1, *generator.convs]:
        block.noise.weight.data.fill_(0.1)
    ws = generator.mapping(torch.randn(batch, 16))
    generator.synthesis(ws, noise_mode="random").square().mean().backward()
    missing = [name for name, p in generator.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


# ---------------------------------------------------------------------------------------------------------------
# Ops and layers against independent references
# ---------------------------------------------------------------------------------------------------------------


def reference_upfirdn2d(image: np.ndarray, kernel: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    height, width = image.shape
    upsampled = np.zeros((height * up, width * up))
    upsampled[::up, ::up] = image
    before, after = pad
    padded = np.pad(upsampled, [(max(before, 0), max(after, 0))] * 2)
    crop = slice(max(-before, 0), padded.shape[0] - max(-after, 0))
    padded = padded[crop, crop]
    return signal.convolve2d(padded, kernel, mode="valid")[::down, ::down]


@pytest.mark.parametrize(
    ("up", "down", "pad"),
    [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (0, 0)), (1, 1, (-1, 3)), (3, 1, (0, 2))],
)
def test_upfirdn2d_matches_a_direct_convolution(up: int, down: int, pad: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 3, 9, 9))
    kernel = rng.standard_normal((4, 3))  # asymmetric and non-square: catches a missing flip or swapped axes
    out = upfirdn2d(torch.from_numpy(image), torch.from_numpy(kernel), up=up, down=down, pad=pad).numpy()
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(out[n, c], reference_upfirdn2d(image[n, c], kernel, up, down, pad), atol=1e-10)


def test_make_fir_kernel() -> None:
    kernel = make_fir_kernel((1, 3, 3, 1), gain=4.0)
    assert kernel.shape == (4, 4)
    assert kernel.sum().item() == pytest.approx(4.0)
    assert torch.allclose(kernel, kernel.t())


def test_fused_bias_leaky_relu() -> None:
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    expected = F.leaky_relu(x + bias[None, :, None, None], 0.2) * math.sqrt(2)
    torch.testing.assert_close(fused_bias_leaky_relu(x, bias), expected)
    torch.testing.assert_close(fused_bias_leaky_relu(x), F.leaky_relu(x, 0.2) * math.sqrt(2))
    x.requires_grad_(True)
    bias.requires_grad_(True)
    assert torch.autograd.gradcheck(fused_bias_leaky_relu, (x, bias))
    assert torch.autograd.gradgradcheck(fused_bias_leaky_relu, (x, bias))


def reference_modulated_conv(layer: ModulatedConv2d, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The textbook formulation: one modulated (and demodulated) weight tensor per sample."""
    outputs = []
    for sample, style in zip(x, w):
        scales = layer.modulation(style[None])[0]  # [I]
        weight = layer.weight[0] * layer.weight_gain * scales[None, :, None, None]  # [O, I, k, k]
        if layer.demodulate:
            weight = weight / torch.sqrt(weight.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        if layer.upsample:
            assert layer.blur is not None
            out = layer.blur(F.conv_transpose2d(sample[None], weight.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(sample[None], weight, padding=layer.padding)
        outputs.append(out)
    return torch.cat(outputs)


@pytest.mark.parametrize(
    ("upsample", "demodulate", "kernel_size"), [(False, True, 3), (True, True, 3), (False, False, 1)]
)
def test_modulated_conv_matches_per_sample_weights(upsample: bool, demodulate: bool, kernel_size: int) -> None:
    torch.manual_seed(0)
    layer = ModulatedConv2d(6, 5, kernel_size, 7, demodulate=demodulate, upsample=upsample).double()
    layer.modulation.bias.data.normal_()  # styles with varied signs and sizes
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    w = torch.randn(3, 7, dtype=torch.float64)
    expected = reference_modulated_conv(layer, x, w)
    torch.testing.assert_close(layer(x, w), expected)
    torch.testing.assert_close(layer(x[1:2], w[1:2]), expected[1:2])  # batch 1 and batch > 1 agree
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last), w), expected)


# ---------------------------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------------------------


def test_discriminator_scores_a_batch() -> None:
    discriminator = tiny_discriminator()
    images = torch.randn(8, 3, 16, 16)
    logits = discriminator(images)
    assert logits.shape == (8, 1) and torch.isfinite(logits).all()
    channels_last = discriminator(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="multiple of the stddev group"):
        discriminator(torch.randn(6, 3, 16, 16))


def test_minibatch_stddev_matches_a_per_group_loop() -> None:
    discriminator = tiny_discriminator()
    features = torch.randn(8, 6, 4, 4)
    out = discriminator.minibatch_stddev(features)
    assert out.shape == (8, 7, 4, 4)
    assert torch.equal(out[:, :6], features)
    for n in range(8):
        members = features[n % 2 :: 2]  # group size 4 → 2 groups; sample n is in group n mod 2
        expected = torch.sqrt(members.var(dim=0, unbiased=False) + 1e-8).mean()
        torch.testing.assert_close(out[n, 6], expected.expand(4, 4))


def test_downsampling_skip_equals_blur_then_strided_conv() -> None:
    discriminator = tiny_discriminator()
    block = discriminator.convs[1]
    x = torch.randn(2, 8, 16, 16)
    blurred = upfirdn2d(x, make_fir_kernel((1, 3, 3, 1)), pad=(1, 1))  # [2, 8, 15, 15]
    conv = block.skip[1]
    expected = F.conv2d(blurred, conv.weight * conv.weight_gain, stride=2)  # [2, 8, 8, 8]
    torch.testing.assert_close(block.skip(x), expected)


def test_discriminator_supports_r1_double_backward() -> None:
    discriminator = tiny_discriminator()
    images = torch.randn(4, 3, 16, 16, requires_grad=True)
    (gradient,) = torch.autograd.grad(discriminator(images).sum(), images, create_graph=True)
    gradient.square().sum().backward()
    # the input gradient of a piecewise-linear network depends on every weight (biases only pick the pieces)
    weights = {name: p for name, p in discriminator.named_parameters() if name.endswith("weight")}
    assert len(weights) == 10
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights.values())


def test_mix_styles() -> None:
    ws_a = torch.zeros(2, 6, 3)
    ws_b = torch.ones(2, 6, 3)
    mixed = mix_styles(ws_a, ws_b, start=2, stop=4)
    assert mixed[:, 2:4].eq(1).all() and mixed[:, :2].eq(0).all() and mixed[:, 4:].eq(0).all()
    assert mix_styles(ws_a, ws_b[:1], start=3).sum() == 2 * 3 * 3  # batch-1 source broadcasts; stop = num_ws
    assert ws_a.eq(0).all()  # inputs untouched
    with pytest.raises(AssertionError):
        mix_styles(ws_a, ws_b, start=4, stop=7)


@pytest.mark.slow
@torch.no_grad()
def test_full_size_1024_forward() -> None:
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig()).eval()
    img = generator(torch.randn(1, 512))
    assert img.shape == (1, 3, 1024, 1024) and torch.isfinite(img).all()
    assert img.std() > 0
