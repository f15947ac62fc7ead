"""Training an Encoder4Editing-style encoder for one of our generators (``fluidsrv train encoder``).

The network is :class:`fluidsrv.models.e4e.Encoder4Editing` with a smaller IR-SE backbone (see
:data:`ARCHITECTURES`): a base code ``w0`` plus per-layer deltas, ``ws = w0 + Δ_i + latent_avg``. One step:

1. **real faces** (the train split of the zip shards, mirrored): encode, render with the frozen generator
   (``noise_mode="const"``, as inference renders), and compare with the photo: ``pixel_weight``·L2 +
   ``perceptual_weight``·the perceptual distance (the discriminator features of a GAN checkpoint when one is
   given, else the weight-free Laplacian pyramid; plus LPIPS-VGG when its weights are in the cache);
2. **delta regularisation** (e4e): ``delta_weight``·Σ_i ‖Δ_i‖₂, and progressive deltas: layer ``i``'s delta
   is switched on after ``delta_start_kimg + (i − 1)·delta_every_kimg`` thousand images (before that the
   encoder predicts a single ``w``), so the codes stay near W where edits behave;
3. **generated pairs**: random ``ws`` (mapped z, style-mixed with ``mixing_prob``) and their renders; the
   encoder must give the ``ws`` back: ``latent_weight``·mean squared code error. These pairs have exact
   answers, which real faces lack, and teach the encoder W's layout early on;
4. optionally a **latent discriminator** (e4e's): an MLP that tells mapped w's from encoded codes, trained
   with the logistic loss and lazy R1; the encoder gets ``adversarial_weight``·softplus(−D(codes)).

Checkpoints (every ``snapshot_kimg`` and at the end): ``checkpoint-SSSSSSS.safetensors`` holds the encoder and the
latent discriminator in fp16 with the config, counters and the generator's fingerprint in its metadata (≤ 16 MiB
for every architecture here); ``checkpoint-SSSSSSS-optim.safetensors`` holds Adam's second moments in bf16. The
first moments are not stored: they restart at zero on resume, which only damps the first ~10 steps (β1 = 0.9).
The run also writes ``encoder.safetensors`` (fp16, with ``latent_avg``, loadable by
:func:`fluidsrv.weights.load_e4e`; deltas not yet switched on are zeroed in it, so its plain forward pass is what
training optimised), ``recon-SSSSSSS.png`` (real faces over their reconstructions) and ``log.jsonl``. Training
only ever reads the ``train`` split (ids < 44,000): the held-out faces stay unseen for ``benchmarks/inversion.py``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluidsrv.encoder_arch import ARCHITECTURES as ARCHITECTURES
from fluidsrv.encoder_arch import FINGERPRINT_KEY as FINGERPRINT_KEY
from fluidsrv.encoder_arch import EncoderArchitecture as EncoderArchitecture
from fluidsrv.encoder_arch import encoder_config as encoder_config
from fluidsrv.encoder_arch import generator_fingerprint as generator_fingerprint
from fluidsrv.encoder_arch import resize_for_encoder as resize_for_encoder
from fluidsrv.latents import mix_styles
from fluidsrv.models.e4e import Encoder4Editing
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.perceptual import ImageDistance, inversion_distance
from fluidsrv.training import checkpoints
from fluidsrv.training.checkpoints import CHECKPOINT_BUDGET_BYTES as CHECKPOINT_BUDGET_BYTES
from fluidsrv.training.checkpoints import latest_checkpoint as latest_checkpoint
from fluidsrv.training.checkpoints import optimizer_path as optimizer_path
from fluidsrv.training.configs import pick_config

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fluidsrv-encoder-checkpoint"
OPTIMIZER_FORMAT = "fluidsrv-encoder-optimizer"
ENCODER_EXPORT = "encoder.safetensors"
LOG_FILE = "log.jsonl"
LOGGED_METRICS = ("loss", "pixel", "latent", "sec_per_step")  # on the console
SHIPPED_ENCODER_BUDGET_BYTES = 40 * 10**6  # weights/encoder-128.safetensors in fp16


# ---------------------------------------------------------------------------------------------------------------
# Architectures and configs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Everything that defines an encoder training run except the data, the generator and the run length."""

    name: str  # the name the CLI's --config takes
    architecture: str  # a key of ARCHITECTURES
    batch_size: int = 32  # real faces per step (and as many generated pairs)
    lr: float = 2e-4  # Adam learning rate of the encoder (from scratch: no ArcFace initialisation here)
    betas: tuple[float, float] = (0.9, 0.999)
    pixel_weight: float = 1.0  # pixel L2 on real faces (images in [-1, 1])
    perceptual_weight: float = 0.8  # perceptual distance on real faces (e4e's LPIPS weight)
    latent_weight: float = 1.0  # code L2 on generated pairs
    delta_weight: float = 2e-4  # Σ_i ‖Δ_i‖ (e4e's delta-norm weight)
    adversarial_weight: float = 0.1  # latent-discriminator loss of the encoder; 0 disables the discriminator
    latent_d_lr: float = 2e-5  # Adam learning rate of the latent discriminator (e4e's)
    latent_r1_gamma: float = 10.0  # R1 weight of the latent discriminator
    latent_r1_every: int = 16  # lazy R1 interval
    mixing_prob: float = 0.5  # probability that a generated pair's ws are style-mixed
    delta_start_kimg: float = 40.0  # thousand images before the first per-layer delta is switched on
    delta_every_kimg: float = 10.0  # thousand images between switching on successive deltas
    xflip: bool = True  # add mirrored copies of the training faces
    snapshot_kimg: float = 50.0  # write a checkpoint every this many thousand real images
    log_every: int = 50  # steps between log lines
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown encoder architecture {self.architecture!r}; choose from {sorted(ARCHITECTURES)}")
        if self.batch_size < 1 or self.log_every < 1 or self.latent_r1_every < 1:
            raise ValueError("batch_size, log_every and latent_r1_every must be >= 1")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that :meth:`from_dict` turns back into this config."""
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderTrainConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        unknown = set(data) - {item.name for item in fields(cls)}
        if unknown:
            raise ValueError(f"unknown EncoderTrainConfig keys: {sorted(unknown)}")
        return cls(**data)

    def active_deltas(self, images_seen: int, num_ws: int) -> int:
        """How many per-layer deltas (layers 1..n) are switched on after ``images_seen`` real images."""
        kimg = images_seen / 1000.0
        if kimg < self.delta_start_kimg:
            return 0
        if self.delta_every_kimg <= 0:
            return num_ws - 1
        return min(num_ws - 1, 1 + int((kimg - self.delta_start_kimg) / self.delta_every_kimg))


ENCODER_128 = EncoderTrainConfig("encoder-128", "encoder-128")
"""The shipped encoder: batch 32 + 32, all 11 deltas on after 140 kimg; train for ~2,000 kimg on a GPU."""

CPU_128 = EncoderTrainConfig(
    "cpu-128",
    "cpu-128",
    batch_size=8,
    lr=3e-4,
    delta_start_kimg=10.0,
    delta_every_kimg=2.0,
    snapshot_kimg=5.0,
    log_every=10,
)
"""A fallback for a CPU: half the backbone, batch 8 + 8, deltas switched on sooner."""

TINY = EncoderTrainConfig(
    "tiny",
    "tiny",
    batch_size=4,
    lr=1e-3,
    latent_d_lr=1e-3,
    latent_r1_every=2,
    delta_start_kimg=0.008,
    delta_every_kimg=0.004,
    snapshot_kimg=0.016,
    log_every=1,
)
"""For tests and smoke runs: every loss, R1 and the delta schedule are exercised within a few steps."""

TRAIN_CONFIGS: dict[str, EncoderTrainConfig] = {config.name: config for config in (ENCODER_128, CPU_128, TINY)}


def get_train_config(name: str) -> EncoderTrainConfig:
    """Return the named encoder training config."""
    return pick_config(TRAIN_CONFIGS, name, "encoder training config")


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------


class LatentDiscriminator(nn.Module):
    """e4e's latent-code discriminator: an MLP scoring single w vectors [N, w_dim] -> logits [N, 1]."""

    def __init__(self, w_dim: int, hidden: int = 256, layers: int = 4) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = w_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Score codes [N, w_dim]; real (mapped) w's should get high logits."""
        return self.net(w)  # [N, 1]


