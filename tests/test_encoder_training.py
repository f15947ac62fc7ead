"""Encoder training: size budgets of the configs, the delta schedule, the loss falling on a fixed batch of real
faces, a tiny run on a real shard with checkpoints, export, resume, and the ``train encoder`` CLI target."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from fluidsrv.models.e4e import Encoder4Editing
from fluidsrv.models.stylegan2 import Generator, GeneratorConfig
from fluidsrv.perceptual import LaplacianPyramidDistance
from fluidsrv.training.configs import CPU_128, EMBEDDED_128
from fluidsrv.training.data import FaceShardDataset, to_model_range
from fluidsrv.training.encoder import (
    ARCHITECTURES,
    CHECKPOINT_BUDGET_BYTES,
    ENCODER_EXPORT,
    SHIPPED_ENCODER_BUDGET_BYTES,
    TINY,
    TRAIN_CONFIGS,
    EncoderRun,
    EncoderTrainer,
    LatentDiscriminator,
    encoder_config,
    latest_checkpoint,
    optimizer_path,
    train_encoder,
)
from fluidsrv.weights import load_e4e, save_generator
from tests.model_support import TINY_GENERATOR

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator_file(tiny: Generator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny generator (TINY_GENERATOR, w_avg from 500 samples) as a safetensors file."""
    path = tmp_path_factory.mktemp("generator") / "generator-32.safetensors"
    save_generator(path, tiny, tiny.w_avg)
    return path


def _load(path: Path) -> Generator:
    from fluidsrv.training.encoder import load_training_generator

    return load_training_generator(path)


@pytest.mark.parametrize(
    ("name", "generator"), [("encoder-128", EMBEDDED_128.generator), ("cpu-128", CPU_128.generator)]
)
def test_architectures_fit_the_file_budgets(name: str, generator: GeneratorConfig) -> None:
    config = encoder_config(ARCHITECTURES[name], generator)
    assert (config.num_ws, config.w_dim, config.input_size) == (12, 256, 128)
    with torch.device("meta"):
        encoder_floats = sum(p.numel() for p in Encoder4Editing(config).state_dict().values())
        latent_d = sum(p.numel() for p in LatentDiscriminator(generator.w_dim).parameters())
    checkpoint = 2 * (encoder_floats + latent_d)  # fp16
    assert checkpoint < CHECKPOINT_BUDGET_BYTES - 2**20  # headroom for the header
    assert 2 * (encoder_floats + latent_d) < CHECKPOINT_BUDGET_BYTES  # bf16 second moments
    assert 2 * encoder_floats < SHIPPED_ENCODER_BUDGET_BYTES


def test_deltas_switch_on_progressively() -> None:
    config = TRAIN_CONFIGS["encoder-128"]
    assert config.active_deltas(0, 12) == 0
    assert config.active_deltas(int(config.delta_start_kimg * 1000), 12) == 1
    assert config.active_deltas(int((config.delta_start_kimg + 3 * config.delta_every_kimg) * 1000), 12) == 4
    assert config.active_deltas(10**9, 12) == 11


def test_the_loss_falls_on_a_fixed_batch_of_real_faces(shard_dir: Path, generator_file: Path) -> None:
    dataset = FaceShardDataset(shard_dir, "train", resolution=32, limit=4)
    reals = to_model_range(torch.stack([dataset[i] for i in range(4)]))  # [4, 3, 32, 32]
    trainer = EncoderTrainer(TINY, _load(generator_file), LaplacianPyramidDistance())
    losses = [trainer.step(reals, pairs_seed=1) for _ in range(8)]
    assert all(math.isfinite(value) for record in losses for value in record.values())
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"], [round(record["loss"], 3) for record in losses]
    assert losses[-1]["latent"] < losses[0]["latent"]
    assert {"pixel", "perceptual", "latent", "delta_norm", "adversarial", "latent_d", "latent_r1"} <= set(
        losses[1]
    ) | set(losses[0])
    assert trainer.state.step == 8 and trainer.state.images_seen == 32
    assert not any(parameter.requires_grad for parameter in trainer.generator.parameters())


def test_tiny_run_on_a_real_shard_checkpoints_exports_and_resumes(
    shard_dir: Path, generator_file: Path, tmp_path: Path
) -> None:
    run = EncoderRun(shard_dir, generator_file, tmp_path / "run", kimg=0.024, limit=32, device="cpu")
    state = train_encoder(TINY, run)
    assert (state.step, state.images_seen) == (6, 24)
    records = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(math.isfinite(r["loss"]) and r["sec_per_step"] > 0 for r in records)
    checkpoint = latest_checkpoint(run.run_dir)
    assert checkpoint is not None and checkpoint.name == "checkpoint-0000006.safetensors"
    assert len(list(run.run_dir.glob("checkpoint-*[0-9].safetensors"))) <= run.keep
    assert checkpoint.stat().st_size < CHECKPOINT_BUDGET_BYTES and optimizer_path(checkpoint).is_file()
    assert (run.run_dir / "recon-0000006.png").is_file()

    # the export loads with its generator through the standard loader, fp16 codes match the trainer's
    encoder, generator, latent_avg = load_e4e(run.run_dir / ENCODER_EXPORT, generator_path=generator_file)
    assert latent_avg.shape == (generator.num_ws, generator.w_dim)
    trainer = EncoderTrainer.from_checkpoint(checkpoint, _load(generator_file), LaplacianPyramidDistance())
    assert (trainer.state.step, trainer.state.images_seen) == (6, 24)
    exported = encoder.state_dict()
    for key, value in trainer.inference_encoder().state_dict().items():
        torch.testing.assert_close(value, exported[key], atol=0, rtol=0)
    trainer.encoder.eval()
    faces = torch.rand(2, 3, 32, 32) * 2 - 1
    assert 0 < TINY.active_deltas(24, 8) < 7  # the export happened before every delta was switched on
    with torch.no_grad():  # the plain forward of the export equals the trainer's (latent_avg is stored in fp16)
        expected = trainer.encode(faces, TINY.active_deltas(24, 8))[0]
        torch.testing.assert_close(encoder(faces) + latent_avg, expected, atol=2e-3, rtol=0)
    assert trainer.opt_e.state  # second moments came back

    resumed = train_encoder(
        TINY, EncoderRun(shard_dir, generator_file, run.run_dir, kimg=0.032, resume=run.run_dir, limit=32, device="cpu")
    )
    assert (resumed.step, resumed.images_seen) == (8, 32)

    torch.manual_seed(9)
    stranger = Generator(TINY_GENERATOR)
    with pytest.raises(ValueError, match="same generator"):
        EncoderTrainer.from_checkpoint(checkpoint, stranger, LaplacianPyramidDistance())


def test_train_encoder_cli_target(shard_dir: Path, generator_file: Path, tmp_path: Path) -> None:
    from fluidsrv.cli.train_encoder import register_target

    parser = argparse.ArgumentParser()
    register_target(parser.add_subparsers(dest="target"))
    export = tmp_path / "encoder-32.safetensors"
    paths = ["--data", str(shard_dir), "--generator", str(generator_file), "--out", str(tmp_path / "run")]
    paths += ["--export", str(export), "--cache-dir", str(tmp_path)]
    flags = ["--kimg", "0.008", "--config", "tiny", "--limit", "16", "--device", "cpu"]
    args = parser.parse_args(["encoder", *paths, *flags])
    assert args.handler(args) == 0
    encoder, generator, _ = load_e4e(export, generator_path=generator_file)
    assert encoder.config.num_ws == generator.num_ws == 8
