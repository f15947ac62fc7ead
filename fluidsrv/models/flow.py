"""An attribute-conditioned normalizing flow on W (as StyleFlow's), and the attribute regressor that goes with it.

:class:`ConditionalFlow` is an invertible map ``z = f(w; c)`` between a generator's codes w [N, w_dim] and a unit
Gaussian, conditioned on a face's attributes c [N, C] (in the scorers' own units: years, degrees, ratios):

1. **whitening**: ``x = (w − mean) · V / √λ`` with the PCA of the training codes (fixed, exactly invertible);
2. **conditional shift**: ``h = x − c̃ · B`` with c̃ the standardised attributes; B starts as the least-squares fit
   of x on c̃, so an untrained flow already is the linear-Gaussian model of w given c (a conditional edit along
   the multivariate regression directions);
3. **affine couplings** (RealNVP) on the ``coupled`` leading principal components (all of them by default; the
   trailing ones, where a few thousand samples say little, keep the linear model): per block a fixed permutation,
   then the second half is scaled and shifted by an MLP of the first half and c̃ (``tanh``-bounded log-scales,
   zero-initialised: identity at the start).

An edit (:meth:`ConditionalFlow.edit`) maps a face's w to z under its current attributes (estimated from w by
:class:`AttributeRegressor`) and back under the changed ones: the face keeps what the attributes do not explain.
Both networks are small (about 1 MB of float32 at w_dim 256); an edit of one face takes a few milliseconds.
:func:`save_flow` / :func:`load_flow` keep them in one safetensors file with the config and the caller's metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FLOW_FORMAT = "fluidsrv-flow"
FORMAT_VERSION = "1"
WHITEN_EPS = 1e-4  # relative to the largest variance: floors the variances the whitening divides by


@dataclass(frozen=True)
class FlowConfig:
    """Sizes of :class:`ConditionalFlow` and :class:`AttributeRegressor`; JSON round-trip via ``asdict``."""

    w_dim: int
    attributes: tuple[str, ...]  # the conditions, in order (the scorer names)
    blocks: int = 6
    hidden: int = 256
    log_scale_limit: float = 2.0  # |log s| of a coupling never exceeds this
    regressor_hidden: int = 256
    seed: int = 0  # of the fixed permutations
    coupled: int = 0  # leading principal components the couplings act on; 0 = all of w_dim

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(str(name) for name in self.attributes))
        assert self.w_dim >= 2 and self.attributes and self.blocks >= 1 and self.hidden >= 1, f"bad flow config {self}"
        assert 0 <= self.coupled <= self.w_dim and self.coupled != 1, f"coupled must be 0 or in [2, w_dim]: {self}"

    @property
    def coupled_dims(self) -> int:
        """How many leading whitened coordinates the couplings transform."""
        return self.coupled or self.w_dim

    @property
    def conditions(self) -> int:
        """How many attributes condition the flow."""
        return len(self.attributes)


@dataclass(frozen=True)
class FlowSlider:
    """One slider of a flow file (its ``sliders`` metadata): which attribute it changes and in what units."""

    name: str  # the direction name, "flow:<attribute>"
    score: str  # the attribute it changes (one of the flow's conditions)
    label: str
    group: str
    unit: str
    minimum: float  # the slider's range [minimum, maximum] in ``unit``: what the calibration reached
    maximum: float
    gain: float  # measured change of the attribute per unit of condition change, around 0 (a summary)
    curve: tuple[tuple[float, float], ...] = ()  # calibration: (condition change, measured change) pairs

    def __post_init__(self) -> None:
        object.__setattr__(self, "curve", tuple((float(a), float(b)) for a, b in self.curve))

    def monotone_curve(self) -> list[tuple[float, float]]:
        """The calibration through (0, 0), sorted, each side made monotone outward from 0 (a plateau stays flat)."""
        negative = sorted((point for point in self.curve if point[0] < 0), reverse=True)
        positive = sorted(point for point in self.curve if point[0] > 0)
        lowest, highest = 0.0, 0.0
        below, above = [], []
        for condition, change in negative:
            lowest = min(lowest, change)
            below.append((condition, lowest))
        for condition, change in positive:
            highest = max(highest, change)
            above.append((condition, highest))
        return [*reversed(below), (0.0, 0.0), *above]

    def condition_change(self, value: float) -> float:
        """The change of the flow's condition that moves the attribute by ``value`` (in ``unit``) as calibrated.

        The monotone calibration curve is inverted piecewise-linearly; beyond its ends the end segments are
        extended (the slider's range stays inside them); without a curve the value is divided by ``gain``.
        """
        if not self.curve:
            return value / self.gain
        points = self.monotone_curve()
        asked, measured = [point[0] for point in points], [point[1] for point in points]
        segment = next((i for i in range(1, len(points) - 1) if value < measured[i]), len(points) - 1)
        low, high = measured[segment - 1], measured[segment]
        if high - low <= 1e-12:
            return asked[segment - 1] if value >= high else asked[segment]  # a plateau: its end nearest 0
        return asked[segment - 1] + (value - low) * (asked[segment] - asked[segment - 1]) / (high - low)


def read_sliders(metadata: dict[str, str]) -> list[FlowSlider]:
    """The sliders recorded in a flow file's metadata (its ``sliders`` JSON list)."""
    return [FlowSlider(**facts) for facts in json.loads(metadata.get("sliders", "[]"))]


class Coupling(nn.Module):
    """One conditional affine coupling: permute, then scale and shift the second half by an MLP of the first and c."""

    permutation: torch.Tensor
    inverse_permutation: torch.Tensor

    def __init__(self, config: FlowConfig, permutation: torch.Tensor) -> None:
        super().__init__()
        self.split = config.coupled_dims // 2
        self.limit = config.log_scale_limit
        rest = config.coupled_dims - self.split
        self.register_buffer("permutation", permutation)  # [coupled_dims]
        self.register_buffer("inverse_permutation", torch.argsort(permutation))  # [coupled_dims]
        self.net = nn.Sequential(
            nn.Linear(self.split + config.conditions, config.hidden),
            nn.SiLU(),
            nn.Linear(config.hidden, config.hidden),
            nn.SiLU(),
            nn.Linear(config.hidden, 2 * rest),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _scale_shift(self, kept: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_scale, shift = self.net(torch.cat([kept, condition], dim=1)).chunk(2, dim=1)
        return self.limit * torch.tanh(raw_scale / self.limit), shift  # [N, rest] each

    def forward(self, h: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, coupled_dims] -> (next h [N, coupled_dims], log|det| [N])."""
        h = h[:, self.permutation]
        kept, moved = h[:, : self.split], h[:, self.split :]
        log_scale, shift = self._scale_shift(kept, condition)
        return torch.cat([kept, moved * log_scale.exp() + shift], dim=1), log_scale.sum(dim=1)

    def inverse(self, h: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The h [N, coupled_dims] that :meth:`forward` maps to ``h``."""
        kept, moved = h[:, : self.split], h[:, self.split :]
        log_scale, shift = self._scale_shift(kept, condition)
        return torch.cat([kept, (moved - shift) * (-log_scale).exp()], dim=1)[:, self.inverse_permutation]


class ConditionalFlow(nn.Module):
    """z = f(w; c): whitening, a conditional shift and affine couplings (see the module docstring)."""

    w_mean: torch.Tensor
    whiten: torch.Tensor
    unwhiten: torch.Tensor
    condition_mean: torch.Tensor
    condition_std: torch.Tensor

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        dim, conditions = config.w_dim, config.conditions
        self.register_buffer("w_mean", torch.zeros(dim))
        self.register_buffer("whiten", torch.eye(dim))  # [w_dim, w_dim]: x = (w − mean) @ whiten
        self.register_buffer("unwhiten", torch.eye(dim))  # [w_dim, w_dim]: w = x @ unwhiten + mean
        self.register_buffer("condition_mean", torch.zeros(conditions))
        self.register_buffer("condition_std", torch.ones(conditions))
        self.shift = nn.Linear(conditions, dim, bias=False)
        nn.init.zeros_(self.shift.weight)
        rng = torch.Generator().manual_seed(config.seed)
        permutations = [torch.randperm(config.coupled_dims, generator=rng) for _ in range(config.blocks)]
        self.blocks = [Coupling(config, permutation) for permutation in permutations]  # typed view of couplings
        self.couplings = nn.ModuleList(self.blocks)

    @torch.no_grad()
    def fit_statistics(self, w: torch.Tensor, conditions: torch.Tensor) -> None:
        """Set the whitening from codes w [N, w_dim], the attribute standardisation and B's least-squares start."""
        w, conditions = w.double(), conditions.double()
        mean = w.mean(dim=0)
        covariance = torch.cov((w - mean).T)  # [w_dim, w_dim]
        variances, vectors = torch.linalg.eigh(covariance)
        variances, vectors = variances.flip(0), vectors.flip(1)  # leading components first
        variances = variances.clamp(min=WHITEN_EPS * float(variances.max()))
        self.w_mean.copy_(mean.float())
        self.whiten.copy_((vectors / variances.sqrt()).float())
        self.unwhiten.copy_((vectors * variances.sqrt()).T.float())
        self.condition_mean.copy_(conditions.mean(dim=0).float())
        self.condition_std.copy_(conditions.std(dim=0).clamp(min=1e-6).float())
        x = (w - mean) @ (vectors / variances.sqrt())  # [N, w_dim]
        standard = (conditions - conditions.mean(dim=0)) / conditions.std(dim=0).clamp(min=1e-6)  # [N, C]
        solution = torch.linalg.lstsq(standard, x).solution  # [C, w_dim]
        self.shift.weight.copy_(solution.T.float())

    def standardise(self, conditions: torch.Tensor) -> torch.Tensor:
        """Attributes [N, C] in the scorers' units -> standardised [N, C]."""
        return (conditions - self.condition_mean) / self.condition_std

    def forward(self, w: torch.Tensor, conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes w [N, w_dim] with attributes [N, C] -> (z [N, w_dim], log|det dz/dx| [N]) (x: the whitened w)."""
        condition = self.standardise(conditions)
        h = (w - self.w_mean) @ self.whiten - self.shift(condition)
        lead, rest = h[:, : self.config.coupled_dims], h[:, self.config.coupled_dims :]
        log_det = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        for coupling in self.blocks:
            lead, step = coupling(lead, condition)
            log_det = log_det + step
        return torch.cat([lead, rest], dim=1), log_det

    def inverse(self, z: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The codes w [N, w_dim] that :meth:`forward` maps to ``z`` [N, w_dim] under ``conditions`` [N, C]."""
        condition = self.standardise(conditions)
        lead, rest = z[:, : self.config.coupled_dims], z[:, self.config.coupled_dims :]
        for coupling in reversed(self.blocks):
            lead = coupling.inverse(lead, condition)
        return (torch.cat([lead, rest], dim=1) + self.shift(condition)) @ self.unwhiten + self.w_mean

    def log_prob(self, w: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """log p(x | c) [N] of the whitened codes (nats; the whitening's constant Jacobian left out)."""
        z, log_det = self(w, conditions)
        return -0.5 * (z.square().sum(dim=1) + z.shape[1] * math.log(2 * math.pi)) + log_det

    def edit(self, w: torch.Tensor, current: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """Codes w [N, w_dim] with attributes ``current`` [N, C] moved to ``current + change`` [N, C].

        A zero change returns ``w`` itself (not its round trip, which differs by float error).
        """
        if not bool(change.any()):
            return w
        z, _ = self(w, current)
        return self.inverse(z, current + change)


class AttributeRegressor(nn.Module):
    """Estimates a face's attributes [N, C] (scorers' units) from its code w [N, w_dim] through the flow's whitening."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.w_dim, config.regressor_hidden),
            nn.SiLU(),
            nn.Linear(config.regressor_hidden, config.conditions),
        )

    def forward(self, w: torch.Tensor, flow: ConditionalFlow) -> torch.Tensor:
        """Attributes [N, C] of codes w [N, w_dim] (the flow supplies the whitening and the attribute scale)."""
        x = (w - flow.w_mean) @ flow.whiten
        return self.net(x) * flow.condition_std + flow.condition_mean


@torch.no_grad()
def edit_faces(
    flow: ConditionalFlow, regressor: AttributeRegressor, w: torch.Tensor, change: torch.Tensor
) -> torch.Tensor:
    """Codes w [N, w_dim] moved by ``change`` [N, C] from the attributes the regressor reads in them."""
    return flow.edit(w, regressor(w, flow), change)


def save_flow(path: str | Path, flow: ConditionalFlow, regressor: AttributeRegressor, metadata: dict[str, str]) -> None:
    """Write the flow and its regressor as safetensors with the config and ``metadata`` (strings)."""
    tensors = {
        f"{prefix}.{key}": (value.float() if value.is_floating_point() else value).detach().cpu().contiguous()
        for prefix, module in (("flow", flow), ("regressor", regressor))
        for key, value in module.state_dict().items()
    }
    extra = dict(metadata)
    extra.update(format=FLOW_FORMAT, version=FORMAT_VERSION, config=json.dumps(asdict(flow.config)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=extra)


def read_flow_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a flow file (raises ValueError when it is not one)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != FLOW_FORMAT:
        raise ValueError(f"{path}: not a {FLOW_FORMAT} file")
    return metadata


def load_flow(path: str | Path) -> tuple[ConditionalFlow, AttributeRegressor, dict[str, str]]:
    """Read a file written by :func:`save_flow`: the flow and regressor (eval mode, CPU) and the metadata."""
    metadata = read_flow_metadata(path)
    facts: dict[str, Any] = json.loads(metadata["config"])
    config = FlowConfig(**{**facts, "attributes": tuple(facts["attributes"])})
    flow, regressor = ConditionalFlow(config), AttributeRegressor(config)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for prefix, module in (("flow.", flow), ("regressor.", regressor)):
        module.load_state_dict({key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)})
        module.eval()
    return flow, regressor, metadata
