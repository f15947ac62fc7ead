"""The StyleGAN2 training loop: losses, lazy regularisation, EMA, checkpoints, sample grids and the run driver.

One step (as in StyleGAN2 / rosinality's ``train.py``):

1. D step: non-saturating logistic loss ``softplus(D(fake)) + softplus(−D(real))`` on DiffAugmented images;
2. every ``r1_every`` steps, lazy R1: ``γ/2 · E‖∇ₓD(aug(x))‖² · r1_every`` on the real batch;
3. G step: ``softplus(−D(aug(G(z))))`` with style mixing (two z, one random cut-over layer per batch);
4. optionally (``pl_weight`` > 0, off by default) lazy path-length regularisation every ``pl_every`` steps;
5. G_ema ← lerp(G_ema, G, 1 − β) with β from a half-life in images (ramped up early in the run).

Adam learning rates and betas of a lazily regularised network are corrected by ``c = k / (k + 1)`` (lr·c,
β^c) so that the regularisation steps do not change the effective schedule. On CUDA the forward passes run
under bf16 autocast with channels_last tensors (R1 in fp32 for a stable double backward); on CPU everything is
fp32.

**Checkpoints.** ``checkpoint-SSSSSSS.safetensors`` holds G, G_ema and D in fp16, ``w_avg`` and, in its metadata,
the training config and counters; it stays ≤ 16 MiB for every config in :mod:`fluidsrv.training.configs`
(the most a remote GPU run can hand back per file). The Adam state goes in a sibling
``checkpoint-SSSSSSS-optim.safetensors`` because it would not fit beside the weights (it is as large as G + D
again). It stores only the second moments, in bf16 (which keeps fp32's range: squared gradients underflow
fp16): with StyleGAN2's β1 = 0 the first moment is just the last gradient and is overwritten by the next step,
so restoring it as zeros is exact. A resume without the optimizer file still works (with a warning): with
β1 = 0 a fresh Adam only re-estimates its per-parameter scale over ~1/(1−β2) = 100 steps. Master weights are
fp32 in memory; rounding them to fp16 at a resume perturbs them by ≤ 0.05 %, far below one Adam step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fluidsrv.latents import mix_styles
from fluidsrv.models.stylegan2 import Discriminator, Generator
from fluidsrv.training.augment import diff_augment, parse_policy
from fluidsrv.training.checkpoints import (
    ModulePart,
    OptimizerPart,
    checkpoint_path,
    half_state,
    load_state,
    prune_checkpoints,
    read_checkpoint,
    read_checkpoint_metadata,
    restore_optimizers,
    resume_checkpoint,
    write_checkpoint,
)
from fluidsrv.training.checkpoints import latest_checkpoint as latest_checkpoint
from fluidsrv.training.checkpoints import optimizer_path as optimizer_path
from fluidsrv.training.configs import TrainConfig
from fluidsrv.training.data import BatchStream, FaceShardDataset

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fluidsrv-gan-checkpoint"
OPTIMIZER_FORMAT = "fluidsrv-gan-optimizer"
GENERATOR_EXPORT = "generator.safetensors"
LOG_FILE = "log.jsonl"
SAMPLE_GRID_SHAPE = (8, 4)  # columns, rows of the sample grids
W_AVG_SAMPLES = 10_000
LOGGED_METRICS = ("loss_d", "loss_g", "r1", "real_logit", "fake_logit", "images_per_sec")  # on the console


@dataclass
class TrainState:
    """The counters a run resumes from."""

    step: int = 0  # optimisation steps done (one D step + one G step each)
    images_seen: int = 0  # real images shown to D (step × batch, summed over batch changes)
    pl_mean: float = 0.0  # running mean path length (path-length regularisation)
    train_seconds: float = 0.0  # wall-clock seconds spent in training steps over all chunks

    @property
    def kimg(self) -> float:
        """Thousands of real images seen."""
        return self.images_seen / 1000.0


def resolve_device(device: str) -> torch.device:
    """Return the torch device for "auto" (CUDA when available), "cpu" or "cuda[:N]"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def training_device(device: str) -> torch.device:
    """Resolve ``device`` for a training run; on CUDA also turn on cuDNN autotuning and TF32 matmuls."""
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch_device


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert model-side images ``[N, 3, H, W]`` in [-1, 1] to uint8 RGB ``[N, H, W, 3]``."""
    assert images.ndim == 4 and images.shape[1] == 3, images.shape
    scaled = (images.detach().float().cpu() + 1.0) * 127.5  # [N, 3, H, W]
    return scaled.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [N, H, W, 3]


def save_image_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """Write ``images`` [N, 3, H, W] in [-1, 1] as one PNG grid, ``columns`` wide, row-major."""
    pixels = images_to_uint8(images)  # [N, H, W, 3]
    count, height, width, _ = pixels.shape
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    Image.fromarray(grid).save(path)


def _to_channels_last(module: nn.Module) -> None:
    """Store every 4-D parameter and buffer channels-last, in place, so convolutions run in NHWC.

    Not ``module.to(memory_format=...)``: that fails on the rank-5 modulated-conv weights. The activations
    follow the layout of the constant input / the images, so this is enough for cuDNN's NHWC kernels.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.ndim == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


