"""Named StyleGAN2 training configs, in one place: the embedded GPU model, a CPU fallback and a tiny test config.

Sizing rules that every config here obeys (``tests/test_training.py`` checks them):

* a training checkpoint holds G, G_ema and D in fp16 in one file of at most 16 MiB, the most a remote GPU run
  can hand back per file: ``2·|G| + |D| ≤ 8.0M`` parameters. This, not the 30 MB cap on the shipped G_ema,
  is the binding limit;
* the optimizer state goes in a second file (see :mod:`fluidsrv.training.checkpoints`), also ≤ 16 MiB.

``embedded-128``, the model a GPU run trains (G 2.69M / D 2.12M parameters; checkpoint 14.3 MiB, optimizer file
9.2 MiB, shipped G_ema 5.4 MB in fp16):

* widths 160 at 4²–16², then 128 / 64 / 32 at 32² / 64² / 128², for G and D alike. Parameters sit in the
  low-resolution layers (a 160-wide 3×3 conv is 230k weights) and compute in the high-resolution ones (each of
  the 32²–128² blocks costs about the same FLOPs, since the width halves as the side doubles), so the budget
  buys coarse-structure capacity where faces need it while the 128² block stays cheap;
* ``w_dim`` 256, not 512: a 512-wide W would spend 2.1M parameters on the mapping network alone (and double
  every modulation affine) — a quarter of the checkpoint budget — and buys no compatibility, because edit
  directions are found on our own generator's W (SeFa, scorer-based), never transferred from FFHQ models.
  Our encoders and direction tools take ``w_dim`` from the generator config;
* 8 mapping layers (0.53M parameters at 256): the depth the StyleGAN papers found gives the most disentangled
  W, which the sliders depend on;
* batch 32, lr 0.0025, style mixing 0.9, EMA half-life 10 kimg (StyleGAN2-ADA's settings at this batch), and
  R1 γ = 0.5 every 16 steps: StyleGAN2's FFHQ-256 γ = 1 at batch 64, scaled by resolution² / batch as in
  StyleGAN2-ADA's heuristic. DiffAugment color + translation + cutout, since 44k faces (88k with mirroring) is
  a small dataset for a GAN trained for several Mimg: the discriminator would otherwise start memorising.

``cpu-128``, the fallback for this project's 2-core CPU (G 1.79M / D 1.19M; checkpoint 9.1 MiB): same
resolution, w_dim and mapping depth (so the tooling treats both alike), widths 128 at 4²–16² and 64 / 32 / 16
at 32² / 64² / 128² — a quarter of embedded-128's FLOPs from 32² up. Measured on this machine, one thread,
batch 16, R1 every 16 steps (process CPU time, which is what the busy shared machine cannot distort):
embedded-128 7.6 s a step (2.0 images/s), cpu-128 2.3 s a step (6.9 images/s; batch 8 the same rate), a
thinner 128/128/128/48/24/12 1.84 s (8.4 images/s), wider-at-the-bottom 256/256/256/64/32/16 3.6 s
(4.3 images/s). Two threads on the shared, loaded machine were *slower* than one (oversubscription: 8.5 s a
step), so train with ``--threads 1`` unless the machine is otherwise idle. At ~6.9 images/s, 15 CPU-hours are
~370 kimg (~4 passes over the mirrored data): enough for recognisable, soft faces, not for the GPU model's
quality. Batch 16, γ = 1 and a 5 kimg EMA half-life follow the same scaling rules; DiffAugment without cutout,
since memorising is no risk in four passes and cutout mostly slows early learning.

``tiny-32`` is for tests and smoke runs only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from fluidsrv.models.stylegan2 import DiscriminatorConfig, GeneratorConfig
from fluidsrv.training.checkpoints import CHECKPOINT_BUDGET_BYTES as CHECKPOINT_BUDGET_BYTES

ConfigT = TypeVar("ConfigT")

SHIPPED_GENERATOR_BUDGET_BYTES = 30 * 10**6
"""Largest fp16 G_ema the embedded model may ship as."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a StyleGAN2 training run except the data folder and its length."""

    name: str  # the name the CLI's --config takes
    generator: GeneratorConfig  # G (and G_ema) architecture
    discriminator: DiscriminatorConfig  # D architecture; its resolution must equal G's
    batch_size: int = 32  # images per step (real and fake each)
    g_lr: float = 0.0025  # Adam learning rate of G (before the lazy-regularisation correction)
    d_lr: float = 0.0025  # Adam learning rate of D (before the lazy-regularisation correction)
    betas: tuple[float, float] = (0.0, 0.99)  # Adam betas; β1 = 0 as in StyleGAN2
    r1_gamma: float = 1.0  # R1 penalty weight γ (the loss adds γ/2 · E‖∇D(x)‖²)
    r1_every: int = 16  # lazy R1: run the penalty every this many steps, scaled by it
    pl_weight: float = 0.0  # path-length regularisation weight; 0 = off (the default)
    pl_every: int = 4  # lazy path-length regularisation interval
    pl_batch_shrink: int = 2  # the path-length batch is batch_size // this
    pl_decay: float = 0.01  # EMA decay of the running mean path length
    mixing_prob: float = 0.9  # probability that a batch uses style mixing (two z, a random cut-over layer)
    ema_kimg: float = 10.0  # G_ema half-life in thousands of images
    ema_rampup: float | None = 0.05  # early on, cap the half-life at this fraction of the images seen
    augment: str = "color,translation,cutout"  # DiffAugment policies applied to everything D sees
    xflip: bool = True  # add mirrored copies of the training faces
    snapshot_kimg: float = 50.0  # write a checkpoint + sample grid every this many thousand images
    log_every: int = 50  # write a log line every this many steps
    seed: int = 0  # seeds the weights, the batches and the random draws

    def __post_init__(self) -> None:
        if self.generator.resolution != self.discriminator.resolution:
            raise ValueError(
                f"G and D resolutions differ: {self.generator.resolution} vs {self.discriminator.resolution}"
            )
        if self.batch_size < 1 or self.r1_every < 1 or self.pl_every < 1 or self.log_every < 1:
            raise ValueError("batch_size, r1_every, pl_every and log_every must be ≥ 1")
        if self.batch_size % min(self.batch_size, self.discriminator.stddev_group):
            raise ValueError(f"batch {self.batch_size} must be a multiple of the stddev group")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @property
    def resolution(self) -> int:
        """Image side of the run."""
        return self.generator.resolution

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict that :meth:`from_dict` turns back into this config."""
        # not dataclasses.asdict: it deep-copies the nested configs' read-only channel mappings, which fails
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        data["generator"] = self.generator.to_dict()
        data["discriminator"] = self.discriminator.to_dict()
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        values = dict(data)
        values["generator"] = GeneratorConfig.from_dict(data["generator"])
        values["discriminator"] = DiscriminatorConfig.from_dict(data["discriminator"])
        return cls(**values)


def _widths(*values: int) -> dict[int, int]:
    """Widths for 4², 8², ... in order."""
    return {2 ** (2 + index): width for index, width in enumerate(values)}


def _gan(name: str, resolution: int, widths: dict[int, int], w_dim: int, n_mapping: int, **train: Any) -> TrainConfig:
    return TrainConfig(
        name=name,
        generator=GeneratorConfig(resolution=resolution, w_dim=w_dim, n_mapping=n_mapping, channels=widths),
        discriminator=DiscriminatorConfig(resolution=resolution, channels=widths),
        **train,
    )


EMBEDDED_128 = _gan(
    "embedded-128", 128, _widths(160, 160, 160, 128, 64, 32), w_dim=256, n_mapping=8, batch_size=32, r1_gamma=0.5
)

CPU_128 = _gan(
    "cpu-128",
    128,
    _widths(128, 128, 128, 64, 32, 16),
    w_dim=256,
    n_mapping=8,
    batch_size=16,
    r1_gamma=1.0,
    ema_kimg=5.0,
    augment="color,translation",
    snapshot_kimg=10.0,
    log_every=10,
)

TINY_32 = _gan(
    "tiny-32",
    32,
    _widths(32, 32, 32, 16),
    w_dim=32,
    n_mapping=2,
    batch_size=4,
    r1_every=2,
    snapshot_kimg=1.0,
    log_every=1,
    ema_kimg=0.1,
)
"""A 67k-parameter 32² config for tests and smoke runs (R1 every 2 steps so it is exercised)."""

CONFIGS: dict[str, TrainConfig] = {config.name: config for config in (EMBEDDED_128, CPU_128, TINY_32)}


def pick_config(configs: Mapping[str, ConfigT], name: str, kind: str) -> ConfigT:
    """Return ``configs[name]``, or raise ValueError naming the ``kind`` of config and the choices."""
    try:
        return configs[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose from {sorted(configs)}") from None


def get_config(name: str) -> TrainConfig:
    """Return the named training config."""
    return pick_config(CONFIGS, name, "training config")