@dataclass
class EncoderTrainState:
    """The counters a run resumes from."""

    step: int = 0
    images_seen: int = 0  # real faces seen (generated pairs are as many again)
    train_seconds: float = 0.0

    @property
    def kimg(self) -> float:
        """Thousands of real faces seen."""
        return self.images_seen / 1000.0


class EncoderTrainer:
    """The encoder, the frozen generator, the losses and the optimisers of one run, with checkpoint IO."""

    def __init__(
        self,
        config: EncoderTrainConfig,
        generator: Generator,
        perceptual: ImageDistance,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.perceptual = perceptual.to(self.device)
        self.fingerprint = generator_fingerprint(self.generator)
        torch.manual_seed(config.seed)
        self.encoder_config = encoder_config(ARCHITECTURES[config.architecture], generator.config)
        self.encoder = Encoder4Editing(self.encoder_config).to(self.device)
        self.latent_avg = self.generator.w_avg.detach().clone()  # [w_dim], added to every code
        self.latent_d = LatentDiscriminator(generator.w_dim).to(self.device)
        self.opt_e = torch.optim.Adam(self.encoder.parameters(), lr=config.lr, betas=config.betas)
        self.opt_d = torch.optim.Adam(self.latent_d.parameters(), lr=config.latent_d_lr, betas=config.betas)
        self.state = EncoderTrainState()
        self._rng = torch.Generator().manual_seed(config.seed)

    @property
    def uses_latent_discriminator(self) -> bool:
        """Whether the adversarial latent loss is on."""
        return self.config.adversarial_weight > 0

    def encode(self, images: torch.Tensor, num_deltas: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ws [N, num_ws, w_dim] with latent_avg added, deltas [N, num_ws, w_dim]) for images in [-1, 1]."""
        w0, deltas = self.encoder.encode_parts(resize_for_encoder(images, self.encoder_config.input_size), num_deltas)
        return w0.unsqueeze(1) + deltas + self.latent_avg, deltas  # [N, num_ws, w_dim] each

    def _random_ws(self, batch: int) -> torch.Tensor:
        """Mapped random ws [batch, num_ws, w_dim], style-mixed with probability ``mixing_prob``."""
        generator = self.generator
        z = torch.randn(batch, generator.w_dim, generator=self._rng).to(self.device)  # [B, w_dim]
        ws = generator.mapping(z)  # [B, num_ws, w_dim]
        if float(torch.rand((), generator=self._rng)) < self.config.mixing_prob:
            cutoff = int(torch.randint(1, generator.num_ws, (), generator=self._rng))
            other = generator.mapping(torch.randn(batch, generator.w_dim, generator=self._rng).to(self.device))
            ws = mix_styles(ws, other, cutoff)  # [B, num_ws, w_dim]
        return ws

    def step(self, reals: torch.Tensor, pairs_seed: int | None = None) -> dict[str, float]:
        """One encoder step (and one latent-discriminator step) on a batch of real faces [B, 3, R, R] in [-1, 1].

        ``pairs_seed`` reseeds the draw of the generated pairs and latent-discriminator samples (for reproducible
        steps in tests); by default the run's random stream continues.
        """
        config, generator = self.config, self.generator
        if pairs_seed is not None:
            self._rng.manual_seed(pairs_seed)
        batch = reals.shape[0]
        assert reals.shape[1:] == (3, generator.resolution, generator.resolution), reals.shape
        reals = reals.to(self.device)
        num_deltas = config.active_deltas(self.state.images_seen, generator.num_ws)
        self.encoder.train()

        # 1-2. real faces: reconstruction + delta regularisation (+ adversarial)
        codes, deltas = self.encode(reals, num_deltas)  # [B, num_ws, w_dim] each
        recon = generator.synthesis(codes, noise_mode="const")  # [B, 3, R, R]
        pixel = (recon - reals).square().mean()
        perceptual = self.perceptual(recon, reals).mean()
        delta_norm = deltas[:, 1:].norm(dim=2).sum(dim=1).mean()
        loss = config.pixel_weight * pixel + config.perceptual_weight * perceptual + config.delta_weight * delta_norm
        metrics = {"pixel": pixel.detach(), "perceptual": perceptual.detach(), "delta_norm": delta_norm.detach()}
        if self.uses_latent_discriminator:
            self.latent_d.requires_grad_(False)
            adversarial = F.softplus(-self.latent_d(codes.flatten(0, 1))).mean()
            loss = loss + config.adversarial_weight * adversarial
            metrics["adversarial"] = adversarial.detach()

        # 3. generated pairs: the encoder must return the ws that drew them
        with torch.no_grad():
            true_ws = self._random_ws(batch)  # [B, num_ws, w_dim]
            fakes = generator.synthesis(true_ws, noise_mode="const")  # [B, 3, R, R]
        predicted, _ = self.encode(fakes, num_deltas)  # [B, num_ws, w_dim]
        latent = (predicted - true_ws).square().mean()
        loss = loss + config.latent_weight * latent
        metrics["latent"] = latent.detach()

        self.opt_e.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_e.step()
        metrics["loss"] = loss.detach()

        # 4. latent discriminator: mapped w's are real, encoded codes fake
        if self.uses_latent_discriminator:
            metrics.update(self._latent_d_step(codes.detach().flatten(0, 1)))
        self.state.step += 1
        self.state.images_seen += batch
        result = {name: float(value) for name, value in metrics.items()}
        result["active_deltas"] = float(num_deltas)
        return result

    def _latent_d_step(self, fake_codes: torch.Tensor) -> dict[str, torch.Tensor]:
        config = self.config
        self.latent_d.requires_grad_(True)
        with torch.no_grad():
            z = torch.randn(fake_codes.shape[0], self.generator.w_dim, generator=self._rng).to(self.device)
            real_w = self.generator.mapping(z)[:, 0]  # [N, w_dim]
        loss_d = F.softplus(self.latent_d(fake_codes)).mean() + F.softplus(-self.latent_d(real_w)).mean()
        metrics = {"latent_d": loss_d.detach()}
        if (self.state.step + 1) % config.latent_r1_every == 0:
            real_w = real_w.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.latent_d(real_w).sum(), real_w, create_graph=True)  # [N, w_dim]
            r1 = gradient.square().sum(dim=1).mean()
            loss_d = loss_d + config.latent_r1_gamma / 2 * r1 * config.latent_r1_every
            metrics["latent_r1"] = r1.detach()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        return metrics

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Encode and render images [N, 3, R, R] in eval mode (what inference does)."""
        self.encoder.eval()
        num_deltas = self.config.active_deltas(self.state.images_seen, self.generator.num_ws)
        codes, _ = self.encode(images.to(self.device), num_deltas)
        return self.generator.synthesis(codes, noise_mode="const")  # [N, 3, R, R]

    # ----------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: Path) -> tuple[Path, Path]:
        """Write the weights checkpoint (fp16) and its optimizer file (bf16 second moments); return both paths."""
        tensors = {"latent_avg": self.latent_avg.detach().float().cpu(), **checkpoints.half_state(self._networks())}
        metadata = {
            "train_config": json.dumps(self.config.to_dict()),
            "encoder_config": json.dumps(self.encoder_config.to_dict()),
            "state": json.dumps(asdict(self.state)),
            FINGERPRINT_KEY: self.fingerprint,
        }
        return checkpoints.write_checkpoint(
            path, tensors, metadata, self._optimizers(), (CHECKPOINT_FORMAT, OPTIMIZER_FORMAT)
        )

    def _networks(self) -> list[checkpoints.ModulePart]:
        """The networks a checkpoint holds, with their key prefixes."""
        return [("E", self.encoder), ("LD", self.latent_d)]

    def _optimizers(self) -> list[checkpoints.OptimizerPart]:
        """The optimizers a checkpoint's optimizer file holds, with their networks and key prefixes."""
        return [("E", self.encoder, self.opt_e), ("LD", self.latent_d, self.opt_d)]

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        generator: Generator,
        perceptual: ImageDistance,
        device: torch.device | str = "cpu",
        config: EncoderTrainConfig | None = None,
    ) -> EncoderTrainer:
        """Rebuild a trainer from a checkpoint to resume; ``generator`` must be the one it was trained with."""
        tensors, metadata = checkpoints.read_checkpoint(path, CHECKPOINT_FORMAT)
        stored = EncoderTrainConfig.from_dict(json.loads(metadata["train_config"]))
        config = stored if config is None else config
        if config.architecture != stored.architecture:
            raise ValueError(f"{path} holds a {stored.architecture!r} encoder, not {config.architecture!r}")
        fingerprint = generator_fingerprint(generator)
        if metadata.get(FINGERPRINT_KEY) != fingerprint:
            raise ValueError(
                f"{path} was trained with generator {metadata.get(FINGERPRINT_KEY)}, but the generator given is "
                f"{fingerprint}: resume with the same generator file"
            )
        trainer = cls(config, generator, perceptual, device)
        checkpoints.load_state(trainer._networks(), tensors)
        trainer.latent_avg = tensors["latent_avg"].float().to(trainer.device)
        trainer.state = EncoderTrainState(**json.loads(metadata["state"]))
        trainer._rng.manual_seed(config.seed + trainer.state.step)
        checkpoints.restore_optimizers(path, trainer._optimizers())
        return trainer

    def export(self, path: Path, generator_file: str, extra: dict[str, str] | None = None) -> None:
        """Write the encoder as our fp16 safetensors (with latent_avg and the generator's name and fingerprint)."""
        from fluidsrv.weights import save_encoder

        metadata = {
            FINGERPRINT_KEY: self.fingerprint,
            "training_config": self.config.name,
            "kimg": f"{self.state.kimg:.1f}",
            "step": str(self.state.step),
            **(extra or {}),
        }
        partial = Path(path).with_name(Path(path).name + ".partial")
        save_encoder(
            partial,
            self.inference_encoder(),
            self.latent_avg,
            generator_file=generator_file,
            extra_metadata=metadata,
            half=True,
        )
        os.replace(partial, path)

    def inference_encoder(self) -> Encoder4Editing:
        """A copy of the encoder in eval mode whose not-yet-active deltas are exactly 0 (their style blocks' last
        layer zeroed), so a plain forward pass (what the e4e plugin runs) equals what training optimised."""
        encoder = copy.deepcopy(self.encoder).eval()
        active = self.config.active_deltas(self.state.images_seen, self.generator.num_ws)
        with torch.no_grad():
            for layer in range(active + 1, self.encoder_config.num_ws):
                linear = encoder.styles[layer].linear
                assert isinstance(linear, nn.Module)
                for tensor in linear.parameters():
                    tensor.zero_()
        return encoder


