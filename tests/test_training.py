"""The StyleGAN2 training stack: the face-shard data, DiffAugment, the configs, the loop, checkpoints and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fluidsrv.cli import main
from fluidsrv.models.stylegan2 import Discriminator, Generator
from fluidsrv.training.augment import augment_cutout, augment_translation, diff_augment, parse_policy
from fluidsrv.training.configs import (
    CHECKPOINT_BUDGET_BYTES,
    CONFIGS,
    SHIPPED_GENERATOR_BUDGET_BYTES,
    TINY_32,
    TrainConfig,
    get_config,
)
from fluidsrv.training.data import HELDOUT_FIRST_ID, BatchStream, FaceShardDataset, in_split, read_meta
from fluidsrv.training.gan import GanTrainer, latest_checkpoint, load_checkpoint_generator, optimizer_path
from fluidsrv.weights import load_generator
from tests.model_support import FACE_SHARD

pytestmark = pytest.mark.usefixtures("one_thread")


def _shard_ids(shard_dir: Path) -> list[int]:
    with zipfile.ZipFile(shard_dir / FACE_SHARD) as archive:
        return sorted(int(name.split(".")[0]) for name in archive.namelist())


# ------------------------------------------------------------------------------------------------ data


def test_split_boundary() -> None:
    assert in_split(HELDOUT_FIRST_ID - 1, "train") and not in_split(HELDOUT_FIRST_ID - 1, "heldout")
    assert in_split(HELDOUT_FIRST_ID, "heldout") and not in_split(HELDOUT_FIRST_ID, "train")
    assert in_split(0, "all") and in_split(10**6, "all")


def test_dataset_reads_real_faces_and_excludes_heldout(shard_dir: Path) -> None:
    ids = _shard_ids(shard_dir)
    train = FaceShardDataset(shard_dir, "train")
    heldout = FaceShardDataset(shard_dir, "heldout")
    train_ids = [entry.face_id for entry in train.entries]
    heldout_ids = [entry.face_id for entry in heldout.entries]
    assert max(train_ids) < HELDOUT_FIRST_ID <= min(heldout_ids)
    assert sorted(train_ids + heldout_ids) == ids  # every face lands in exactly one split
    assert len(heldout_ids) == sum(face_id >= HELDOUT_FIRST_ID for face_id in ids) > 0

    for index in (0, 1, len(train) - 1):
        image = train[index]
        assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
        assert int(image.max()) - int(image.min()) > 100  # a real photo, not a blank
    assert not torch.equal(train[0], train[1])


def test_dataset_mirrors_and_resizes(shard_dir: Path) -> None:
    plain = FaceShardDataset(shard_dir, "train", limit=5)
    mirrored = FaceShardDataset(shard_dir, "train", xflip=True, limit=5)
    assert len(plain) == 5 and len(mirrored) == 10
    for index in range(5):
        assert torch.equal(mirrored[index], plain[index])
        assert torch.equal(mirrored[index + 5], plain[index].flip(2))
        assert mirrored.face_id(index + 5) == plain.face_id(index)
    small = FaceShardDataset(shard_dir, "train", resolution=32, limit=2)[0]
    assert small.shape == (3, 32, 32) and small.dtype == torch.uint8
    # the 32² face is the 128² face downsampled: their mean colours agree
    assert torch.allclose(small.float().mean(dim=(1, 2)), plain[0].float().mean(dim=(1, 2)), atol=3.0)


def test_meta_rows_describe_the_shard_members(shared_dir: Path, shard_dir: Path) -> None:
    rows = read_meta(shared_dir / "data")
    entry = FaceShardDataset(shard_dir, "heldout", limit=1).entries[0]
    row = rows[entry.face_id]
    assert row["id"] == entry.face_id and row["file"] == entry.member and row["shard"] == 4
    assert row["source"] in {"UTKFace", "lfw-deepfunneled", "celebA"}


@pytest.mark.parametrize("preload", [False, True])
def test_batch_stream_yields_model_range_batches(shard_dir: Path, preload: bool) -> None:
    dataset = FaceShardDataset(shard_dir, "train", resolution=32, xflip=True, limit=12)
    stream = BatchStream(dataset, batch_size=8, seed=3, preload=preload)
    first, second = next(stream), next(stream)
    for batch in (first, second):
        assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32
        assert batch.min() >= -1.0 and batch.max() <= 1.0 and batch.std() > 0.1
    assert not torch.equal(first, second)
    # every image drawn is one of the dataset's items (a face or its mirror)
    items = torch.stack([dataset[index] for index in range(len(dataset))]).float() / 127.5 - 1.0  # [24, 3, 32, 32]
    distances = (first[:, None] - items[None]).abs().amax(dim=(2, 3, 4))  # [8, 24]
    assert bool((distances.min(dim=1).values < 1e-5).all())


# ------------------------------------------------------------------------------------------- augment


def test_diff_augment_preserves_shape_and_is_differentiable() -> None:
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    y = diff_augment(x, "color,translation,cutout", generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    (gradient,) = torch.autograd.grad(y.square().sum(), x)
    assert gradient.shape == x.shape and gradient.abs().sum() > 0
    assert torch.equal(diff_augment(x, "none"), x)
    with pytest.raises(ValueError, match="unknown"):
        parse_policy("color,rotate")


def test_diff_augment_gradients_are_exact() -> None:
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)

    def augmented(images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images, "color,translation,cutout", generator=torch.Generator().manual_seed(1))

    assert torch.autograd.gradcheck(augmented, (x,))


def test_translation_moves_pixels_and_cutout_zeroes_a_square() -> None:
    x = torch.arange(1, 2 * 1 * 16 * 16 + 1, dtype=torch.float32).reshape(2, 1, 16, 16)
    shifted = augment_translation(x, torch.Generator().manual_seed(5))
    for original, moved in zip(x, shifted):
        kept = moved[moved != 0]
        assert set(kept.tolist()) <= set(original.flatten().tolist())  # values move, none are invented
        dy, dx = [(moved == original[0, 5, 5]).nonzero()[0][axis].item() - 5 for axis in (1, 2)]
        assert abs(dy) <= 2 and abs(dx) <= 2 and torch.equal(moved[0, 5 + dy, 5 + dx], original[0, 5, 5])
    cut = augment_cutout(torch.ones(16, 1, 16, 16), torch.Generator().manual_seed(2))
    zeroed = (cut == 0).flatten(1).sum(dim=1)  # [16]
    assert bool((zeroed > 0).all()) and bool((zeroed <= 64).all())  # an 8×8 square, possibly clipped


# -------------------------------------------------------------------------------------------- configs


def _parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_fit_the_checkpoint_budget_and_round_trip(name: str) -> None:
    config = get_config(name)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with torch.device("meta"):
        g_params = _parameters(Generator(config.generator))
        d_params = _parameters(Discriminator(config.discriminator))
    assert (2 * g_params + d_params) * 2 < CHECKPOINT_BUDGET_BYTES - 100_000  # G, G_ema, D in fp16 + header
    assert (g_params + d_params) * 2 < CHECKPOINT_BUDGET_BYTES - 100_000  # bf16 second moments
    assert g_params * 2 <= SHIPPED_GENERATOR_BUDGET_BYTES and g_params <= 15_000_000


def test_embedded_config_is_the_128_model() -> None:
    config = get_config("embedded-128")
    assert config.resolution == 128 and config.generator.num_ws == 12
    assert config.augment and config.xflip and config.pl_weight == 0.0 and config.mixing_prob > 0


# ------------------------------------------------------------------------------------------- training


def _snapshot_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_tiny_training_checkpoints_and_resumes(shard_dir: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(TINY_32, r1_every=2, pl_weight=1.0, pl_every=3)  # exercise every branch
    dataset = FaceShardDataset(shard_dir, "train", resolution=32, xflip=True, limit=64)
    stream = BatchStream(dataset, config.batch_size, seed=0)
    trainer = GanTrainer(config)
    before_g, before_d = _snapshot_params(trainer.G), _snapshot_params(trainer.D)
    seen: set[str] = set()
    for _ in range(6):
        metrics = trainer.train_step(next(stream))
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        seen |= set(metrics)
    assert {"loss_d", "loss_g", "r1", "pl"} <= seen
    assert trainer.state.step == 6 and trainer.state.images_seen == 6 * config.batch_size
    changed = [name for name, value in trainer.G.state_dict().items() if not torch.equal(value, before_g[name])]
    assert any(name.startswith("style.") for name in changed) and any(name.startswith("convs.") for name in changed)
    assert any(not torch.equal(value, before_d[name]) for name, value in trainer.D.state_dict().items())
    ema_gap = sum((a - b).abs().sum() for a, b in zip(trainer.G_ema.parameters(), trainer.G.parameters())).detach()
    assert float(ema_gap) > 0  # G_ema trails G

    checkpoint, optim = trainer.save_checkpoint(tmp_path / "checkpoint-0000006.safetensors")
    assert checkpoint.stat().st_size <= CHECKPOINT_BUDGET_BYTES and optim == optimizer_path(checkpoint)
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert handle.get_tensor("G.conv1.conv.weight").dtype == torch.float16

    resumed = GanTrainer.from_checkpoint(checkpoint)
    assert resumed.state == trainer.state
    for name, value in trainer.G_ema.state_dict().items():
        torch.testing.assert_close(resumed.G_ema.state_dict()[name], value, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(resumed.G_ema.w_avg, trainer.G_ema.w_avg)
    for original, restored in ((trainer.opt_d, resumed.opt_d), (trainer.opt_g, resumed.opt_g)):
        original_state, restored_state = original.state_dict()["state"], restored.state_dict()["state"]
        assert len(restored_state) == len(original_state) > 0
        for index, moments in original_state.items():
            assert float(restored_state[index]["step"]) == float(moments["step"])
            torch.testing.assert_close(
                restored_state[index]["exp_avg_sq"], moments["exp_avg_sq"], rtol=1e-2, atol=1e-12
            )
    assert resumed.train_step(next(stream))["loss_d"] > 0
    assert resumed.state.step == 7

    generator = load_checkpoint_generator(checkpoint)
    torch.testing.assert_close(generator.w_avg, trainer.G_ema.w_avg)
    assert generator(torch.randn(2, generator.w_dim), truncation_psi=0.7).shape == (2, 3, 32, 32)


def test_cli_trains_resumes_and_exports(shard_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["train", "generator", "--data", str(shard_dir), "--out", str(run), "--device", "cpu"]
    assert main([*common, "--kimg", "0.024", "--config", "tiny-32", "--limit", "64", "--snapshot-kimg", "0.016"]) == 0
    first = latest_checkpoint(run)
    assert first is not None and first.name == "checkpoint-0000006.safetensors"
    assert optimizer_path(first).exists() and (run / "samples-0000006.png").exists() and (run / "reals.png").exists()
    assert (run / "samples-0000004.png").exists()  # the periodic snapshot at 16 images

    assert main([*common, "--kimg", "0.032", "--resume", str(run), "--limit", "64", "--keep", "1"]) == 0
    last = latest_checkpoint(run)
    assert last is not None and last.name == "checkpoint-0000008.safetensors"
    assert {path.name for path in run.glob("checkpoint-*")} == {last.name, optimizer_path(last).name}
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, 9))  # one line a step, continuing
    assert all(math.isfinite(record["loss_d"]) and record["images_per_sec"] > 0 for record in records)

    generator, w_avg = load_generator(run / "generator.safetensors")
    assert generator.resolution == 32 and w_avg.shape == (TINY_32.generator.w_dim,)
    image = generator(torch.randn(1, generator.w_dim)).detach()
    assert image.shape == (1, 3, 32, 32) and bool(torch.isfinite(image).all())
    assert np.asarray(image).std() > 0


def test_mixed_precision_step_runs_with_finite_losses() -> None:
    # the bf16 autocast path a GPU run takes, exercised on the CPU (R1 and path length included)
    trainer = GanTrainer(dataclasses.replace(TINY_32, r1_every=1, pl_weight=1.0, pl_every=1))
    trainer.mixed_precision = True
    metrics = trainer.train_step(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert {"loss_d", "loss_g", "r1", "pl"} <= set(metrics)
    assert all(math.isfinite(value) for value in metrics.values()), metrics
