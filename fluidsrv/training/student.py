"""Training the preview student for one generator (``fluidsrv train student``).

One step trains the autoencoder and the modulator together:

1. **generated pairs**: random ``ws`` (mapped z at a truncation ψ ∈ [0.5, 1]) and an edit Δw made of 1–3 of the
   generator's sliders (the direction sources' Δws at full strength, at uniform random strengths); the frozen
   generator renders ``x0 = G(ws)`` and ``x1 = G(ws + Δw)``;
2. **reconstruction**: the autoencoder reproduces ``x0`` and a batch of real faces (the train split of
   ``../shared/data``, mirrored; only for students of at most 128², the shards' side): L1 + the perceptual
   distance (LPIPS-VGG when its weights are cached, else the weight-free Laplacian pyramid distance);
3. **edit**: ``decode(modulate(encode(x0), Δw, w))`` must draw ``x1`` (L1 + perceptual), its change from the
   reconstruction must be ``x1 − x0`` (L1), and the modulated code must be ``encode(x1)`` (mean squared error,
   against a detached target);
4. **adversarial**: a small StyleGAN2 discriminator tells real and generated faces from the student's images
   (non-saturating logistic loss, lazy R1); the student gets ``adversarial_weight`` of its loss.

Every ``snapshot_steps`` and at the end the run writes ``student.safetensors`` (fp16, loadable by
:func:`fluidsrv.student.load_student`), ``samples-SSSSSSS.png`` (targets over the student's edits) and a line of
``log.jsonl``. Resume with ``--resume RUN`` (the student and discriminator restart from ``state.pt``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fluidsrv.distill import sample_edits
from fluidsrv.models.stylegan2 import Discriminator, DiscriminatorConfig, Generator
from fluidsrv.perceptual import ImageDistance, LaplacianPyramidDistance, load_lpips
from fluidsrv.student import Student, save_student, student_config_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentTrainConfig:
    """Hyper-parameters of a student run."""

    batch: int = 6  # generated pairs per step
    real_batch: int = 2  # real faces per step
    lr: float = 5e-4
    d_lr: float = 2e-4
    perceptual_weight: float = 1.0
    change_weight: float = 2.0
    code_weight: float = 0.1
    adversarial_weight: float = 0.02
    adversarial_batch: int = 4  # student images (and real faces) the discriminator sees per step
    r1_gamma: float = 1.0
    r1_every: int = 16
    max_sliders: int = 3
    snapshot_steps: int = 200
    seed: int = 0


def slider_bank(generator: Generator, settings_generator: str) -> torch.Tensor:
    """Every slider of the default direction sources for ``generator`` as Δws at full strength [K, L, D]."""
    from fluidsrv import latents
    from fluidsrv.runtime import Runtime
    from fluidsrv.settings import Settings

    runtime = Runtime.build(Settings.from_env(generator=settings_generator, device="cpu", previewer="generator"))
    directions = list(runtime.directions.values())
    log.info("training on %d sliders: %s", len(directions), ", ".join(d.name for d in directions[:12]))
    return latents.slider_extremes(directions, generator.num_ws, generator.w_dim, spread=runtime.spread)


class StudentTrainer:
    """The student, its discriminator, their optimisers and one training step."""

    def __init__(self, generator: Generator, edits: torch.Tensor, config: StudentTrainConfig,
                 distance: ImageDistance, device: torch.device) -> None:
        self.generator = generator.to(device).eval().requires_grad_(False)
        self.edits = edits.to(device)
        self.config = config
        self.device = device
        self.distance = distance.to(device)
        torch.manual_seed(config.seed)
        self.student = Student(student_config_for(generator)).to(device)
        self.student.w_avg.copy_(generator.w_avg.detach())
        if len(edits) == 0:
            raise ValueError("no sliders for this generator: the student learns the sliders' edits")
        typical = float(edits.reshape(len(edits), -1).norm(dim=1).mean().clamp(min=1e-6))  # a slider's |Δws|
        self.student.modulator.delta_scale.fill_(edits[0].numel() ** 0.5 / typical)  # elements of order 1
        side = max(8, self.student.side // 2)
        widths = {s: min(128, max(16, 1024 // s)) for s in (2**i for i in range(2, side.bit_length()))}
        config_d = DiscriminatorConfig(resolution=side, channels=widths, stddev_group=2)
        self.discriminator = Discriminator(config_d).to(device)
        # the condition head's adapter is tuned per session (distill), never here
        trainable = [p for n, p in self.student.named_parameters() if not n.startswith("modulator.head_")]
        self.optimizer = torch.optim.Adam(trainable, lr=config.lr, betas=(0.9, 0.99))
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=config.d_lr, betas=(0.0, 0.99))
        self.rng = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0

    def generated_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ws, Δw, G(ws), G(ws + Δw)) for one batch, images at the student's side."""
        config, generator = self.config, self.generator
        z = torch.randn(config.batch, generator.w_dim, generator=self.rng).to(self.device)
        psi = (0.5 + 0.5 * torch.rand(config.batch, 1, 1, generator=self.rng)).to(self.device)
        with torch.no_grad():
            mapped = generator.mapping(z)  # [B, L, D]
            ws = generator.w_avg + psi * (mapped - generator.w_avg)
            delta = sample_edits(self.edits, config.batch, config.max_sliders, self.rng)
            x0 = self.student.to_student_side(generator.synthesis(ws, noise_mode="const"))
            x1 = self.student.to_student_side(generator.synthesis(ws + delta, noise_mode="const"))
        return ws, delta, x0, x1

    def _for_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the discriminator's side (half the student's: the adversarial term is a small share)."""
        side = self.discriminator.config.resolution
        return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)

    def _image_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(images, targets) + self.config.perceptual_weight * self.distance(images, targets).mean()

    def train_step(self, real: torch.Tensor) -> dict[str, float]:
        """One step of the student and one of the discriminator on a real batch [R, 3, S, S]; returns the losses."""
        config, student = self.config, self.student
        ws, delta, x0, x1 = self.generated_pairs()
        real = student.to_student_side(real.to(self.device))
        student.train()
        codes = student.autoencoder.encode(torch.cat([x0, real]))
        reconstructed = student.autoencoder.decode(codes)
        code0 = codes[: config.batch]
        moved = student.modulator(code0, delta, student.face_w(ws))
        edited = student.autoencoder.decode(moved)
        with torch.no_grad():
            target_code = student.autoencoder.encode(x1)
        reconstruction = self._image_loss(reconstructed, torch.cat([x0, real]))
        edit = self._image_loss(edited, x1)
        change = F.l1_loss(edited - reconstructed[: config.batch].detach(), x1 - x0)
        code = F.mse_loss(moved, target_code)
        fakes = self._for_discriminator(torch.cat([reconstructed[-config.adversarial_batch:],
                                                   edited[: config.adversarial_batch]]))
        adversarial = F.softplus(-self.discriminator(fakes)).mean()
        loss = (reconstruction + edit + config.change_weight * change + config.code_weight * code
                + config.adversarial_weight * adversarial)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        reals = self._for_discriminator(torch.cat([x0[: config.adversarial_batch], real]))
        d_loss = (F.softplus(self.discriminator(fakes.detach())).mean()
                  + F.softplus(-self.discriminator(reals)).mean())
        if self.step % config.r1_every == 0:
            reals = reals.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.discriminator(reals).sum(), reals, create_graph=True)
            d_loss = d_loss + config.r1_gamma / 2 * gradient.square().sum(dim=(1, 2, 3)).mean() * config.r1_every
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_optimizer.step()
        self.step += 1
        named = {"reconstruction": reconstruction, "edit": edit, "change": change, "code": code,
                 "adversarial": adversarial, "d": d_loss}
        return {name: float(value.detach()) for name, value in named.items()}

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs."""
        return {"student": self.student.state_dict(), "discriminator": self.discriminator.state_dict(),
                "optimizer": self.optimizer.state_dict(), "d_optimizer": self.d_optimizer.state_dict(),
                "step": self.step}

    def load(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` output."""
        self.student.load_state_dict(state["student"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.step = int(state["step"])


def write_samples(trainer: StudentTrainer, path: Path) -> None:
    """A PNG of four generated edits: the generator's (top) over the student's un-anchored ones (bottom)."""
    from PIL import Image

    ws, delta, _, x1 = trainer.generated_pairs()
    student = trainer.student.eval()
    with torch.no_grad():
        x0 = student.to_student_side(trainer.generator.synthesis(ws, noise_mode="const"))
        edited = student.edit(student.autoencoder.encode(x0), delta, student.face_w(ws))
    count = min(4, len(x1))
    grid = torch.cat([torch.cat(list(x1[:count]), dim=2), torch.cat(list(edited[:count]), dim=2)], dim=1)
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(pixels).save(path)


def train_student(generator_path: Path, data_dir: Path | None, out: Path, minutes: float, *,
                  config: StudentTrainConfig | None = None, resume: bool = False, limit: int | None = None,
                  cache_dir: Path | None = None) -> Path:
    """Train (or resume) a student for the generator file ``generator_path`` for ``minutes``; return its file."""
    from fluidsrv.training.data import BatchStream, FaceShardDataset
    from fluidsrv.training.encoder import load_training_generator

    config = config or StudentTrainConfig()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = load_training_generator(generator_path, device)
    edits = slider_bank(generator, str(generator_path))
    lpips = load_lpips(cache_dir, device) if cache_dir is not None else None
    distance: ImageDistance = LaplacianPyramidDistance() if lpips is None else lpips
    trainer = StudentTrainer(generator, edits, config, distance, device)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    if resume and state_path.is_file():
        trainer.load(torch.load(state_path, map_location=device, weights_only=True))
    real_stream = None
    side = trainer.student.config.autoencoder.resolution
    if data_dir is not None and config.real_batch > 0 and side > 128:
        log.info("the shards hold 128² faces: a %d² student trains on the generator's renders only", side)
    elif data_dir is not None and config.real_batch > 0:
        dataset = FaceShardDataset(data_dir, "train", resolution=side, xflip=True, limit=limit)
        real_stream = BatchStream(dataset, config.real_batch, device, seed=config.seed)
    started = time.monotonic()
    student_file = out / "student.safetensors"
    with (out / "log.jsonl").open("a") as log_file:
        while True:
            real = next(real_stream) if real_stream is not None else torch.zeros(0, 3, 8, 8, device=device)
            losses = trainer.train_step(real)
            elapsed = time.monotonic() - started
            done = elapsed >= minutes * 60
            if trainer.step % config.snapshot_steps == 0 or done:
                log_file.write(json.dumps({"step": trainer.step, "seconds": round(elapsed, 1), **losses}) + "\n")
                log_file.flush()
                save_student(trainer.student, student_file, generator,
                             {"train_steps": str(trainer.step), "train_images": str(trainer.step * config.batch)})
                torch.save(trainer.state(), state_path)
                write_samples(trainer, out / f"samples-{trainer.step:07d}.png")
                log.info("step %d (%.0f s): %s", trainer.step, elapsed, losses)
            if done:
                return student_file


def register_target(targets: Any) -> None:
    """Add ``train student`` to the ``train`` subcommand's targets."""
    parser: argparse.ArgumentParser = targets.add_parser(
        "student", help="train the preview student (autoencoder + AdaLIN modulator) for a generator",
        description="Train the preview student for GENERATOR on its own renders and slider edits (and real faces "
        "from --data). OUT receives student.safetensors, samples-*.png, log.jsonl and state.pt (for --resume).")
    parser.add_argument("--generator", type=Path, default=Path("weights/generator-128.safetensors"),
                        help="the generator file (ours or a rosinality .pt)")
    parser.add_argument("--data", type=Path, help="folder with faces128-*.zip shards (real faces; optional)")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time (default 60)")
    parser.add_argument("--batch", type=int, default=StudentTrainConfig.batch, help="generated pairs per step")
    parser.add_argument("--real-batch", type=int, default=StudentTrainConfig.real_batch, help="real faces per step")
    parser.add_argument("--limit", type=int, help="use only the first N real faces (smoke tests)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--snapshot-steps", type=int, default=StudentTrainConfig.snapshot_steps)
    parser.set_defaults(handler=run_target)


def run_target(args: argparse.Namespace) -> int:
    """Run ``train student`` from parsed arguments."""
    from fluidsrv.settings import Settings

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = StudentTrainConfig(batch=args.batch, real_batch=args.real_batch if args.data else 0,
                                snapshot_steps=args.snapshot_steps)
    path = train_student(args.generator, args.data, args.out, args.minutes, config=config, resume=args.resume,
                         limit=args.limit, cache_dir=Settings.from_env().cache_dir)
    print(f"wrote {path}")
    return 0
