"""Training a single-edit preset: distil one slider move of a generator into a :class:`PresetNet`.

The pairs are the generator's own edit, ``input → target``:

1. **generated**: random ``ws`` (mapped z at a truncation ψ ∈ [0.5, 1]), ``input = G(ws)``, ``target = G(ws + Δ)``
   where ``Δ`` is the direction's move at the preset's strength (:func:`fluidsrv.latents.apply_sliders`, so a
   strength means what the slider's value means);
2. **real** (with ``--data`` and an encoder): an aligned real face ``x`` of the train split, its reconstruction's
   code ``ws = E(x)``, ``input = x`` and ``target = x + G(ws + Δ) − G(ws)``: the generator's change of that face,
   drawn over the photo's own texture, which is what a preset sees when it is applied to a photo.

The network learns ``target`` from ``input`` (L1 + the weight-free Laplacian-pyramid distance), mirrored at random.
Fidelity is measured on held-out faces the run never trained on (other seeds; real faces of ids ≥ 44,000): PSNR of
the preset's edit against the generator's, beside the PSNR of no edit at all (the input) and the share of the edit's
squared change that the preset draws. :func:`train_preset` writes the preset file with these figures in its metadata.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from fluidsrv import latents
from fluidsrv.models.preset import PresetNet, PresetNetConfig
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.perceptual import LaplacianPyramidDistance
from fluidsrv.presets import PresetFacts, check_name, save_preset
from fluidsrv.stages import Direction

log = logging.getLogger(__name__)

Encode = Callable[[torch.Tensor], torch.Tensor]
"""Real faces [N, 3, R, R] in [-1, 1] -> their codes ws [N, num_ws, w_dim] (the encoder stage, one face at a time)."""


@dataclass(frozen=True)
class PresetTrainConfig:
    """Hyper-parameters of a preset run."""

    batch: int = 8  # pairs per step
    real_fraction: float = 0.5  # share of a batch made from real faces (when there are real faces)
    lr: float = 1e-3
    perceptual_weight: float = 0.5
    psi_low: float = 0.5  # generated ws are mapped at a truncation ψ ∈ [psi_low, 1]
    eval_faces: int = 32  # held-out faces of each kind
    bank: int = 1024  # pairs made up front and drawn from at random (0: fresh pairs every step)
    crop: int = 64  # train on random square crops of this side (0: whole faces); the net is fully convolutional
    seed: int = 0


def psnr(images: torch.Tensor, targets: torch.Tensor) -> float:
    """PSNR in dB of images against targets, both [N, 3, H, W] in [-1, 1] (from the pooled MSE, as 0-255 pixels)."""
    mse = float(F.mse_loss(images.clamp(-1, 1), targets.clamp(-1, 1))) / 4.0  # [-1, 1] -> [0, 1]
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


class PairSource(Protocol):
    """Where training pairs come from (a :class:`PairMaker`, or a test's own tiny problem)."""

    def generated(self, count: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` (input, target) pairs [count, 3, R, R] drawn with ``rng``."""
        ...

    def real(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) pairs made from real faces [N, 3, R, R]."""
        ...


class PairMaker:
    """Makes (input, target) pairs of one edit: the generator's renders, or real faces with the generator's change."""

    def __init__(self, generator: Generator, direction: Direction, strength: float, spread: torch.Tensor,
                 resolution: int, config: PresetTrainConfig, encode: Encode | None = None) -> None:
        self.generator = generator.eval().requires_grad_(False)
        self.directions = {direction.name: direction}
        self.values = {direction.name: float(strength)}
        self.spread = spread
        self.resolution = resolution
        self.config = config
        self.encode = encode

    def to_side(self, images: torch.Tensor) -> torch.Tensor:
        """Renders [N, 3, S, S] at the preset's side (antialiased when shrinking)."""
        side = self.resolution
        if images.shape[-1] == side:
            return images
        return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                             antialias=images.shape[-1] > side)

    @torch.no_grad()
    def rendered_pair(self, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G(ws), G(ws + Δ)) at the preset's side for codes ws [N, num_ws, w_dim]."""
        edited = latents.apply_sliders(ws, self.directions, self.values, spread=self.spread)
        both = self.generator.synthesis(torch.cat([ws, edited]), noise_mode="const")  # [2N, 3, S, S]
        before, after = self.to_side(both).clamp(-1.0, 1.0).chunk(2)  # as images are: a photo has no overshoot
        return before, after

    @torch.no_grad()
    def generated(self, count: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` pairs of random faces of the generator."""
        generator = self.generator
        device = generator.w_avg.device
        z = torch.randn(count, generator.w_dim, generator=rng).to(device)
        psi = (self.config.psi_low + (1 - self.config.psi_low) * torch.rand(count, 1, 1, generator=rng)).to(device)
        ws = generator.w_avg + psi * (generator.mapping(z) - generator.w_avg)  # [N, num_ws, w_dim]
        return self.rendered_pair(ws)

    @torch.no_grad()
    def real(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs of real aligned faces [N, 3, R, R]: (x, x + G(E(x) + Δ) − G(E(x)))."""
        assert self.encode is not None, "real pairs need an encoder"
        faces = self.to_side(faces)
        before, after = self.rendered_pair(self.encode(faces))
        return faces, (faces + after - before).clamp(-1.0, 1.0)


class PresetTrainer:
    """The preset network, its optimiser and one training step."""

    def __init__(self, network: PresetNet, config: PresetTrainConfig) -> None:
        self.network = network
        self.config = config
        self.distance = LaplacianPyramidDistance().to(next(network.parameters()).device)
        self.optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, betas=(0.9, 0.99))
        self.step = 0

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L1 + the perceptual distance of the network's edits of ``inputs`` against ``targets``."""
        edited = self.network(inputs)
        return F.l1_loss(edited, targets) + self.config.perceptual_weight * self.distance(edited, targets).mean()

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, rng: torch.Generator) -> float:
        """One step on pairs [N, 3, R, R] (each mirrored with probability ½, cropped when the config says); returns
        the loss."""
        flip = (torch.rand(len(inputs), generator=rng) < 0.5).to(inputs.device)[:, None, None, None]
        inputs, targets = torch.where(flip, inputs.flip(3), inputs), torch.where(flip, targets.flip(3), targets)
        if 0 < self.config.crop < inputs.shape[-1]:
            inputs, targets = random_crops(inputs, targets, self.config.crop, rng)
        self.network.train()
        loss = self.loss(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())


