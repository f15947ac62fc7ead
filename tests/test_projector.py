"""The projector (w then w+, noise regularisation, frames, clean cancellation), its plugin, and the offline
perceptual distances and metrics it and the benchmark use (Laplacian pyramid, discriminator features, LPIPS-VGG
layout, PSNR, MS-SSIM)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.ndimage import correlate1d

from fluidsrv.models.stylegan2 import Discriminator, Generator
from fluidsrv.perceptual import (
    LPIPS_CHANNELS,
    LaplacianPyramidDistance,
    LpipsVgg,
    VggFeatures,
    WeightedSum,
    discriminator_distance,
    inversion_distance,
    load_discriminator,
    load_lpips,
    lpips_files,
    ms_ssim,
    psnr,
    ssim_components,
)
from fluidsrv.plugins import StageCatalog, build_plugin_manager
from fluidsrv.projector import ProjectorConfig, learning_rate_factor, noise_regularisation, project
from fluidsrv.stages import Latents, PluginContext
from fluidsrv.training.configs import TINY_32
from tests.model_support import drain

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target(tiny: Generator) -> torch.Tensor:
    """A face the tiny generator can draw exactly: [1, 3, 32, 32]."""
    with torch.no_grad():
        return tiny.synthesis(tiny.mapping(torch.randn(1, 32, generator=torch.Generator().manual_seed(3))))


def mse_of(generator: Generator, ws: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((generator.synthesis(ws) - target).square().mean())


# ------------------------------------------------------------------------------------------------ projector


def test_projection_reaches_a_reachable_target_and_leaves_the_generator_alone(
    tiny: Generator, target: torch.Tensor
) -> None:
    before = {key: value.clone() for key, value in tiny.state_dict().items()}
    start = mse_of(tiny, tiny.w_avg.view(1, 1, -1).repeat(1, tiny.num_ws, 1), target)
    config = ProjectorConfig(steps=60, wplus_steps=20, frame_every=20, w_std_samples=200)
    steps, latents = drain(project(tiny, target, config))

    assert isinstance(latents, Latents)
    assert latents.w.shape == (1, 32) and latents.ws.shape == (1, tiny.num_ws, 32)
    w_only = mse_of(tiny, latents.w.unsqueeze(1).repeat(1, tiny.num_ws, 1), target)
    final = mse_of(tiny, latents.ws, target)
    assert w_only < 0.25 * start, (w_only, start)
    assert final < w_only, (final, w_only)  # the w+ phase refines the w result
    assert [p.step for p in steps] == list(range(1, 81)) and {p.total for p in steps} == {80}
    assert [p.step for p in steps if p.frame is not None] == [20, 40, 60, 80]
    frame = steps[-1].frame
    assert frame is not None and frame.dtype == np.uint8 and frame.shape == (32, 32, 3)
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(parameter.grad is None for parameter in tiny.parameters())


def test_w_only_projection_returns_w_repeated(tiny: Generator, target: torch.Tensor) -> None:
    config = ProjectorConfig(steps=3, wplus_steps=0, frame_every=0, w_std_samples=50)
    _, latents = drain(project(tiny, target, config))
    torch.testing.assert_close(latents.ws, latents.w.unsqueeze(1).expand(-1, tiny.num_ws, -1))


def test_closing_the_job_mid_way_leaves_no_state(tiny: Generator, target: torch.Tensor) -> None:
    before = {key: value.clone() for key, value in tiny.state_dict().items()}
    job = project(tiny, target, ProjectorConfig(steps=50, w_std_samples=50))
    for _ in range(4):
        next(job)
    job.close()
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(parameter.grad is None and parameter.requires_grad for parameter in tiny.parameters())


def test_noise_regularisation_penalises_correlated_noise() -> None:
    rng = torch.Generator().manual_seed(0)
    white = [torch.randn(1, 1, 32, 32, generator=rng)]
    smooth = [torch.nn.functional.avg_pool2d(torch.randn(1, 1, 35, 35, generator=rng), 4, stride=1) * 4]
    assert float(noise_regularisation(white)) < 0.01 < float(noise_regularisation(smooth))


def test_learning_rate_schedule_ramps_up_and_down() -> None:
    assert learning_rate_factor(0.0, 0.05, 0.25) == 0.0
    assert learning_rate_factor(0.5, 0.05, 0.25) == pytest.approx(1.0)
    assert learning_rate_factor(0.999, 0.05, 0.25) < 0.01
    assert 0 < learning_rate_factor(0.02, 0.05, 0.25) < learning_rate_factor(0.04, 0.05, 0.25) < 1


def test_project_plugin_through_the_catalog(tiny: Generator, target: torch.Tensor, tmp_path: Path) -> None:
    context = PluginContext(device=torch.device("cpu"), weights_dir=tmp_path, cache_dir=tmp_path)
    options = {"encoder.project": {"steps": "4", "wplus_steps": "2", "frame_every": "2", "w_std_samples": "50"}}
    catalog = StageCatalog(build_plugin_manager(load_entry_points=False), context, options=options)
    encoder = catalog.create("encoder", "project")
    steps, latents = drain(encoder.encode(target, tiny))
    assert len(steps) == 6 and sum(p.frame is not None for p in steps) == 3
    assert latents.ws.shape == (1, tiny.num_ws, 32)

    bad = StageCatalog(
        build_plugin_manager(load_entry_points=False),
        context,
        options={"encoder.project": {"discriminator": str(tmp_path / "absent.safetensors")}},
    )
    assert "does not exist" in (bad.unavailable_reason("encoder", "project") or "")
    wrong = StageCatalog(
        build_plugin_manager(load_entry_points=False), context, options={"encoder.project": {"steps": "many"}}
    )
    assert "steps" in (wrong.unavailable_reason("encoder", "project") or "")


# --------------------------------------------------------------------------------------- perceptual distances


def _noisy(images: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    return images + level * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """Two smooth, structured test images [2, 3, 64, 64] in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    first = torch.stack([torch.sin(3 * x), torch.cos(4 * y), x * y])
    second = torch.stack([torch.cos(5 * x * y), torch.sin(2 * (x + y)), x.square() - y])
    return torch.stack([first, second]).clamp(-1, 1)


