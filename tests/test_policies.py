"""Policies: every registered one passes the checker and has a config; static plans are the paper's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from adasched.errors import ConfigError
from adasched.sampling.policy import DenoiseState, Policy
from adasched.sampling.policy_check import check_policy
from policies import make_policy, registered_policies
from policies.static import DEFAULT_LETTERS, Segments
from tests.helpers import CONFIG_DIR, ROOT, compose_config


def plan(name: str, steps: int = 1000, **kwargs: object) -> torch.Tensor:
    policy = make_policy(name, **kwargs)
    policy.reset(num_steps=steps, num_models=3)
    return policy.plan


def test_every_registered_policy_has_a_config_and_passes_the_checker() -> None:
    """A registered policy's config is named after it; more configs may select it with other files (kl_router_excess)."""
    configs = sorted(p.stem for p in (CONFIG_DIR / "policy").glob("*.yaml"))
    assert set(registered_policies()) <= set(configs)
    # a router meets a budget through its knob, which every run with budget= calibrates on real trajectories, not
    # on the checker's random states: the checker takes the price-conditioned router at one price and one router
    # of the per-budget folder at its default bias
    chosen = {"learned_router": ["policy.price=0.0"], "learned_router_per_budget": [f"policy.path={ROOT}/checkpoints/shakespeare/routers/learned_router_per_budget/budget0.17"]}
    for config in configs:
        policy_config = compose_config("run", [f"policy={config}", *chosen.get(config, [])]).policy
        assert policy_config.name in registered_policies()
        if "path" in policy_config and not Path(policy_config.path).exists():  # a router fitted once its inputs exist (kl_router_excess: heavy_seed3)
            with pytest.raises(ConfigError, match=f"no fitted KL router at {policy_config.path}; create it with: python experiments/fit_kl_router.py"):
                make_policy(policy_config.name, path=policy_config.path)
            continue
        policy = instantiate(policy_config)
        assert policy.name == policy_config.name
        if policy.analysis_only:  # the oracle runs the family to decide: tests/test_oracle.py checks it bound to one
            continue
        check_policy(policy, num_models=len(policy.trained_members or ()) or 2)


def test_the_checker_catches_bad_policies() -> None:
    class OutOfRange(Policy):
        name = "out_of_range"

        def act(self, state: DenoiseState) -> torch.Tensor:
            return torch.full((state.batch_size,), 2)

    class Unseeded(Policy):
        name = "unseeded"

        def act(self, state: DenoiseState) -> torch.Tensor:
            return torch.randint(0, 2, (state.batch_size,))

    with pytest.raises(AssertionError, match="out of"):
        check_policy(OutOfRange())
    with pytest.raises(AssertionError, match="different models"):
        check_policy(Unseeded())


def test_the_papers_sandwich_and_quarters() -> None:
    sandwich = plan("static_sandwich", light_fraction=0.25)
    assert sandwich[:125].eq(1).all() and sandwich[125:875].eq(0).all() and sandwich[875:].eq(1).all()
    for quarter in (1, 2, 3, 4):
        light = plan("static_quarter", quarter=quarter, light_fraction=0.25).nonzero().squeeze(1)
        assert light.tolist() == list(range(250 * (quarter - 1), 250 * quarter))
    assert torch.equal(plan("static_segments", spec="L125,H750,L125"), sandwich)
    assert torch.equal(plan("static_segments", spec="L0.125,H0.75,L0.125"), sandwich)


def test_segment_mask_and_multi_model_specs() -> None:
    mask = plan("static_segment_mask", num_segments=10, light_segments=[0, 3])
    assert mask.nonzero().squeeze(1).tolist() == [*range(0, 100), *range(300, 400)]
    three = plan("static_segments", spec="L100,M200,H700", letters={"H": 0, "M": 1, "L": 2})
    assert three[:100].eq(2).all() and three[100:300].eq(1).all() and three[300:].eq(0).all()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("X125,H875", "invalid segment 'X125'"),
        ("L12a,H988", "invalid segment 'L12a'"),
        ("L0.5,H500", "mixes step counts and fractions"),
        ("L0.2,H0.7", "sum to 0.9"),
    ],
)
def test_invalid_segment_specs_name_the_bad_token(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Segments.parse(spec, DEFAULT_LETTERS)


def test_bad_values_and_unknown_names_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="covers 900 steps, not num_steps=1000"):
        plan("static_segments", spec="L100,H800")
    with pytest.raises(ConfigError, match="light_fraction=1.5"):
        make_policy("static_sandwich", light_fraction=1.5)
    with pytest.raises(ConfigError, match="quarter=5"):
        make_policy("static_quarter", quarter=5)
    with pytest.raises(ConfigError, match="unknown policy 'nope'; registered: entropy_router, kl_router, learned_router, mask_fraction_router, oracle, static_heavy"):
        make_policy("nope")


def test_a_quarter_calibrates_its_light_fraction_only_as_far_as_fits_after_its_start() -> None:
    assert make_policy("static_quarter", quarter=1, budget=0.2).knob_range == (0.0, 1.0)
    assert make_policy("static_quarter", quarter=3, budget=0.2).knob_range == (0.0, 0.5)