def stored_train_config(path: Path) -> EncoderTrainConfig:
    """Return the training config stored in an encoder checkpoint."""
    metadata = checkpoints.read_checkpoint_metadata(path, CHECKPOINT_FORMAT)
    return EncoderTrainConfig.from_dict(json.loads(metadata["train_config"]))


# ---------------------------------------------------------------------------------------------------------------
# Loading the generator (and the perceptual distance) a run trains against
# ---------------------------------------------------------------------------------------------------------------


def is_gan_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a fluidsrv GAN training checkpoint (it holds G_ema and D)."""
    from fluidsrv.training.gan import CHECKPOINT_FORMAT as GAN_FORMAT

    try:
        return checkpoints.read_metadata(path).get("format") == GAN_FORMAT
    except Exception:  # not a safetensors file
        return False


def load_training_generator(path: Path, device: torch.device | str = "cpu") -> Generator:
    """Load the generator to train against: our generator safetensors, a rosinality .pt, or a GAN checkpoint."""
    if is_gan_checkpoint(path):
        from fluidsrv.training.gan import load_checkpoint_generator

        return load_checkpoint_generator(path, device)
    from fluidsrv.weights import load_generator

    generator, _ = load_generator(path, device)
    return generator.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# The run driver
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderRun:
    """What a training run is given besides its config."""

    data_dir: Path  # folder with faces128-*.zip shards
    generator_path: Path  # the generator to train against (see load_training_generator)
    run_dir: Path  # where checkpoints, samples, the log and encoder.safetensors go
    kimg: float  # train until this many thousand real faces in total
    resume: Path | None = None  # a checkpoint file or a run folder
    discriminator: Path | None = None  # a GAN checkpoint / rosinality .pt whose D gives the perceptual features
    cache_dir: Path | None = None  # where LPIPS-VGG's files may be (used when present)
    minutes: float | None = None  # stop (with a snapshot) after this long
    device: str = "auto"
    num_workers: int = 0
    keep: int = 2  # checkpoints to keep
    limit: int | None = None  # train on only the first N faces (smoke tests)
    generator_file: str | None = None  # the generator's file name recorded in encoder.safetensors


def _snapshot(trainer: EncoderTrainer, run: EncoderRun, preview: torch.Tensor) -> Path:
    from fluidsrv.training.gan import save_image_grid

    step = trainer.state.step
    checkpoint, _ = trainer.save_checkpoint(checkpoints.checkpoint_path(run.run_dir, step))
    trainer.export(run.run_dir / ENCODER_EXPORT, run.generator_file or run.generator_path.name)
    grid = torch.cat([preview, trainer.reconstruct(preview).cpu()], dim=0)  # [2P, 3, R, R]: reals over recons
    save_image_grid(grid, run.run_dir / f"recon-{step:07d}.png", columns=preview.shape[0])
    checkpoints.prune_checkpoints(run.run_dir, run.keep)
    return checkpoint


def train_encoder(config: EncoderTrainConfig, run: EncoderRun) -> EncoderTrainState:
    """Train (or resume) an encoder until ``run.kimg`` thousand real faces (or ``run.minutes``); snapshot on the way.

    Returns the final counters. A final snapshot (checkpoint + encoder.safetensors) is always written, also when
    the run is interrupted with Ctrl-C.
    """
    from fluidsrv.training.data import BatchStream, FaceShardDataset
    from fluidsrv.training.gan import MetricLog, RunLength, run_steps, training_device, write_run_config

    device = training_device(run.device)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    generator = load_training_generator(run.generator_path, device)
    discriminator = run.discriminator
    if discriminator is None and is_gan_checkpoint(run.generator_path):
        discriminator = run.generator_path  # its D is the best perceptual feature net we have
    perceptual = inversion_distance(run.cache_dir, discriminator, device=device)
    log.info("perceptual distance: %s", perceptual.name)
    if run.resume is not None:
        resume = checkpoints.resume_checkpoint(run.resume)
        trainer = EncoderTrainer.from_checkpoint(resume, generator, perceptual, device, config)
        log.info("resumed %s at step %d (%.2f kimg)", resume, trainer.state.step, trainer.state.kimg)
    else:
        trainer = EncoderTrainer(config, generator, perceptual, device)
    config = trainer.config
    write_run_config(run.run_dir, config.to_dict())

    dataset = FaceShardDataset(run.data_dir, "train", generator.resolution, xflip=config.xflip, limit=run.limit)
    stream = iter(
        BatchStream(
            dataset,
            config.batch_size,
            device,
            seed=config.seed + trainer.state.step,
            preload=device.type == "cuda",
            num_workers=run.num_workers,
        )
    )
    preview = next(stream)[:8].cpu()  # [P, 3, R, R]
    log.info("training encoder %s on %d faces on %s", config.name, dataset.num_faces, device)
    run_steps(
        trainer.state,
        stream,
        trainer.step,
        lambda: _snapshot(trainer, run, preview),
        MetricLog(run.run_dir / LOG_FILE, LOGGED_METRICS, logger=log),
        RunLength(run.kimg, config.snapshot_kimg, config.log_every, run.minutes),
    )
    return trainer.state