def test_laplacian_distance_is_zero_for_equal_images_and_grows_with_noise(faces: torch.Tensor) -> None:
    distance = LaplacianPyramidDistance()
    assert torch.allclose(distance(faces, faces), torch.zeros(2), atol=1e-5)
    values = [distance(_noisy(faces, level), faces) for level in (0.02, 0.1, 0.4)]
    assert bool((values[0] < values[1]).all() and (values[1] < values[2]).all())
    probe = faces.clone().requires_grad_(True)
    distance(probe, _noisy(faces, 0.1)).sum().backward()
    assert probe.grad is not None and float(probe.grad.abs().sum()) > 0


def _tiny_discriminator() -> Discriminator:
    torch.manual_seed(4)
    return Discriminator(TINY_32.discriminator).eval()


def test_discriminator_features_load_from_a_gan_checkpoint_and_a_rosinality_file(tmp_path: Path) -> None:
    discriminator = _tiny_discriminator()
    state = discriminator.state_dict()
    gan = tmp_path / "checkpoint-0000001.safetensors"
    metadata = {"format": "fluidsrv-gan-checkpoint", "train_config": json.dumps(TINY_32.to_dict())}
    save_file({f"D.{key}": value.contiguous() for key, value in state.items()}, str(gan), metadata=metadata)
    rosinality = tmp_path / "rosinality.pt"
    torch.save({"d": state, "g_ema": {}}, rosinality)

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = discriminator_distance(discriminator)(images, _noisy(images, 0.2))
    for path in (gan, rosinality):
        loaded = load_discriminator(path)
        assert loaded.config.channels == discriminator.config.channels
        distance = discriminator_distance(loaded)
        torch.testing.assert_close(distance(images, _noisy(images, 0.2)), reference)
        assert torch.allclose(distance(images, images), torch.zeros(2), atol=1e-6)
        assert not any(parameter.requires_grad for parameter in distance.parameters())
    with pytest.raises(ValueError, match="discriminator"):
        torch.save({"g_ema": {}}, tmp_path / "no_d.pt")
        load_discriminator(tmp_path / "no_d.pt")


def _fake_lpips_states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    vgg = {f"features.{key}": value for key, value in VggFeatures().features.state_dict().items()}
    lins = {f"lin{i}.model.1.weight": torch.rand(1, channels, 1, 1) for i, channels in enumerate(LPIPS_CHANNELS)}
    return vgg, lins


def test_lpips_vgg_uses_the_published_layouts(faces: torch.Tensor) -> None:
    vgg, lins = _fake_lpips_states()
    lpips = LpipsVgg(vgg, lins)
    faces = faces[..., ::2, ::2]  # 32²: enough for VGG's five taps, and quick
    assert torch.allclose(lpips(faces, faces), torch.zeros(2), atol=1e-6)
    close, far = lpips(_noisy(faces, 0.05), faces), lpips(_noisy(faces, 0.5), faces)
    assert bool((close > 0).all() and (close < far).all())
    del lins["lin3.model.1.weight"]
    with pytest.raises(ValueError, match="lin3"):
        LpipsVgg(vgg, lins)


