"""The oracle (analysis only): exact in every sampler, its price spans all-heavy to all-light, it is calibrated to a
budget, it does not lose to the sandwich at equal saving, and runs label it as analysis and refuse its own floor."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adasched.analysis.comparison import (
    find_results,
    load_rows,
    sweep_rows,
    table_rows,
    verdict,
)
from adasched.analysis.evaluation import paired_difference
from adasched.analysis.path_kl import path_kl
from adasched.errors import ConfigError
from adasched.jobs.arms import load_members
from adasched.jobs.benchmark import timed_policies
from adasched.jobs.run import run
from adasched.models import MDLMDenoiser
from adasched.options import check_options
from adasched.sampling.calibration import Recording, calibrate, executed_saving
from adasched.sampling.policy import Policy
from adasched.sampling.policy_check import select_rows
from adasched.sampling.reference import reference_sample, step_sample
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import sample
from policies import make_policy
from tests.helpers import MASK, compose_config, family, meter
from tests.test_run import run_config
from tests.test_sampling import assert_identical_runs

SAMPLERS = (sample, step_sample, reference_sample)


def bound_oracle(models: list[MDLMDenoiser], spec: SamplingSpec, seed_baseline: MDLMDenoiser | None, **kwargs: object) -> Policy:
    oracle = make_policy("oracle", **kwargs)
    oracle.bind(models, spec, seed_baseline)
    return oracle


def spec(num_steps: int = 40, batch_size: int = 5, top_p: float = 1.0) -> SamplingSpec:
    return SamplingSpec(num_steps=num_steps, seq_len=16, batch_size=batch_size, top_p=top_p)


def members_and_seed(num_members: int) -> tuple[list[MDLMDenoiser], MDLMDenoiser]:
    """Float64 members (batching moves no decision) and a seed baseline; a third member, between heavy and light, is
    the heavy without its last block: random blocks of their own would never beat the light one's price."""
    heavy, light, seed = family((3, 1, 1))
    if num_members == 2:
        return [heavy, light], seed
    truncated = copy.deepcopy(heavy)
    truncated.blocks, truncated.config = truncated.blocks[:2], dataclasses.replace(heavy.config, n_blocks=2)
    return [heavy, truncated, light], seed


@pytest.mark.parametrize(
    ("num_members", "kwargs", "top_p", "prefix"),
    [
        (2, {"price": 0.0}, 1.0, 0),  # excess: the light model wins where it departs from the heavy less than the seed baseline
        (2, {"price": 2.0}, 0.8, 4),  # a nucleus: infinite KLs, and their difference
        (3, {"objective": "raw", "price": 2.0}, 1.0, 0),
    ],
)
def test_the_oracle_gives_identical_tokens_in_every_sampler_and_is_charged_only_its_choices(
    num_members: int, kwargs: dict, top_p: float, prefix: int
) -> None:
    members, seed = members_and_seed(num_members)
    sampling = spec(top_p=top_p)
    seeds = torch.arange(12)  # in slots of 5: continuous batching refills finished rows
    prompts = torch.randint(0, MASK, (12, prefix), generator=torch.Generator().manual_seed(3)) if prefix else None
    meters = [meter(members) for _ in SAMPLERS]
    runs = [
        sampler(members, bound_oracle(members, sampling, seed, **kwargs), seeds, sampling, m, prompts=prompts)
        for sampler, m in zip(SAMPLERS, meters)
    ]
    assert_identical_runs(runs)
    actions = runs[0].actions
    assert set(range(len(members))) <= set(actions.unique().tolist())  # every member chosen somewhere: the agreement is not trivial
    # the oracle's own forwards are evaluation: the sampler counted one forward per decision, of the chosen model
    assert meters[0].forwards == [int((actions == m).sum()) for m in range(len(members))]


