"""Train a generator's attribute-conditioned flow (the ``flow`` direction source) and calibrate its slider units.

The recipe (``fluidsrv directions compute --source flow``; the embedded generator's flow ships in
``weights/flow-128.safetensors``):

1. **Sample and score** ``samples`` codes w (truncated toward w_avg) with the attribute scorers (``classifier``:
   age, gender; ``geometry``: smile, mouth and eyes open, yaw, pitch) and the colour / lighting measures of
   :func:`~fluidsrv.training.named_directions.colour_scores`; faces whose landmarks failed are dropped.
2. **Flow**: :class:`~fluidsrv.models.flow.ConditionalFlow` on (w, every score) by maximum likelihood (Adam,
   a little noise on the attributes so the conditioning is smooth), keeping the state with the best likelihood on
   held-out codes (the untrained flow is already the linear-Gaussian model, so training can only improve on it).
3. **Regressor**: :class:`~fluidsrv.models.flow.AttributeRegressor` (w -> attributes) by least squares, with the
   same held-out check; an edit starts from its estimate of the face's current attributes.
4. **Calibration**: on fresh probe faces, each slider's edits of ±0.5, ±1.5 and ±3 times its target change of the
   condition are rendered and scored; the plugin inverts this response curve (piecewise linear), so a slider
   value reads in the scorer's units ("+10" on Age is ten years as the scorer measures them), and the measured
   change per unit around 0 is recorded as the slider's ``gain``.

Sliders are made for the named attributes (:data:`~fluidsrv.training.named_directions.NAMED_ATTRIBUTES`) the
scorers measure; the colour scores only condition (an edit holds them fixed).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch

from fluidsrv.fingerprint import generator_sha256
from fluidsrv.models.flow import AttributeRegressor, ConditionalFlow, FlowConfig, FlowSlider, edit_faces
from fluidsrv.stages import Progress, Scorer, StepJob
from fluidsrv.training.named_directions import (
    NAMED_ATTRIBUTES,
    ImageScorer,
    NamedAttribute,
    combine_scorers,
    finite_rows,
    render_ws,
    sample_codes,
    score_codes,
)

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

FLOW_KIND = "flow"
MIN_GAIN = 0.1  # below this measured change per unit of condition change the flow barely moves the attribute
REACH = 0.9  # a slider's range ends at this share of the largest change the calibration measured on each side
CALIBRATION_FACTORS = (-3.0, -1.5, -0.5, 0.5, 1.5, 3.0)  # condition changes calibrated, in slider targets
# (the attribute moves by a half to a third of the condition change on generator-128: w explains it only partly)


@dataclass(frozen=True)
class FlowFitConfig:
    """How many faces to sample and how long to train; the flow's sizes."""

    samples: int = 5_000
    probes: int = 64  # fresh faces for the unit calibration
    seed: int = 0
    truncation: float = 0.7
    steps: int = 1_500  # the held-out best is kept (on generator-128: step 400)
    batch_size: int = 256
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    condition_noise: float = 0.05  # std of the noise on the standardised attributes while training
    validation: float = 0.1  # held-out share of the codes
    regressor_steps: int = 1_500
    blocks: int = 6
    hidden: int = 128
    coupled: int = 64  # leading principal components the couplings act on (0 = all)
    evaluate_every: int = 100