def test_lpips_is_only_used_when_its_files_are_cached(tmp_path: Path) -> None:
    assert lpips_files(tmp_path) is None and load_lpips(tmp_path) is None
    assert isinstance(inversion_distance(tmp_path), LaplacianPyramidDistance)
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"")
    assert lpips_files(tmp_path) is None  # the linear layers are missing too
    (tmp_path / "vgg.pth").write_bytes(b"")
    assert lpips_files(tmp_path) == (tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_lpips(tmp_path)  # empty files are refused with the reason, never silently ignored


def test_weighted_sum_adds_its_terms(faces: torch.Tensor) -> None:
    pyramid = LaplacianPyramidDistance()
    total = WeightedSum([(1.0, pyramid), (2.0, pyramid)])
    noisy = _noisy(faces, 0.1)
    torch.testing.assert_close(total(noisy, faces), 3.0 * pyramid(noisy, faces))


# ------------------------------------------------------------------------------------------------ metrics


def test_psnr_of_a_constant_offset() -> None:
    a = torch.zeros(1, 3, 16, 16)
    assert float(psnr(a + 0.02, a)) == pytest.approx(10 * math.log10(4 / 0.0004), rel=1e-5)


def _scipy_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Single-scale SSIM with an 11-tap σ=1.5 Gaussian over the valid region, per channel (data range 2)."""
    taps = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    taps /= taps.sum()

    def blur(x: np.ndarray) -> np.ndarray:
        out = correlate1d(correlate1d(x, taps, axis=0, mode="constant"), taps, axis=1, mode="constant")
        return out[5:-5, 5:-5]

    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    values = []
    for channel in range(3):
        x, y = a[channel].astype(np.float64), b[channel].astype(np.float64)
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        ssim = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(ssim.mean())
    return float(np.mean(values))


def test_ssim_matches_an_independent_scipy_implementation(faces: torch.Tensor) -> None:
    noisy = _noisy(faces, 0.2)
    ssim, _ = ssim_components(noisy, faces)
    for index in range(2):
        expected = _scipy_ssim(noisy[index].numpy(), faces[index].numpy())
        assert float(ssim[index]) == pytest.approx(expected, abs=1e-4)


def test_ms_ssim_is_one_for_equal_images_and_falls_with_noise(faces: torch.Tensor) -> None:
    big = torch.nn.functional.interpolate(faces, size=128, mode="bilinear")  # 128²: the benchmark's size
    torch.testing.assert_close(ms_ssim(big, big), torch.ones(2))
    values = [ms_ssim(_noisy(big, level), big) for level in (0.05, 0.2, 0.6)]
    assert bool((values[0] > values[1]).all() and (values[1] > values[2]).all())
    assert bool(((values[2] >= 0) & (values[0] <= 1)).all())
    torch.testing.assert_close(ms_ssim(_noisy(big, 0.2), big), ms_ssim(big, _noisy(big, 0.2)))


# ------------------------------------------------------------------------------------------------ the CLI


def test_project_cli_films_the_search_on_a_real_photo(shared_dir: Path, tmp_path: Path, tiny: Generator) -> None:
    import imageio.v3 as iio
    from safetensors.torch import load_file

    from fluidsrv.cli import main
    from fluidsrv.weights import save_generator

    photo = shared_dir / "photos" / "deepface_img10.jpg"  # a small real photo with one face
    generator_path = tmp_path / "tiny.safetensors"
    save_generator(generator_path, tiny, tiny.w_avg)
    video, image, latents = tmp_path / "steps.mp4", tmp_path / "result.png", tmp_path / "latents.safetensors"
    flags = "--device cpu --detector dlib --steps 6 --wplus-steps 4 --frame-every 2 --pti 4 --option w_std_samples=50"
    outputs = ["--video", str(video), "--out", str(image), "--latents", str(latents)]
    status = main(["project", str(photo), "--generator", str(generator_path), *flags.split(), *outputs])
    assert status == 0
    frames = list(iio.imiter(video))  # decode every frame
    assert len(frames) == 3 + 2 + 2  # w: steps 2, 4, 6; w+: 2, 4; PTI: 2, 4
    assert frames[0].shape == (256, 512, 3)  # target | render, enlarged 8x from 32²
    assert iio.imread(image).shape == (32, 32, 3)
    stored = load_file(latents)
    assert stored["ws"].shape == (1, tiny.num_ws, 32) and any(key.startswith("delta.") for key in stored)
