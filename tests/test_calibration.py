"""Calibration meets a FLOPs budget on its own seeds in few tries, and the budget holds on held-out seeds."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling import calibration
from adasched.sampling.calibration import (
    calibrate,
    check_disjoint_seeds,
    executed_saving,
    expected_saving,
    run_try,
)
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import sample
from policies import make_policy
from tests.helpers import family, meter

STEPS, LENGTH = 50, 16
SPEC = SamplingSpec(STEPS, LENGTH, batch_size=16)
CALIBRATION_SEEDS = 1000 + torch.arange(16)
HELD_OUT_TOLERANCE = 0.02  # executed saving of a calibrated policy on unseen seeds vs the target


def test_sandwich_is_calibrated_to_a_budget_that_holds_on_held_out_seeds() -> None:
    models = family()
    policy = make_policy("static_sandwich", budget=0.3)
    found = calibrate(policy, models, CALIBRATION_SEEDS, SPEC, tolerance=0.01)
    assert abs(found.saved_executed - 0.3) <= 0.01 and policy.light_fraction == found.knob
    assert len(found.history) <= 2  # its guess, then (if need be) where the exact replay of that try says
    held_out = executed_saving(policy, models, torch.arange(32), SPEC)
    assert abs(held_out - 0.3) <= HELD_OUT_TOLERANCE


def test_the_light_first_schedule_is_calibrated_like_the_sandwich() -> None:
    policy = make_policy("static_quarter", quarter=1, budget=0.3)
    found = calibrate(policy, family(), CALIBRATION_SEEDS, SPEC, tolerance=0.01)
    assert abs(found.saved_executed - 0.3) <= 0.01 and policy.light_fraction == found.knob and len(found.history) <= 2


def test_in_prefix_mode_the_tries_sample_the_prompted_calibration_seeds() -> None:
    """A prompt's positions are revealed from the start, so a knob saves another share on prompted samples:
    the tries must continue the prompts, as evaluation does."""
    models = family()
    prompts = torch.randint(0, models[0].config.mask_token_id, (len(CALIBRATION_SEEDS), LENGTH // 4), generator=torch.Generator().manual_seed(0))
    policy = make_policy("static_sandwich", budget=0.3)
    found = calibrate(policy, models, CALIBRATION_SEEDS, SPEC, tolerance=0.01, prompts=prompts)
    assert abs(found.saved_executed - 0.3) <= 0.01
    assert found.saved_executed == executed_saving(policy, models, CALIBRATION_SEEDS, SPEC, prompts)
    assert found.saved_executed != executed_saving(policy, models, CALIBRATION_SEEDS, SPEC)


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.2, 1.5])
def test_a_budget_outside_the_unit_interval_fails_by_name(budget: float) -> None:
    with pytest.raises(ConfigError, match=f"budget={budget} is invalid"):
        make_policy("static_sandwich", budget=budget)


def test_an_unreachable_budget_and_overlapping_seeds_are_refused() -> None:
    models = family((3, 2))  # the light model saves at most about 1/3
    with pytest.raises(ConfigError, match=r"budget=0.6 is out of reach .* saves at most 0\.3") as error:
        calibrate(make_policy("static_sandwich", budget=0.6), models, CALIBRATION_SEEDS[:4], SPEC)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="overlaps the evaluation seeds"):
        check_disjoint_seeds(0, 64, 50, 16)
    check_disjoint_seeds(0, 64, 64, 16)


def test_a_non_positive_tolerance_fails_by_name() -> None:
    with pytest.raises(ConfigError, match="calibration.tolerance=0"):
        calibrate(make_policy("static_sandwich", budget=0.3), family(), CALIBRATION_SEEDS[:4], SPEC, tolerance=0)


def test_the_sandwich_guesses_the_light_fraction_that_meets_a_budget() -> None:
    models, seeds = family(), torch.arange(256)  # over 3000 reveal steps: the saving's noise is about 0.004
    all_light = executed_saving(make_policy("static_light"), models, seeds, SPEC)
    assert abs(expected_saving(models, SPEC, 1) - all_light) <= 0.005  # the expectation over reveal plans
    policy = make_policy("static_sandwich", budget=0.25)
    guess = policy.initial_knob(0.25, models, SPEC)
    assert guess == pytest.approx(0.25 / expected_saving(models, SPEC, 1))
    policy.set_knob(guess)
    assert abs(executed_saving(policy, models, seeds, SPEC) - 0.25) <= 0.015
    assert make_policy("static_sandwich").initial_knob(0.9, models, SPEC) > 1  # beyond all light: out of reach


@pytest.mark.parametrize(
    ("name", "kwargs", "knobs"),
    [
        ("static_sandwich", {}, (0.2, 0.7)),
        ("mask_fraction_router", {"skew": 0.3}, (0.2, 0.7)),
        ("entropy_router", {"mode": "probe"}, (1.3, 1.3)),  # its own knob: the probe's price is replayed right
    ],
)
def test_a_replay_gives_the_saving_a_try_at_another_knob_measures(name: str, kwargs: dict, knobs: tuple[float, float]) -> None:
    """Exact where a policy's states do not depend on its earlier choices (and at a try's own knob always)."""
    models = family()
    policy = make_policy(name, **kwargs)
    policy.set_knob(knobs[0])
    _, replay = run_try(policy, models, CALIBRATION_SEEDS[:8], SPEC)
    policy.set_knob(knobs[1])
    measured, _ = run_try(policy, models, CALIBRATION_SEEDS[:8], SPEC)
    assert replay is not None and replay.saving(knobs[1]) == pytest.approx(measured, abs=1e-9)


@pytest.mark.parametrize(("name", "kwargs"), [("static_sandwich", {"light_fraction": 0.3}), ("mask_fraction_router", {"light_mass": 0.4, "skew": 0.3})])
def test_a_policy_that_reads_no_model_output_is_tried_without_forwards_and_saves_the_same(
    monkeypatch: pytest.MonkeyPatch, name: str, kwargs: dict
) -> None:
    models, policy = family(), make_policy(name, **kwargs)
    sampled = meter(models)
    sample(models, policy, CALIBRATION_SEEDS, SPEC, sampled)

    def no_forward(*args: object) -> None:
        raise AssertionError("a try of a policy that reads no model output ran a model")

    monkeypatch.setattr(MDLMDenoiser, "hidden_states", no_forward)
    assert executed_saving(policy, models, CALIBRATION_SEEDS, SPEC) == sampled.saved_executed()


class Knob:
    """A calibratable stand-in whose saving is a known function of its knob (no sampling)."""

    def __init__(self, budget: float, knob_range: tuple[float, float]) -> None:
        self.budget, self.knob_range, self.value = budget, knob_range, knob_range[0]

    def set_knob(self, value: float) -> None:
        self.value = value


class Guessing(Knob):
    def __init__(self, budget: float, knob_range: tuple[float, float], guess: float) -> None:
        super().__init__(budget, knob_range)
        self.guess = guess

    def initial_knob(self, budget: float, models: object, spec: object) -> float:
        return self.guess


class CurveReplay:
    """A try's replay on a synthetic curve: ``distortion`` of the knob's move from the tried knob mimics feedback
    (above 1: the replay overstates how far a move goes, as when light choices raise later entropies)."""

    def __init__(self, curve: Callable[[float], float], tried: float, distortion: float) -> None:
        self.curve, self.tried, self.distortion = curve, tried, distortion

    def saving(self, knob: float) -> float:
        return self.curve(self.tried + (knob - self.tried) * self.distortion)


def synthetic_tries(monkeypatch: pytest.MonkeyPatch, curve: Callable[[float], float], distortion: float | None) -> None:
    """Tries read ``curve`` at the knob instead of sampling; with a ``distortion`` each also brings a replay."""

    def fake(policy: Knob, *args: object) -> tuple[float, CurveReplay | None]:
        return curve(policy.value), None if distortion is None else CurveReplay(curve, policy.value, distortion)

    monkeypatch.setattr(calibration, "run_try", fake)


SMOOTH = lambda k: 0.66 / (1 + math.exp(-(k - 6.0)))  # noqa: E731  a sigmoid, like the entropy threshold's
CONVEX = lambda k: 0.66 * k**3 / 1000  # noqa: E731  plain false position stalls on one end here
STEPS_OF_5 = lambda k: 0.05 * math.floor(k)  # noqa: E731  a static schedule's discrete savings, coarsened


@pytest.mark.parametrize(
    ("curve", "budget", "distortion", "most_tries"),
    [
        (SMOOTH, 0.17, None, 6),  # no replay: range end, then Illinois
        (CONVEX, 0.33, None, 8),
        (STEPS_OF_5, 0.35, None, 8),  # only bracketing, no interpolation, can land on a flat step
        (SMOOTH, 0.17, 1.0, 2),  # an exact replay: its guess, then the knob the replay solves for
        (CONVEX, 0.33, 1.0, 2),
        (SMOOTH, 0.17, 1.6, 4),  # replays that overstate a move by 60% (strong feedback)
        (CONVEX, 0.33, 0.6, 5),  # or understate it
    ],
)
def test_the_search_meets_the_target_in_few_tries(
    monkeypatch: pytest.MonkeyPatch, curve: Callable[[float], float], budget: float, distortion: float | None, most_tries: int
) -> None:
    synthetic_tries(monkeypatch, curve, distortion)
    policy = Knob(budget, (0.0, 10.0))
    found = calibrate(policy, [], CALIBRATION_SEEDS, SPEC, tolerance=0.002)
    assert abs(found.saved_executed - budget) <= 0.002 and policy.value == found.knob
    assert len(found.history) <= most_tries  # bisection needs about 2 + log2(10 * 0.66 / 0.002) = 14 tries here
    assert [t.knob for t in found.history][:1] == [5.0]  # no guess: the middle of the range, not its ends


def test_a_good_guess_needs_one_try_and_no_range_end(monkeypatch: pytest.MonkeyPatch) -> None:
    synthetic_tries(monkeypatch, SMOOTH, None)
    found = calibrate(Guessing(0.17, (0.0, 10.0), guess=5.0), [], CALIBRATION_SEEDS, SPEC, tolerance=0.01)
    assert [t.knob for t in found.history] == [5.0]


def test_a_target_in_a_jump_of_a_step_like_curve_ends_at_the_nearest_saving(monkeypatch: pytest.MonkeyPatch) -> None:
    synthetic_tries(monkeypatch, STEPS_OF_5, 1.0)
    found = calibrate(Knob(0.27, (0.0, 10.0)), [], CALIBRATION_SEEDS, SPEC, tolerance=0.005, max_tries=12)
    assert found.saved_executed == pytest.approx(0.25) and len(found.history) <= 3


def test_a_flat_curve_is_refused_after_the_range_end_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    synthetic_tries(monkeypatch, lambda k: 0.2, 1.0)
    with pytest.raises(ConfigError, match=r"budget=0.1 is out of reach .* saves at least 0\.200 .* \(at 0,") as error:
        calibrate(Knob(0.1, (0.0, 10.0)), [], CALIBRATION_SEEDS, SPEC)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("distortion", "tries"), [(None, 2), (1.0, 2)])
def test_an_unreachable_budget_takes_the_guess_and_one_range_end(monkeypatch: pytest.MonkeyPatch, distortion: float | None, tries: int) -> None:
    synthetic_tries(monkeypatch, SMOOTH, distortion)
    calls: list[float] = []
    original = calibration.run_try

    def counted(policy: Knob, *args: object) -> tuple[float, object]:
        calls.append(policy.value)
        return original(policy, *args)

    monkeypatch.setattr(calibration, "run_try", counted)
    with pytest.raises(ConfigError, match=r"budget=0.7 is out of reach .* saves at most 0\.648"):
        calibrate(Knob(0.7, (0.0, 10.0)), [], CALIBRATION_SEEDS, SPEC)
    assert calls == [5.0, 10.0][:tries]
