"""Calibration meets a FLOPs budget on its own seeds, and the budget holds on held-out seeds."""

from __future__ import annotations

import pytest

from adasched.calibration import calibrate, check_disjoint_seeds, executed_saving
from adasched.errors import ConfigError
from policies import make_policy
from tests.test_sampling import family

STEPS, LENGTH = 50, 16
HELD_OUT_TOLERANCE = 0.02  # executed saving on unseen seeds vs the target


def test_sandwich_is_calibrated_to_a_budget_that_holds_on_held_out_seeds() -> None:
    models = family()
    policy = make_policy("static_sandwich", budget=0.3)
    found = calibrate(policy, models, num_samples=16, batch_size=16, base_seed=1000, num_steps=STEPS, seq_len=LENGTH, tolerance=0.01)
    assert abs(found.saved_executed - 0.3) <= 0.01 and policy.light_fraction == found.knob
    held_out = executed_saving(policy, models, num_samples=32, batch_size=16, base_seed=0, num_steps=STEPS, seq_len=LENGTH)
    assert abs(held_out - 0.3) <= HELD_OUT_TOLERANCE


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.2, 1.5])
def test_a_budget_outside_the_unit_interval_fails_by_name(budget: float) -> None:
    with pytest.raises(ConfigError, match=f"budget={budget} is invalid"):
        make_policy("static_sandwich", budget=budget)


def test_an_unreachable_budget_and_overlapping_seeds_are_refused() -> None:
    models = family((3, 2))  # the light model saves at most 1/3
    with pytest.raises(ConfigError, match="out of reach"):
        calibrate(make_policy("static_sandwich", budget=0.6), models, 4, 4, 1000, STEPS, LENGTH)
    with pytest.raises(ConfigError, match="overlaps the evaluation seeds"):
        check_disjoint_seeds(0, 64, 50, 16)
    check_disjoint_seeds(0, 64, 64, 16)


def test_a_non_positive_tolerance_fails_by_name() -> None:
    with pytest.raises(ConfigError, match="calibration.tolerance=0"):
        calibrate(make_policy("static_sandwich", budget=0.3), family(), 4, 4, 1000, STEPS, LENGTH, tolerance=0)