def _split(count: int, validation: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled train and held-out indices of ``count`` samples."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(validation * count))
    return order[held:], order[:held]


def train_flow(
    w: torch.Tensor, conditions: torch.Tensor, config: FlowConfig, fit: FlowFitConfig
) -> StepJob[tuple[ConditionalFlow, dict[str, float]]]:
    """Step-wise: fit a flow to codes w [N, w_dim] with attributes [N, C]; returns it and its held-out NLLs.

    The NLL is in nats per dimension of the whitened codes; the returned flow is the best on the held-out codes.
    """
    train, held = _split(len(w), fit.validation, fit.seed)
    flow = ConditionalFlow(config)
    flow.fit_statistics(w[train], conditions[train])
    optimiser = torch.optim.AdamW(flow.parameters(), lr=fit.learning_rate, weight_decay=fit.weight_decay)
    rng = torch.Generator().manual_seed(fit.seed + 1)

    def held_out_nll() -> float:
        with torch.no_grad():
            return float(-flow.log_prob(w[held], conditions[held]).mean()) / config.w_dim

    start = best = held_out_nll()
    best_state, best_step = copy.deepcopy(flow.state_dict()), 0
    for step in range(1, fit.steps + 1):
        batch = train[torch.randint(len(train), (min(fit.batch_size, len(train)),), generator=rng)]
        noise = torch.randn(len(batch), config.conditions, generator=rng) * fit.condition_noise * flow.condition_std
        loss = -flow.log_prob(w[batch], conditions[batch] + noise).mean() / config.w_dim
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        optimiser.step()
        if step % fit.evaluate_every == 0 or step == fit.steps:
            current = held_out_nll()
            if current < best:
                best, best_state, best_step = current, copy.deepcopy(flow.state_dict()), step
            yield Progress("flow", step, fit.steps, f"step {step}: train NLL {loss.item():.4f}, held-out {current:.4f}")
    flow.load_state_dict(best_state)
    flow.eval()
    return flow, {"held_out_nll_linear": start, "held_out_nll": best, "best_step": float(best_step)}


def train_regressor(
    w: torch.Tensor, conditions: torch.Tensor, flow: ConditionalFlow, fit: FlowFitConfig
) -> tuple[AttributeRegressor, dict[str, float]]:
    """Fit w -> attributes (standardised least squares); returns it and the held-out R² per attribute."""
    train, held = _split(len(w), fit.validation, fit.seed)
    regressor = AttributeRegressor(flow.config)
    optimiser = torch.optim.AdamW(regressor.parameters(), lr=1e-3, weight_decay=1e-3)
    rng = torch.Generator().manual_seed(fit.seed + 2)
    target = flow.standardise(conditions).detach()  # [N, C]

    def held_out_error() -> torch.Tensor:
        with torch.no_grad():
            return (flow.standardise(regressor(w[held], flow)) - target[held]).square().mean(dim=0)  # [C]

    best, best_state = float(held_out_error().mean()), copy.deepcopy(regressor.state_dict())
    for step in range(1, fit.regressor_steps + 1):
        batch = train[torch.randint(len(train), (min(fit.batch_size, len(train)),), generator=rng)]
        loss = (flow.standardise(regressor(w[batch], flow)) - target[batch]).square().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % fit.evaluate_every == 0 or step == fit.regressor_steps:
            error = float(held_out_error().mean())
            if error < best:
                best, best_state = error, copy.deepcopy(regressor.state_dict())
    regressor.load_state_dict(best_state)
    regressor.eval()
    variance = target[held].var(dim=0).clamp(min=1e-12)
    r2 = 1.0 - held_out_error() / variance
    return regressor, {name: float(value) for name, value in zip(flow.config.attributes, r2, strict=True)}


def measure_response(
    generator: Generator,
    flow: ConditionalFlow,
    regressor: AttributeRegressor,
    probes: torch.Tensor,
    baseline: torch.Tensor,
    score: ImageScorer,
    index: int,
    changes: Sequence[float],
) -> list[tuple[float, float]]:
    """(condition change, mean measured change) of attribute ``index`` for each of ``changes`` on codes ``probes``.

    ``baseline`` [N] is the attribute of the unedited probes; faces whose score is not finite are left out.
    """
    name = flow.config.attributes[index]
    curve = []
    for amount in changes:
        change = torch.zeros(len(probes), flow.config.conditions)
        change[:, index] = amount
        moved = edit_faces(flow, regressor, probes, change)  # [N, w_dim]
        difference = score(render_ws(generator, moved[:, None].expand(-1, generator.num_ws, -1)))[name] - baseline
        finite = torch.isfinite(difference)
        curve.append((float(amount), float(difference[finite].mean()) if bool(finite.any()) else float("nan")))
    return curve


def calibrated_slider(attribute: NamedAttribute, curve: Sequence[tuple[float, float]]) -> FlowSlider | None:
    """The slider of ``attribute`` from its response ``curve`` (condition change -> measured change), or None.

    None when a point is not finite or the change per unit around 0 is under MIN_GAIN. The range is the target
    (±``attribute.target``) narrowed to REACH of what the curve reached on each side.
    """
    if not curve or not all(math.isfinite(change) for _, change in curve):
        return None
    inner = sorted(curve, key=lambda point: abs(point[0]))[:2]  # the ±target/2 pair
    (first, first_change), (second, second_change) = sorted(inner)
    gain = (second_change - first_change) / (second - first) if second != first else 0.0
    if gain < MIN_GAIN:
        return None
    draft = FlowSlider(f"flow:{attribute.score}", attribute.score, attribute.label, attribute.group, attribute.unit,
                       -attribute.target, attribute.target, gain, tuple(curve))
    reached = [change for _, change in draft.monotone_curve()]
    minimum = max(-attribute.target, REACH * min(reached))
    maximum = min(attribute.target, REACH * max(reached))
    return replace(draft, minimum=round(minimum, 4), maximum=round(maximum, 4))


def fit_flow(
    generator: Generator,
    scorers: Sequence[Scorer],
    fit: FlowFitConfig | None = None,
    attributes: Sequence[NamedAttribute] = NAMED_ATTRIBUTES,
) -> StepJob[tuple[ConditionalFlow, AttributeRegressor, dict[str, str]]]:
    """Step-wise: sample and score faces, train the flow and the regressor, calibrate the sliders.

    Returns the flow, the regressor and the file metadata (what :func:`fluidsrv.models.flow.save_flow` writes).
    """
    fit = fit or FlowFitConfig()
    score = combine_scorers(scorers)
    w = sample_codes(generator, fit.samples, fit.seed, fit.truncation).cpu()
    scores = yield from score_codes(generator, w, score)
    found: tuple[ConditionalFlow, AttributeRegressor, dict[str, str]]
    found = yield from fit_flow_to_samples(generator, score, w, scores, fit, attributes)
    return found


def fit_flow_to_samples(
    generator: Generator,
    score: ImageScorer,
    w: torch.Tensor,
    scores: dict[str, torch.Tensor],
    fit: FlowFitConfig,
    attributes: Sequence[NamedAttribute] = NAMED_ATTRIBUTES,
) -> StepJob[tuple[ConditionalFlow, AttributeRegressor, dict[str, str]]]:
    """Step-wise: :func:`fit_flow` after the sampling, on codes w [N, w_dim] and their ``scores`` (one [N] each)."""
    keep = finite_rows(scores)
    w, scores = w[keep], {name: values[keep] for name, values in scores.items()}
    names = tuple(scores)
    conditions = torch.stack([scores[name] for name in names], dim=1)  # [N, C]
    config = FlowConfig(w_dim=generator.w_dim, attributes=names, blocks=fit.blocks, hidden=fit.hidden,
                        seed=fit.seed, coupled=min(fit.coupled, generator.w_dim))
    flow, likelihood = yield from train_flow(w, conditions, config, fit)
    regressor, r2 = train_regressor(w, conditions, flow, fit)
    probes = sample_codes(generator, fit.probes, fit.seed + 1, fit.truncation).cpu()
    baseline = score(render_ws(generator, probes[:, None].expand(-1, generator.num_ws, -1)))
    sliders = []
    available = [attribute for attribute in attributes if attribute.score in names]
    for step, attribute in enumerate(available):
        index = names.index(attribute.score)
        changes = [factor * attribute.target for factor in CALIBRATION_FACTORS]
        curve = measure_response(generator, flow, regressor, probes, baseline[attribute.score], score, index, changes)
        slider = calibrated_slider(attribute, curve)
        if slider is None:
            yield Progress("flow", step + 1, len(available), f"{attribute.label}: the flow barely moves it; left out")
            continue
        sliders.append(slider)
        yield Progress("flow", step + 1, len(available), f"{attribute.label}: {slider.gain:.2f} measured per unit "
                       f"asked, range [{slider.minimum:.3g}, {slider.maximum:.3g}] {attribute.unit}")
    metadata = {
        "kind": FLOW_KIND,
        "generator_sha256": generator_sha256(generator),
        "samples": str(len(w)),
        "seed": str(fit.seed),
        "truncation": str(fit.truncation),
        "fit": json.dumps(asdict(fit)),
        "likelihood": json.dumps(likelihood),
        "regressor_r2": json.dumps(r2),
        "sliders": json.dumps([asdict(slider) for slider in sliders]),
    }
    return flow, regressor, metadata