def _lazy_adam(module: nn.Module, lr: float, betas: tuple[float, float], reg_every: int | None) -> torch.optim.Adam:
    """Adam with StyleGAN2's lazy-regularisation correction of lr and betas (none when ``reg_every`` is None)."""
    ratio = 1.0 if reg_every is None else reg_every / (reg_every + 1)
    return torch.optim.Adam(module.parameters(), lr=lr * ratio, betas=(betas[0] ** ratio, betas[1] ** ratio), eps=1e-8)


class GanTrainer:
    """G, D, G_ema and their optimizers for one config, with a step function and checkpoint IO."""

    def __init__(self, config: TrainConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.mixed_precision = self.on_cuda  # bf16 autocast of the forward passes (R1 stays fp32)
        self.augment_policy = parse_policy(config.augment)
        torch.manual_seed(config.seed)
        self.G = Generator(config.generator).to(self.device)
        self.D = Discriminator(config.discriminator).to(self.device)
        if self.on_cuda:
            _to_channels_last(self.G)
            _to_channels_last(self.D)
        # a fresh copy, not copy.deepcopy: the configs hold read-only mappings, which do not deep-copy
        self.G_ema = Generator(config.generator).to(self.device)
        if self.on_cuda:
            _to_channels_last(self.G_ema)
        self.G_ema.load_state_dict(self.G.state_dict())
        self.G_ema.eval().requires_grad_(False)
        self.opt_g = _lazy_adam(self.G, config.g_lr, config.betas, config.pl_every if config.pl_weight > 0 else None)
        self.opt_d = _lazy_adam(self.D, config.d_lr, config.betas, config.r1_every)
        self.state = TrainState()

    # ----------------------------------------------------------------------------------------- one step

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.mixed_precision:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images, self.augment_policy) if self.augment_policy else images

    def _random_ws(self, generator: Generator, batch: int) -> torch.Tensor:
        """Mapped random latents ``[batch, num_ws, w_dim]``, style-mixed with probability ``mixing_prob``."""
        z = torch.randn(batch, generator.w_dim, device=self.device)  # [B, w_dim]
        ws = generator.mapping(z)  # [B, num_ws, w_dim]
        if self.config.mixing_prob > 0 and float(torch.rand(())) < self.config.mixing_prob:
            cutoff = int(torch.randint(1, generator.num_ws, ()))
            z_other = torch.randn(batch, generator.w_dim, device=self.device)  # [B, w_dim]
            ws = mix_styles(ws, generator.mapping(z_other), cutoff)  # [B, num_ws, w_dim]
        return ws

    def _generate(self, batch: int) -> torch.Tensor:
        """Images from the training generator G, random noise: ``[batch, 3, R, R]``."""
        return self.G.synthesis(self._random_ws(self.G, batch), noise_mode="random")

    def train_step(self, reals: torch.Tensor) -> dict[str, float]:
        """Run :meth:`step` and return its metrics as floats (this waits for the device)."""
        return {name: float(value) for name, value in self.step(reals).items()}

    def step(self, reals: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one D step (+ lazy R1), one G step (+ lazy path length) and the EMA update on a real batch.

        ``reals`` is ``[B, 3, R, R]`` float in [-1, 1]. Returns the step's losses and mean logits as detached
        0-d tensors on the device, so a GPU run is not synchronised every step.
        """
        config = self.config
        batch = reals.shape[0]
        assert reals.shape[1:] == (3, config.resolution, config.resolution), reals.shape
        if self.on_cuda:
            reals = reals.contiguous(memory_format=torch.channels_last)
        self.G.train()
        self.D.train()
        metrics: dict[str, torch.Tensor] = {}
        next_step = self.state.step + 1

        # 1. discriminator: logistic loss on augmented reals and fakes
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        with torch.no_grad(), self._autocast():
            fakes = self._generate(batch)  # [B, 3, R, R]
        with self._autocast():
            real_logits = self.D(self._augment(reals)).float()  # [B, 1]
            fake_logits = self.D(self._augment(fakes)).float()  # [B, 1]
        loss_d = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        metrics.update(loss_d=loss_d.detach(), real_logit=real_logits.detach().mean())
        metrics["fake_logit"] = fake_logits.detach().mean()

        # 2. lazy R1 on the (augmented) reals, gradient taken w.r.t. the un-augmented images
        if config.r1_gamma > 0 and next_step % config.r1_every == 0:
            metrics["r1"] = self._r1_step(reals)

        # 3. generator: non-saturating loss with style mixing
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        with self._autocast():
            gen_logits = self.D(self._augment(self._generate(batch))).float()  # [B, 1]
        loss_g = F.softplus(-gen_logits).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        metrics["loss_g"] = loss_g.detach()

        # 4. optional lazy path-length regularisation
        if config.pl_weight > 0 and next_step % config.pl_every == 0:
            metrics["pl"] = self._path_length_step(batch)

        # 5. EMA generator
        self.state.step = next_step
        self.state.images_seen += batch
        self._update_ema(batch)
        return metrics

    def _r1_step(self, reals: torch.Tensor) -> torch.Tensor:
        """Apply one lazy R1 step to D and return the (unscaled) penalty E‖∇D‖²."""
        reals = reals.detach().requires_grad_(True)
        logits = self.D(self._augment(reals))  # [B, 1] fp32: a double backward in bf16 is too coarse
        (gradient,) = torch.autograd.grad(logits.sum(), reals, create_graph=True)  # [B, 3, R, R]
        penalty = gradient.square().sum(dim=(1, 2, 3)).mean()
        self.opt_d.zero_grad(set_to_none=True)
        (penalty * (self.config.r1_gamma / 2 * self.config.r1_every)).backward()
        self.opt_d.step()
        return penalty.detach()

    def _path_length_step(self, batch: int) -> torch.Tensor:
        """Apply one lazy path-length step to G and return the penalty."""
        config = self.config
        pl_batch = max(1, batch // config.pl_batch_shrink)
        ws = self._random_ws(self.G, pl_batch)  # [b, num_ws, w_dim]
        with self._autocast():
            images = self.G.synthesis(ws, noise_mode="random").float()  # [b, 3, R, R]
        noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])  # [b, 3, R, R]
        (gradient,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)  # [b, num_ws, w_dim]
        lengths = gradient.square().sum(dim=2).mean(dim=1).sqrt()  # [b]
        mean = self.state.pl_mean + config.pl_decay * (float(lengths.detach().mean()) - self.state.pl_mean)
        self.state.pl_mean = mean
        penalty = (lengths - mean).square().mean()
        self.opt_g.zero_grad(set_to_none=True)
        (penalty * (config.pl_weight * config.pl_every)).backward()
        self.opt_g.step()
        return penalty.detach()

    @torch.no_grad()
    def _update_ema(self, batch: int) -> None:
        """Move G_ema toward G with a half-life of ``ema_kimg`` thousand images (ramped up early on)."""
        half_life = self.config.ema_kimg * 1000.0
        if self.config.ema_rampup is not None:
            half_life = min(half_life, self.state.images_seen * self.config.ema_rampup)
        beta = 0.5 ** (batch / max(half_life, 1e-8))
        for ema_param, param in zip(self.G_ema.parameters(), self.G.parameters()):
            ema_param.lerp_(param, 1.0 - beta)
        buffers = dict(self.G.named_buffers())
        for name, ema_buffer in self.G_ema.named_buffers():
            if name != "w_avg":  # G_ema's own w_avg is estimated at each snapshot
                ema_buffer.copy_(buffers[name])

    # -------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """Render G_ema images ``[N, 3, R, R]`` for latents ``z`` [N, w_dim] (const noise)."""
        self.G_ema.eval()
        return self.G_ema(z.to(self.device), truncation_psi=truncation_psi, noise_mode="const").float()

    # ----------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: Path) -> tuple[Path, Path]:
        """Write the weights checkpoint and its optimizer file; return both paths."""
        w_avg = self.G_ema.estimate_w_avg(W_AVG_SAMPLES)  # [w_dim]
        self.G.w_avg.copy_(w_avg)
        tensors = {"w_avg": w_avg.detach().float().cpu(), **half_state(self._networks())}
        metadata = {"train_config": json.dumps(self.config.to_dict()), "state": json.dumps(asdict(self.state))}
        return write_checkpoint(
            path,
            tensors,
            metadata,
            self._optimizers(),
            (CHECKPOINT_FORMAT, OPTIMIZER_FORMAT),
            first_moments=self.config.betas[0] > 0,  # with β1 = 0 the first moment is the last gradient
        )

    def _networks(self) -> list[ModulePart]:
        """The networks a checkpoint holds, with their key prefixes."""
        return [("G", self.G), ("G_ema", self.G_ema), ("D", self.D)]

    def _optimizers(self) -> list[OptimizerPart]:
        """The optimizers a checkpoint's optimizer file holds, with their networks and key prefixes."""
        return [("G", self.G, self.opt_g), ("D", self.D, self.opt_d)]

    @classmethod
    def from_checkpoint(
        cls, path: Path, device: torch.device | str = "cpu", config: TrainConfig | None = None
    ) -> GanTrainer:
        """Rebuild a trainer from a checkpoint (and its optimizer file when present) to resume training.

        ``config`` overrides the stored training config (batch, rates, augmentation...); its architectures
        must equal the checkpoint's.
        """
        tensors, metadata = read_checkpoint(path, CHECKPOINT_FORMAT)
        stored = TrainConfig.from_dict(json.loads(metadata["train_config"]))
        config = stored if config is None else config
        if (config.generator, config.discriminator) != (stored.generator, stored.discriminator):
            raise ValueError(f"{path} was trained with config {stored.name!r}, whose architecture differs")
        trainer = cls(config, device)
        load_state(trainer._networks(), tensors)
        trainer.G.w_avg.copy_(tensors["w_avg"])
        trainer.G_ema.w_avg.copy_(tensors["w_avg"])
        trainer.state = TrainState(**json.loads(metadata["state"]))
        restore_optimizers(path, trainer._optimizers())
        return trainer


# ------------------------------------------------------------------------------ the driver (the encoder's too)


class RunCounters(Protocol):
    """The counters of a training run that the driver reads and updates (TrainState and the encoder's alike)."""

    step: int
    images_seen: int
    train_seconds: float

    @property
    def kimg(self) -> float:
        """Thousands of real images seen."""
        ...


class MetricLog:
    """Averages step metrics between log lines, times the training between them, and appends JSON lines."""

    def __init__(self, path: Path, shown: Sequence[str] = (), logger: logging.Logger | None = None) -> None:
        self.path = path
        self.shown = tuple(shown)  # the record entries that the console line shows
        self.logger = logger or log  # the console line goes out under the training module's name
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.images = 0
        self.started = now
        self.excluded = 0.0  # seconds since ``started`` spent outside training steps (snapshots)

    def add(self, metrics: Mapping[str, torch.Tensor | float], images: int) -> None:
        """Add one step's metrics (device tensors or floats) and its number of real images."""
        for name, value in metrics.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1
        self.images += images

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (spent on a snapshot) out of the training time."""
        self.excluded += seconds

    def flush(self, state: RunCounters) -> dict[str, Any]:
        """Write one line (averages since the last one), add the interval to ``state.train_seconds``."""
        means = {name: float(self.sums[name]) / self.counts[name] for name in sorted(self.sums)}  # waits for the device
        now = time.perf_counter()
        seconds = max(now - self.started - self.excluded, 1e-9)
        state.train_seconds += seconds
        record: dict[str, Any] = {"step": state.step, "kimg": round(state.kimg, 3), **means}
        record["images_per_sec"] = self.images / seconds
        record["sec_per_step"] = seconds / max(self.steps, 1)
        record["train_hours"] = state.train_seconds / 3600.0
        record["time"] = time.time()
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._reset(now)
        shown = "  ".join(f"{name}={record[name]:.4g}" for name in self.shown if name in record)
        self.logger.info("step %d  %.2f kimg  %s", state.step, state.kimg, shown)
        if not all(math.isfinite(value) for value in means.values()):
            raise FloatingPointError(f"non-finite training metrics at step {state.step}: {means}")
        return record


@dataclass(frozen=True)
class RunLength:
    """How long a run trains (``kimg`` thousand real images in total, or ``minutes``) and how often it snapshots."""

    kimg: float
    snapshot_kimg: float
    log_every: int  # steps between log lines
    minutes: float | None = None


def run_steps(
    state: RunCounters,
    batches: Iterator[torch.Tensor],
    step: Callable[[torch.Tensor], Mapping[str, torch.Tensor | float]],
    snapshot: Callable[[], Path],
    metric_log: MetricLog,
    length: RunLength,
) -> Path:
    """Step on real batches until ``length`` is reached (or Ctrl-C), logging and snapshotting on the way.

    ``step`` trains on one batch and advances ``state``; ``snapshot`` writes a checkpoint and returns its path.
    A final snapshot is always written, also after an interrupt; returns its checkpoint.
    """
    target_images = int(length.kimg * 1000)
    snapshot_images = max(1, int(length.snapshot_kimg * 1000))
    next_snapshot = (state.images_seen // snapshot_images + 1) * snapshot_images
    deadline = None if length.minutes is None else time.monotonic() + length.minutes * 60.0
    try:
        while state.images_seen < target_images and (deadline is None or time.monotonic() < deadline):
            reals = next(batches)
            metric_log.add(step(reals), reals.shape[0])
            if state.step % length.log_every == 0:
                metric_log.flush(state)
            if state.images_seen >= next_snapshot:
                started = time.perf_counter()
                snapshot()
                metric_log.exclude(time.perf_counter() - started)
                next_snapshot += snapshot_images
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: writing a final snapshot", state.step)
    if metric_log.steps:
        metric_log.flush(state)
    checkpoint = snapshot()
    log.info("wrote %s (%.2f kimg, %d steps)", checkpoint, state.kimg, state.step)
    return checkpoint


def write_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write a run's training config (as its ``to_dict``) to ``config.json`` in the run folder."""
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _snapshot(trainer: GanTrainer, run_dir: Path, fixed_z: torch.Tensor, keep: int) -> Path:
    """Write a checkpoint, the exported G_ema, and a sample grid; prune older checkpoints to ``keep``."""
    from fluidsrv.weights import save_generator

    step = trainer.state.step
    checkpoint, _ = trainer.save_checkpoint(checkpoint_path(run_dir, step))
    info = {"training_config": trainer.config.name, "kimg": f"{trainer.state.kimg:.1f}", "step": str(step)}
    export = run_dir / GENERATOR_EXPORT
    save_generator(export.with_name(export.name + ".partial"), trainer.G_ema, trainer.G_ema.w_avg, info, half=True)
    os.replace(export.with_name(export.name + ".partial"), export)
    columns = SAMPLE_GRID_SHAPE[0]
    save_image_grid(trainer.sample(fixed_z), run_dir / f"samples-{step:07d}.png", columns)
    prune_checkpoints(run_dir, keep)
    return checkpoint


def train_gan(
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    kimg: float,
    resume: Path | None = None,
    minutes: float | None = None,
    device: str = "auto",
    preload: bool | None = None,
    num_workers: int = 0,
    keep: int = 2,
    limit: int | None = None,
) -> TrainState:
    """Train until ``kimg`` thousand images in total have been seen (or ``minutes`` have passed), snapshotting.

    ``resume`` is a checkpoint file or a run folder (its newest checkpoint); the run continues its step and
    image counters. ``preload`` (default: on CUDA) decodes the data once onto the device. A final snapshot is
    always written, also when the run is interrupted with Ctrl-C. Returns the final counters.
    """
    torch_device = training_device(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        resume_path = resume_checkpoint(resume)
        trainer = GanTrainer.from_checkpoint(resume_path, torch_device, config)
        log.info("resumed %s at step %d (%.1f kimg)", resume_path, trainer.state.step, trainer.state.kimg)
    else:
        trainer = GanTrainer(config, torch_device)
    config = trainer.config
    write_run_config(run_dir, config.to_dict())

    dataset = FaceShardDataset(data_dir, "train", config.resolution, xflip=config.xflip, limit=limit)
    stream = BatchStream(
        dataset,
        config.batch_size,
        torch_device,
        seed=config.seed + trainer.state.step,
        preload=torch_device.type == "cuda" if preload is None else preload,
        num_workers=num_workers,
    )
    log.info(
        "training %s on %d faces (%d with mirrors) on %s", config.name, dataset.num_faces, len(dataset), torch_device
    )
    torch.manual_seed(config.seed + trainer.state.step)
    fixed_z = torch.randn(
        SAMPLE_GRID_SHAPE[0] * SAMPLE_GRID_SHAPE[1],
        config.generator.w_dim,
        generator=torch.Generator().manual_seed(config.seed),
    )  # [32, w_dim]
    batches = iter(stream)
    if trainer.state.step == 0:
        shown = [next(batches) for _ in range(math.ceil(len(fixed_z) / config.batch_size))]
        save_image_grid(torch.cat(shown)[: len(fixed_z)], run_dir / "reals.png", SAMPLE_GRID_SHAPE[0])

    run_steps(
        trainer.state,
        batches,
        trainer.step,
        lambda: _snapshot(trainer, run_dir, fixed_z, keep),
        MetricLog(run_dir / LOG_FILE, LOGGED_METRICS),
        RunLength(kimg, config.snapshot_kimg, config.log_every, minutes),
    )
    return trainer.state


def stored_train_config(path: Path) -> TrainConfig:
    """Return the training config stored in a checkpoint."""
    metadata = read_checkpoint_metadata(path, CHECKPOINT_FORMAT)
    return TrainConfig.from_dict(json.loads(metadata["train_config"]))


def load_checkpoint_generator(path: Path, device: torch.device | str = "cpu") -> Generator:
    """Return the EMA generator (with ``w_avg`` set) of a training checkpoint, in eval mode."""
    tensors, metadata = read_checkpoint(path, CHECKPOINT_FORMAT)
    config = TrainConfig.from_dict(json.loads(metadata["train_config"]))
    generator = Generator(config.generator)
    load_state([("G_ema", generator)], tensors)
    generator.w_avg.copy_(tensors["w_avg"])
    return generator.to(device).eval().requires_grad_(False)