def test_a_rows_choice_depends_on_its_own_state_alone() -> None:
    """What ``check_policy`` checks of every other policy, on states a bound oracle really saw."""
    members, seed = members_and_seed(3)
    sampling = spec()
    recording = Recording(bound_oracle(members, sampling, seed, price=2.0))
    sample(members, recording, torch.arange(10), sampling, meter(members))
    fresh = bound_oracle(members, sampling, seed, price=2.0)
    for state in recording.states[::5]:
        rows = torch.randperm(state.batch_size, generator=torch.Generator().manual_seed(0))[: max(1, state.batch_size // 2)]
        assert torch.equal(fresh.act(select_rows(state, rows)), recording.policy.act(state)[rows])


@pytest.mark.parametrize("objective", ["raw", "excess"])
def test_the_price_spans_all_heavy_to_all_cheapest(objective: str) -> None:
    members, seed = members_and_seed(3)
    sampling = spec()

    def decisions(price: float) -> set[int]:
        oracle = bound_oracle(members, sampling, seed, objective=objective, price=price, max_price=max(abs(price), 1.0))
        actions = sample(members, oracle, torch.arange(8), sampling, meter(members)).actions
        return set(actions[actions >= 0].tolist())

    if objective == "raw":  # every other member departs from the heavy: at price 0 nothing beats it (an excess may be negative)
        assert decisions(0.0) == {0}
    else:  # so under excess a negative price reaches what price 0 cannot: all-heavy
        assert decisions(-1e6) == {0}
    assert decisions(1e6) == {2}  # the member with the fewest FLOPs


def tiny_members(tiny_family: Path, seed_baseline: str) -> tuple[list[MDLMDenoiser], MDLMDenoiser]:
    members, baseline = load_members(str(tiny_family), ["heavy", "light"], seed_baseline, "float32", torch.device("cpu"))
    assert baseline is not None
    return members, baseline


def test_calibration_meets_a_budget(tiny_family: Path) -> None:
    members, heavy_seed3 = tiny_members(tiny_family, "heavy_seed3")
    sampling = spec(50, batch_size=16)
    oracle = bound_oracle(members, sampling, heavy_seed3, budget=0.25)
    seeds = 1000 + torch.arange(16)
    found = calibrate(oracle, members, seeds, sampling, tolerance=0.01)
    assert abs(found.saved_executed - 0.25) <= 0.01 and oracle.price == found.knob > 0
    assert executed_saving(oracle, members, seeds, sampling) == pytest.approx(found.saved_executed)  # what the knob does, again


@pytest.mark.parametrize("budget", [0.15, 0.3])
def test_at_equal_saving_the_oracles_excess_is_not_above_the_sandwichs(tiny_family: Path, budget: float) -> None:
    """Paired over 96 seeds, judged by heavy_seed1 while the oracle decides against heavy_seed3. Both are calibrated on
    the seeds they are judged on, so they save the same share; by the floor it decides against, the oracle must win."""
    members, heavy_seed3 = tiny_members(tiny_family, "heavy_seed3")
    _, heavy_seed1 = tiny_members(tiny_family, "heavy_seed1")
    sampling, seeds = spec(50, batch_size=16), torch.arange(96)
    excess, saved = {}, {}
    for name, policy in (("oracle", bound_oracle(members, sampling, heavy_seed3, budget=budget)), ("sandwich", make_policy("static_sandwich", budget=budget))):
        calibrate(policy, members, seeds, sampling, tolerance=0.005)
        costs = meter(members)
        out = sample(members, policy, seeds, sampling, costs)
        saved[name] = costs.saved_executed()
        excess[name] = {
            judge: (measured.per_sample - measured.floor_per_sample)
            for judge, measured in (
                (judge, path_kl(members, out.tokens, out.reveal_step, out.actions, seed_baseline=model))
                for judge, model in (("heavy_seed1", heavy_seed1), ("heavy_seed3", heavy_seed3))
            )
        }
    assert saved["oracle"] >= saved["sandwich"] - 0.01  # it saves as much
    judged = paired_difference(excess["oracle"]["heavy_seed1"], excess["sandwich"]["heavy_seed1"])
    assert verdict(*judged) != "worse", f"oracle - sandwich excess {judged[0]:.5f} +- {judged[1]:.5f}"
    own = paired_difference(excess["oracle"]["heavy_seed3"], excess["sandwich"]["heavy_seed3"])
    assert verdict(*own) == "better", f"oracle - sandwich excess over heavy_seed3 {own[0]:.5f} +- {own[1]:.5f}"


def test_a_run_labels_it_analysis_and_refuses_its_own_seed_baseline(
    tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as error:
        run(run_config(tiny_family, tmp_path / "refused", "policy=oracle", "eval.seed_baseline=heavy_seed3"))
    assert str(error.value) == (
        "policy oracle was trained against heavy_seed3; judge it with another seed baseline (eval.seed_baseline=heavy_seed1) or eval.seed_baseline=null"
    )
    with pytest.raises(ConfigError) as error:
        run(run_config(tiny_family, tmp_path / "refused", "policy=oracle", "policy.seed_baseline=heavy_seed9"))
    assert str(error.value).startswith(f"policy.seed_baseline='heavy_seed9' names no denoiser folder in {tiny_family}; choose from: heavy, heavy_seed1")
    assert "sampling precision" not in capsys.readouterr().out and not (tmp_path / "refused").exists()  # nothing loaded
    results = run(run_config(tiny_family, tmp_path / "run", "policy=oracle", "budget=0.2", "calibration.tolerance=0.03"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["analysis_only"] is True and results["analysis_only"] is True
    assert "wall_s" not in saved and "speedup_vs_all_heavy" not in saved and "gen_ppl_paired_diff" in saved
    assert saved["path_kl"]["floor"]["seed_baseline"] == "heavy_seed1" and abs(saved["flops"]["saved_executed"] - 0.2) < 0.1
    printed = capsys.readouterr().out.splitlines()
    assert "sampling wall       analysis (oracle)" in printed and "wall speedup        analysis (oracle)" in printed
    [row] = table_rows(load_rows(find_results([tmp_path / "run"])))
    assert row["wall_s"] == row["speedup"] == "analysis (oracle)"


def test_sweep_rows_report_no_wall_clock_or_speedup_for_it() -> None:
    def record(arm: str, analysis_only: bool) -> dict:
        return {
            "label": f"{arm}@0.2", "arm": arm, "budget": 0.2, "policy": arm, "analysis_only": analysis_only, "seeds": [0, 1, 2],
            "nll": [1.0, 2.0, 3.5], "gen_ppl": {"mean": 5.0, "ci95": 1.0}, "entropy": {"mean": 2.0}, "distinct": {"2": 0.5},
            "flops": {"saved_executed": 0.2, "saved_nominal": 0.2}, **({} if analysis_only else {"wall_s": {"sampling": 3.0}}),
        }

    for reference in ("static_sandwich", "oracle"):
        rows = {row["label"]: row for row in sweep_rows([record("static_sandwich", False), record("oracle", True)], reference)}
        assert rows["oracle@0.2"]["wall_s"] == "analysis (oracle)" and rows["static_sandwich@0.2"]["wall_s"] == 3.0
        paired = rows["oracle@0.2" if reference == "static_sandwich" else "static_sandwich@0.2"]
        assert paired["speedup_vs_reference"] == "analysis (oracle)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "kl"}, "policy.objective='kl' is invalid; choose one of excess, raw"),
        ({"price": -1.0, "objective": "raw"}, r"policy.price=-1.0 is invalid; it must lie in \[0.0, 1000.0\]"),
        ({"price": -1001.0}, r"policy.price=-1001.0 is invalid; it must lie in \[-1000.0, 1000.0\]"),
        ({"max_price": 0.0}, "policy.max_price=0.0 is invalid; it must be positive"),
        ({"seed_baseline": None}, "policy.objective=excess subtracts a seed baseline's increment"),
        ({"budget": 1.5}, "budget=1.5 is invalid"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        make_policy("oracle", **kwargs)
    assert "\n" not in str(error.value)


def test_the_options_table_and_the_benchmark_refuse_it_before_any_work() -> None:
    with pytest.raises(ConfigError, match=r"^policy.price='abc' is invalid; it must be a number$"):
        check_options(compose_config("run", ["policy=oracle", "policy.price=abc"]), compose_config("run", ["policy=oracle"]))
    with pytest.raises(ConfigError, match="policies.oracle: oracle is analysis only, not a sampler to time"):
        timed_policies({"oracle": {}})
    assert make_policy("oracle", objective="raw").trained_against is None  # raw decides on path KL itself: no floor to refuse
    with pytest.raises(RuntimeError, match="bind"):
        make_policy("oracle").act(None)
