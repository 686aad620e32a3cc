"""Calibration meets a FLOPs budget on its own seeds, and the budget holds on held-out seeds."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from adasched.errors import ConfigError
from adasched.sampling import calibration
from adasched.sampling.calibration import (
    calibrate,
    check_disjoint_seeds,
    executed_saving,
)
from adasched.sampling.spec import SamplingSpec
from policies import make_policy
from tests.helpers import family

STEPS, LENGTH = 50, 16
SPEC = SamplingSpec(STEPS, LENGTH, batch_size=16)
CALIBRATION_SEEDS = 1000 + torch.arange(16)
HELD_OUT_TOLERANCE = 0.02  # executed saving on unseen seeds vs the target


def test_sandwich_is_calibrated_to_a_budget_that_holds_on_held_out_seeds() -> None:
    models = family()
    policy = make_policy("static_sandwich", budget=0.3)
    found = calibrate(policy, models, CALIBRATION_SEEDS, SPEC, tolerance=0.01)
    assert abs(found.saved_executed - 0.3) <= 0.01 and policy.light_fraction == found.knob
    held_out = executed_saving(policy, models, torch.arange(32), SPEC)
    assert abs(held_out - 0.3) <= HELD_OUT_TOLERANCE


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.2, 1.5])
def test_a_budget_outside_the_unit_interval_fails_by_name(budget: float) -> None:
    with pytest.raises(ConfigError, match=f"budget={budget} is invalid"):
        make_policy("static_sandwich", budget=budget)


def test_an_unreachable_budget_and_overlapping_seeds_are_refused() -> None:
    models = family((3, 2))  # the light model saves at most 1/3
    with pytest.raises(ConfigError, match="out of reach"):
        calibrate(make_policy("static_sandwich", budget=0.6), models, CALIBRATION_SEEDS[:4], SPEC)
    with pytest.raises(ConfigError, match="overlaps the evaluation seeds"):
        check_disjoint_seeds(0, 64, 50, 16)
    check_disjoint_seeds(0, 64, 64, 16)


def test_a_non_positive_tolerance_fails_by_name() -> None:
    with pytest.raises(ConfigError, match="calibration.tolerance=0"):
        calibrate(make_policy("static_sandwich", budget=0.3), family(), CALIBRATION_SEEDS[:4], SPEC, tolerance=0)


class Knob:
    """A calibratable stand-in whose saving is a known function of its knob (no sampling)."""

    def __init__(self, budget: float, knob_range: tuple[float, float]) -> None:
        self.budget, self.knob_range, self.value = budget, knob_range, knob_range[0]

    def set_knob(self, value: float) -> None:
        self.value = value


@pytest.mark.parametrize(
    ("curve", "budget"),
    [
        (lambda k: 0.66 / (1 + math.exp(-(k - 6.0))), 0.17),  # a smooth sigmoid, like the entropy threshold's
        (lambda k: 0.66 * k**3 / 1000, 0.33),  # convex: plain false position stalls on one end here
        (lambda k: 0.05 * math.floor(k), 0.25),  # steps: only bracketing, no interpolation, can land on it
    ],
)
def test_the_search_meets_the_target_in_fewer_tries_than_bisection(
    monkeypatch: pytest.MonkeyPatch, curve: Callable[[float], float], budget: float
) -> None:
    policy = Knob(budget, (0.0, 10.0))
    monkeypatch.setattr(calibration, "executed_saving", lambda policy, *args: curve(policy.value))
    found = calibrate(policy, [], CALIBRATION_SEEDS, SPEC, tolerance=0.002)
    assert abs(found.saved_executed - budget) <= 0.002 and policy.value == found.knob
    assert len(found.history) <= 8  # bisection needs about 2 + log2(10 * 0.66 / 0.002) = 14 tries here