def random_crops(inputs: torch.Tensor, targets: torch.Tensor, side: int,
                 rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``side``² window of each input and its target (one window per pair)."""
    room = inputs.shape[-1] - side + 1
    corners = torch.randint(room, (len(inputs), 2), generator=rng).tolist()
    windows = [(slice(None), slice(y, y + side), slice(x, x + side)) for y, x in corners]
    return (torch.stack([image[window] for image, window in zip(inputs, windows, strict=True)]),
            torch.stack([image[window] for image, window in zip(targets, windows, strict=True)]))


class PairBank:
    """Pairs made once up front and drawn at random: steps stay cheap where making a pair costs more than a step."""

    def __init__(self, stream: Iterator[tuple[torch.Tensor, torch.Tensor]], size: int) -> None:
        made: list[tuple[torch.Tensor, torch.Tensor]] = []
        while sum(len(inputs) for inputs, _ in made) < size:
            made.append(next(stream))
        self.inputs = torch.cat([inputs for inputs, _ in made])[:size].half()  # [B, 3, R, R], half the memory
        self.targets = torch.cat([targets for _, targets in made])[:size].half()

    def draws(self, count: int, rng: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches of ``count`` pairs drawn at random from the bank."""
        while True:
            picks = torch.randint(len(self.inputs), (count,), generator=rng)
            yield self.inputs[picks].float(), self.targets[picks].float()


@torch.no_grad()
def fidelity(network: PresetNet, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 16) -> dict[str, float]:
    """How close the network's edits of ``inputs`` come to ``targets`` (the generator's edit), all [N, 3, R, R].

    ``psnr``: of the preset's edits; ``psnr_unedited``: of the inputs themselves (showing no edit at all);
    ``change_drawn``: 1 − MSE(preset) / MSE(no edit), the share of the edit's squared change the preset draws.
    """
    network.eval()
    edited = torch.cat([network(inputs[start:start + chunk]) for start in range(0, len(inputs), chunk)])
    edited, inputs, targets = edited.clamp(-1, 1), inputs.clamp(-1, 1), targets.clamp(-1, 1)
    error, unedited = F.mse_loss(edited, targets), F.mse_loss(inputs, targets)
    return {"psnr": round(psnr(edited, targets), 2), "psnr_unedited": round(psnr(inputs, targets), 2),
            "change_drawn": round(1.0 - float(error) / max(float(unedited), 1e-12), 3), "faces": len(inputs)}


def batches(pairs: PairSource, config: PresetTrainConfig, real_faces: Iterator[torch.Tensor] | None,
            rng: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches: generated pairs, and real ones when there are real faces and an encoder."""
    real_count = round(config.batch * config.real_fraction) if real_faces is not None else 0
    while True:
        inputs, targets = pairs.generated(config.batch - real_count, rng)
        if real_count:
            assert real_faces is not None
            real_inputs, real_targets = pairs.real(next(real_faces)[:real_count])
            inputs, targets = torch.cat([inputs, real_inputs]), torch.cat([targets, real_targets])
        yield inputs, targets


def train_network(network: PresetNet, pairs: PairSource, config: PresetTrainConfig, *, seconds: float = 0.0,
                  max_steps: int = 0, real_faces: Iterator[torch.Tensor] | None = None,
                  on_step: Callable[[int, float], None] | None = None) -> PresetTrainer:
    """Train ``network`` for ``seconds`` of wall time or ``max_steps`` steps (the first limit reached; 0: none)."""
    if seconds <= 0 and max_steps <= 0:
        raise ValueError("give a time budget or a step count")
    trainer = PresetTrainer(network, config)
    rng = torch.Generator().manual_seed(config.seed)
    started = time.monotonic()
    stream = batches(pairs, config, real_faces, rng)
    if config.bank > 0:
        stream = PairBank(stream, config.bank).draws(config.batch, rng)
        log.info("made a bank of %d pairs in %.0f s", config.bank, time.monotonic() - started)
    for inputs, targets in stream:
        loss = trainer.train_step(inputs, targets, rng)
        if on_step is not None:
            on_step(trainer.step, loss)
        if (max_steps and trainer.step >= max_steps) or (seconds and time.monotonic() - started >= seconds):
            return trainer
    raise AssertionError("unreachable: batches() is endless")


def heldout_pairs(pairs: PairSource, config: PresetTrainConfig,
                  real_faces: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation pairs: generated faces of a seed training never draws from, and held-out real faces."""
    rng = torch.Generator().manual_seed(10_000 + config.seed)
    held = {"generated": pairs.generated(config.eval_faces, rng)}
    if real_faces is not None:
        held["real"] = pairs.real(real_faces[: config.eval_faces])
    return held


@dataclass(frozen=True)
class PresetRun:
    """What a finished run made: the preset's facts (with its fidelity) and its network."""

    facts: PresetFacts
    network: PresetNet


def distil_preset(name: str, label: str, pairs: PairMaker, generator_sha256: str, config: PresetTrainConfig, *,
                  net_config: PresetNetConfig, seconds: float = 0.0, max_steps: int = 0,
                  real_faces: Iterator[torch.Tensor] | None = None, heldout_real: torch.Tensor | None = None,
                  on_step: Callable[[int, float], None] | None = None) -> PresetRun:
    """Train a preset network on ``pairs`` and measure it on held-out pairs; returns its facts and network."""
    check_name(name)
    device = pairs.generator.w_avg.device
    torch.manual_seed(config.seed)
    network = PresetNet(net_config).to(device)
    held = heldout_pairs(pairs, config, heldout_real)
    started = time.monotonic()
    trainer = train_network(network, pairs, config, seconds=seconds, max_steps=max_steps, real_faces=real_faces,
                            on_step=on_step)
    figures = {kind: fidelity(network, *pair) for kind, pair in held.items()}
    direction = next(iter(pairs.directions))
    training: dict[str, Any] = {"steps": trainer.step, "seconds": round(time.monotonic() - started, 1),
                                "pairs": trainer.step * config.batch,
                                "real_fraction": config.real_fraction if real_faces is not None else 0.0}
    facts = PresetFacts(name=name, label=label, direction=direction, strength=pairs.values[direction],
                        generator_sha256=generator_sha256, resolution=net_config.resolution, fidelity=figures,
                        training=training)
    return PresetRun(facts, network.eval().requires_grad_(False))


def write_preset(run: PresetRun, out: Path) -> Path:
    """Write a finished run's preset file to ``out`` (its stem is the preset's name); returns the path."""
    save_preset(run.network, run.facts, out)
    return out


# ---- from the server's settings (the ``fluidsrv preset train`` path) -----------------------------------------


def find_direction(directions: dict[str, Direction], wanted: str) -> Direction:
    """The direction named ``wanted`` (by name, or by label, case-insensitive); ValueError listing the known ones."""
    if wanted in directions:
        return directions[wanted]
    for direction in directions.values():
        if direction.label.casefold() == wanted.casefold() or direction.name.casefold() == wanted.casefold():
            return direction
    known = ", ".join(sorted(directions)[:40])
    raise ValueError(f"no direction {wanted!r} for this generator; known: {known}")


def step_job_result(job: Any) -> Any:
    """Run a step job to its end, ignoring its progress; return its result."""
    while True:
        try:
            next(job)
        except StopIteration as stop:
            return stop.value


def encoder_of(runtime: Any) -> Encode | None:
    """The runtime's encoder as an :data:`Encode` when it is the one-pass e4e (the projector is far too slow)."""
    if runtime.active_stages().get("encoder") != "e4e":
        log.warning("real pairs need the e4e encoder (active: %s): training on generated pairs only",
                    runtime.active_stages().get("encoder"))
        return None
    encoder, generator = runtime.stage("encoder"), runtime.generator

    def encode(faces: torch.Tensor) -> torch.Tensor:
        return torch.cat([step_job_result(encoder.encode(face[None], generator)).ws for face in faces])

    return encode


def train_preset(name: str, direction: str, strength: float, out: Path, *, generator: str = "embedded",
                 label: str | None = None, data_dir: Path | None = None, minutes: float = 5.0, max_steps: int = 0,
                 config: PresetTrainConfig | None = None, net_config: PresetNetConfig | None = None) -> PresetRun:
    """Distil ``direction`` at ``strength`` of the settings' ``generator`` into a preset and write it to ``out``."""
    from fluidsrv.fingerprint import generator_sha256
    from fluidsrv.runtime import Runtime
    from fluidsrv.settings import Settings
    from fluidsrv.training.data import BatchStream, FaceShardDataset, to_model_range

    config = config or PresetTrainConfig()
    runtime = Runtime.build(Settings.from_env(generator=generator, previewer="generator"))
    chosen = find_direction(runtime.directions, direction)
    low, high = chosen.slider_range
    if not low <= strength <= high:
        raise ValueError(f"strength {strength} is outside the {chosen.label} slider's range [{low}, {high}]")
    resolution = runtime.generator.resolution
    net_config = net_config or PresetNetConfig(resolution=resolution)
    encode = encoder_of(runtime) if data_dir is not None else None
    pairs = PairMaker(runtime.generator, chosen, strength, runtime.spread, net_config.resolution, config, encode)
    real_faces = heldout = None
    if encode is not None and data_dir is not None and config.real_fraction > 0:
        side = min(net_config.resolution, 128)  # the shards' side
        train = FaceShardDataset(data_dir, "train", resolution=side, xflip=True)
        real_faces = iter(BatchStream(train, max(1, round(config.batch * config.real_fraction)), runtime.device,
                                      seed=config.seed))
        held = FaceShardDataset(data_dir, "heldout", resolution=side, limit=config.eval_faces)
        heldout = to_model_range(torch.stack([held[index] for index in range(len(held))])).to(runtime.device)

    def report(step: int, loss: float) -> None:
        if step % 50 == 0:
            log.info("step %d: loss %.4f", step, loss)

    run = distil_preset(name, label or chosen.label, pairs, generator_sha256(runtime.generator), config,
                        net_config=net_config, seconds=minutes * 60.0, max_steps=max_steps, real_faces=real_faces,
                        heldout_real=heldout, on_step=report)
    write_preset(run, out)
    return run
