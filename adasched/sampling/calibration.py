"""Fit a policy's one knob to a FLOPs budget on calibration seeds, kept apart from the evaluation seeds.

Policies are compared at equal *executed* FLOPs, so a budget means "save this fraction of the FLOPs that
all-heavy would have executed on the same forwards" (``CostMeter.saved_executed``). A policy opts in by
exposing a knob whose value moves that saving up monotonically; ``calibrate`` searches it by sampling with
the real models, because for a dynamic policy the saving depends on what the models predict. Every try
samples all calibration seeds, so the search uses regula falsi (the Illinois variant): it interpolates
within the bracket and needs far fewer tries than bisection where the saving is smooth in the knob.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.generation import generate
from adasched.sampling.policy import Policy, check_budget
from adasched.sampling.spec import SamplingSpec


@runtime_checkable
class Calibratable(Protocol):
    """A policy with a scalar knob; raising it within ``knob_range`` never lowers the FLOPs saved."""

    budget: float | None
    knob_range: tuple[float, float]

    def set_knob(self, value: float) -> None: ...


@dataclass
class Calibration:
    """What calibration found: the knob, the saving it gave on the calibration seeds, and every try."""

    knob: float
    saved_executed: float
    target: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (knob, saving) pairs tried


def executed_saving(policy: Policy, models: Sequence[MDLMDenoiser], seeds: torch.Tensor, spec: SamplingSpec) -> float:
    """The executed FLOPs saving of ``policy`` on one sample per seed."""
    meter = CostMeter([str(i) for i in range(len(models))], [m.config.n_blocks for m in models])
    generate(models, policy, seeds, spec, meter, progress=False)
    return meter.saved_executed()


def calibrate(
    policy: Calibratable,
    models: Sequence[MDLMDenoiser],
    seeds: torch.Tensor,
    spec: SamplingSpec,
    tolerance: float = 0.005,
    max_tries: int = 12,
) -> Calibration:
    """Search ``policy``'s knob until its executed saving is within ``tolerance`` of ``policy.budget``.

    Leaves the policy set to the best knob found; refuses a budget outside what the knob's range can reach.
    """
    if policy.budget is None:
        raise ConfigError(f"policy {getattr(policy, 'name', policy)!r} has no budget to calibrate to")
    target = policy.budget
    check_budget(target)
    if not tolerance > 0:
        raise ConfigError(f"calibration.tolerance={tolerance} is invalid; it must be positive (a fraction of FLOPs)")

    def miss_at(knob: float) -> float:
        """The saving at ``knob`` minus the target (recorded in ``history``)."""
        policy.set_knob(knob)
        saved = executed_saving(policy, models, seeds, spec)
        history.append((knob, saved))
        print(f"  calibration try {len(history)}: knob {knob:.4g} saves {saved:.2%} (target {target:.2%})", flush=True)
        return saved - target

    history: list[tuple[float, float]] = []
    low, high = policy.knob_range
    low_miss, high_miss = miss_at(low), miss_at(high)
    if not (low_miss <= tolerance and high_miss >= -tolerance):
        raise ConfigError(
            f"budget={target} is out of reach for policy {getattr(policy, 'name', '?')}: "
            f"it saves between {low_miss + target:.3f} and {high_miss + target:.3f} of the executed FLOPs"
        )
    kept_side = 0  # Illinois: the end that stayed put on the last try (-1 low, +1 high); kept twice, its miss is halved
    for _ in range(max_tries):
        if min(abs(saved - target) for _, saved in history) <= tolerance:
            break
        span = high_miss - low_miss
        knob = (low + high) / 2 if span <= 0 else low - low_miss * (high - low) / span
        miss = miss_at(knob)
        if miss < 0:
            low, low_miss = knob, miss
            high_miss = high_miss / 2 if kept_side == 1 else high_miss
            kept_side = 1
        else:
            high, high_miss = knob, miss
            low_miss = low_miss / 2 if kept_side == -1 else low_miss
            kept_side = -1
    knob, saved = min(history, key=lambda pair: abs(pair[1] - target))
    policy.set_knob(knob)
    return Calibration(knob=knob, saved_executed=saved, target=target, history=history)


def check_disjoint_seeds(evaluation_seed: int, evaluation_samples: int, calibration_seed: int, calibration_samples: int) -> None:
    """Refuse calibration seeds that overlap the evaluation seeds: a budget met on them would be fitted, not held."""
    evaluation = range(evaluation_seed, evaluation_seed + evaluation_samples)
    calibration = range(calibration_seed, calibration_seed + calibration_samples)
    if evaluation.start < calibration.stop and calibration.start < evaluation.stop:
        raise ConfigError(
            f"calibration.seed={calibration_seed} (x{calibration_samples}) overlaps the evaluation seeds "
            f"{evaluation.start}..{evaluation.stop - 1}; pick seeds outside them"
        )
