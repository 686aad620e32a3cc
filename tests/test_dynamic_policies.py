"""Per-row dynamic policies: the mask-fraction sandwich and the entropy router (probe and lagged)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adasched.errors import ConfigError
from adasched.sampling.calibration import calibrate, executed_saving
from adasched.sampling.policy import DenoiseState, Policy
from adasched.sampling.policy_check import check_policy, synthetic_states
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import sample
from policies import make_policy
from tests.helpers import family, meter

STEPS, LENGTH = 20, 16
SPEC = SamplingSpec(num_steps=STEPS, seq_len=LENGTH, batch_size=16)
HELD_OUT_TOLERANCE = 0.03  # executed saving of a calibrated entropy router on unseen seeds vs the target
ROUTERS = [
    ("entropy_router", {"mode": "probe", "threshold": 1.3}),  # tiny models' entropies lie around 1-2 nats
    ("entropy_router", {"mode": "lagged", "threshold": 1.3}),
    ("mask_fraction_router", {"light_mass": 0.4, "skew": 0.3}),
]


class Replay(Policy):
    """Replays recorded actions (num_steps, N) of samples with seeds 0..N-1, with no probe: what the same
    decisions cost on their own."""

    name = "replay"

    def __init__(self, actions: torch.Tensor) -> None:
        self.actions = actions

    def act(self, state: DenoiseState) -> torch.Tensor:
        return self.actions[state.step, state.seeds]


@pytest.mark.parametrize(("name", "kwargs"), [*ROUTERS, ("entropy_router", {"mode": "lagged", "budget": 0.3})])
def test_the_routers_pass_the_checker(name: str, kwargs: dict) -> None:
    check_policy(make_policy(name, **kwargs))


def test_the_entropy_modes_ask_for_their_own_features() -> None:
    probe, lagged = make_policy("entropy_router", mode="probe"), make_policy("entropy_router", mode="lagged")
    assert probe.features == {"probe_entropy"} and probe.probe_model == 1
    assert lagged.features == {"entropy"} and lagged.probe_model is None


def probe_and_replay(threshold: float) -> tuple:
    """A probe-mode run and the replay of its decisions without the probe, on the same seeds."""
    models = family()
    seeds = torch.arange(16)
    probe_meter, replay_meter = meter(models), meter(models)
    probed = sample(models, make_policy("entropy_router", mode="probe", threshold=threshold), seeds, SPEC, probe_meter)
    replayed = sample(models, Replay(probed.actions), seeds, SPEC, replay_meter)
    assert torch.equal(probed.tokens, replayed.tokens)  # the probe's logits are the light forward's
    return probe_meter, replay_meter


def test_probe_mode_charges_the_probe_and_the_escalation() -> None:
    probe, replay = probe_and_replay(threshold=1.3)
    assert probe.forwards[0] > 0 and probe.flops[0] == replay.flops[0]
    assert probe.forwards[1] == replay.forwards[1] + probe.forwards[0]  # every escalated row was probed first
    assert sum(probe.flops) > sum(replay.flops)


def test_probe_mode_saves_less_than_its_decisions_alone() -> None:
    probe, replay = probe_and_replay(threshold=1.3)
    assert probe.baseline_flops == replay.baseline_flops  # the probe is a cost, not part of the baseline
    assert probe.saved_executed() < replay.saved_executed()


def test_light_mass_zero_is_all_heavy_and_one_all_light() -> None:
    models = family()
    for light_mass, model in ((0.0, 0), (1.0, 1)):
        out = sample(models, make_policy("mask_fraction_router", light_mass=light_mass), torch.arange(8), SPEC, meter(models))
        assert out.actions[out.actions >= 0].eq(model).all()


def test_lagged_mode_runs_heavy_until_a_row_has_an_entropy() -> None:
    models = family()
    out = sample(models, make_policy("entropy_router", mode="lagged", threshold=12.0), torch.arange(8), SPEC, meter(models))
    for row in range(8):
        reveal_steps = out.reveal_step[row].unique()
        assert out.actions[reveal_steps[0], row] == 0 and out.actions[reveal_steps[1:], row].eq(1).all()


@pytest.mark.parametrize(("skew", "expected"), [(0.5, [1, 1, 0, 1, 1]), (0.0, [0, 0, 0, 1, 1]), (1.0, [1, 1, 0, 0, 0])])
def test_each_row_follows_its_own_mask_fraction(skew: float, expected: list[int]) -> None:
    policy = make_policy("mask_fraction_router", light_mass=0.25, skew=skew)  # band [0.25 (1 - skew), 1 - 0.25 skew]
    state = dataclasses.replace(
        synthetic_states(5, 1, 2, seed=0)[0], mask_fraction=torch.tensor([1.0, 0.95, 0.5, 0.1, 0.0], dtype=torch.float64)
    )
    policy.reset(1, 2)
    assert policy.act(state).tolist() == expected


def test_rows_at_one_step_get_different_models() -> None:
    models = family()
    out = sample(models, make_policy("mask_fraction_router", light_mass=0.5), torch.arange(16), SPEC, meter(models))
    decided = out.actions >= 0
    assert ((out.actions == 0) & decided).any(1).logical_and(((out.actions == 1) & decided).any(1)).any()


def test_the_probe_router_is_calibrated_to_a_budget_that_holds_on_held_out_seeds() -> None:
    models = family()
    policy = make_policy("entropy_router", mode="probe", budget=0.5)
    found = calibrate(policy, models, 1000 + torch.arange(16), SPEC, tolerance=0.01)
    assert abs(found.saved_executed - 0.5) <= 0.01 and policy.threshold == found.knob
    held_out = executed_saving(policy, models, torch.arange(32), SPEC)
    assert abs(held_out - 0.5) <= HELD_OUT_TOLERANCE


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("entropy_router", {"mode": "fast"}, "policy.mode='fast' is invalid; choose one of probe, lagged"),
        ("entropy_router", {"threshold": -1.0}, r"policy.threshold=-1.0 is invalid"),
        ("entropy_router", {"budget": 1.5}, "budget=1.5 is invalid"),
        ("mask_fraction_router", {"budget": 0.0}, "budget=0.0 is invalid"),
        ("mask_fraction_router", {"light_mass": 1.5}, "policy.light_mass=1.5 is invalid"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_value(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        make_policy(name, **kwargs)
    assert "\n" not in str(error.value)
