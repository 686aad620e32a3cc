"""What the oracle knows that routers don't: each candidate feature's value on a hand-built state, the features reach
routers in every sampler without changing the shipped routers' columns, the held-out split is by trajectory, and the
job runs end to end on the tiny family (or refuses a bad option on one line before any model loads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file

from adasched.analysis.decision_records import DecisionRecords
from adasched.analysis.oracle_features import (
    PREVIOUS_INCREMENT,
    held_out_trajectories,
    previous_increment,
)
from adasched.errors import ConfigError
from adasched.jobs.oracle_features import oracle_features
from adasched.sampling.features import (
    EXTRA_FEATURES,
    extra_features,
    feature_names,
    named_features,
)
from adasched.sampling.policy import (
    ENTROPY,
    MASKED,
    PROBE_ENTROPY,
    PROBE_MARGIN,
    PROBE_MAX_PROB,
    REVEALING,
    DenoiseState,
)
from adasched.sampling.policy_check import check_policy
from adasched.sampling.spec import SamplingSpec
from policies import kl_router, make_policy
from tests.helpers import SHIPPED, compose_config, family, meter
from tests.test_options import cli
from tests.test_oracle import SAMPLERS
from tests.test_sampling import assert_identical_runs

# Two rows of six positions: "x" revealed in z_t, "r" revealing now, "." masked and not revealing.
LAYOUT = ["x.r.rx", "rr...."]


def hand_built_state() -> DenoiseState:
    masked = torch.tensor([[c != "x" for c in row] for row in LAYOUT])
    revealing = torch.tensor([[c == "r" for c in row] for row in LAYOUT])
    return DenoiseState(
        num_steps=10, step=torch.tensor([4, 0]), t=torch.tensor([0.6, 1.0], dtype=torch.float64),
        mask_fraction=masked.double().mean(1), previous_mask_fraction=torch.tensor([0.8, 1.0], dtype=torch.float64),
        reveal_count=revealing.sum(1), flops=torch.tensor([3.0, 0.0], dtype=torch.float64), all_heavy_flops=torch.tensor([4.0, 0.0], dtype=torch.float64),
        model_flops=(4.0, 2.0), last_action=torch.tensor([0, -1]), last_entropy=torch.tensor([2.5, float("nan")], dtype=torch.float64),
        seeds=torch.tensor([7, 8]),
        extras={
            PROBE_ENTROPY: torch.tensor([1.2, 3.4], dtype=torch.float64), PROBE_MAX_PROB: torch.tensor([0.7, 0.2], dtype=torch.float64),
            PROBE_MARGIN: torch.tensor([0.5, 0.05], dtype=torch.float64), REVEALING: revealing, MASKED: masked,
        },
    )


EXPECTED = {
    "probe_entropy": [1.2, 3.4],
    "probe_max_prob": [0.7, 0.2],
    "probe_margin": [0.5, 0.05],
    "last_heavy_entropy": [2.5, 0.0],  # row 1 has not run a model yet
    # row 0 reveals at 2 and 4: left neighbours 1 (masked) and 3 (masked); right neighbours 3 (masked) and 5 (revealed)
    "left_revealed": [0.0, 0.0],  # row 1: position 0 has no left neighbour, position 1's is revealing (still masked)
    "right_revealed": [0.5, 0.0],
    "nearest_revealed_distance": [(2 + 1) / 2 / 6, 1.0],  # row 1: nothing revealed yet
    "relative_position": [(2 + 4) / 2 / 5, (0 + 1) / 2 / 5],
}


def test_every_extra_feature_has_a_hand_computed_case() -> None:
    assert set(EXPECTED) == set(EXTRA_FEATURES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_extra_feature_on_a_hand_built_state(name: str) -> None:
    values = extra_features(hand_built_state(), [name])
    assert values.shape == (2, 1) and values.dtype == torch.float32
    assert values[:, 0].tolist() == pytest.approx(EXPECTED[name], abs=1e-6)


def test_extra_features_fail_by_name_where_the_sampler_did_not_compute_their_needs() -> None:
    state = hand_built_state()
    state.extras.pop(MASKED)
    with pytest.raises(ValueError, match="feature 'left_revealed' needs the sampler to compute 'revealing'"):
        extra_features(state, ["left_revealed"])


def test_the_router_columns_stay_those_the_shipped_routers_were_fitted_on() -> None:
    assert feature_names(2) == [
        "t", "mask_fraction", "mask_fraction_drop", "log1p_reveal_count", "saved_so_far", "last_entropy", "has_entropy", "last_model_0", "last_model_1",
    ]
    state = hand_built_state()
    picked = named_features(state, 2, ["t", "probe_margin", "saved_so_far"])
    assert torch.allclose(picked, torch.tensor([[0.6, 0.5, 0.25], [1.0, 0.05, 0.0]]))
    shipped = make_policy("kl_router", path=str(SHIPPED / "routers" / "kl_router"))  # reads no extra feature: asks for no probe
    assert shipped.features == frozenset({ENTROPY}) and shipped.probe_model is None and shipped.inputs == kl_router.INPUTS


@pytest.fixture(scope="module")
def extra_router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A logistic oracle-objective router reading every extra feature and two router columns (random targets)."""
    inputs = ["t", "mask_fraction", *EXTRA_FEATURES]
    generator = torch.Generator().manual_seed(0)
    features, keeps_heavy = torch.rand(200, len(inputs), generator=generator), (torch.rand(200, generator=generator) < 0.5).double()
    model, metadata = kl_router.fit((features, keeps_heavy), objective="oracle", depth=0, steps=50, lr=0.05)
    folder = tmp_path_factory.mktemp("extra_router")
    kl_router.save(model, folder, 2, metadata, "heavy_seed3", inputs)
    return folder


def test_a_router_on_extra_features_asks_for_their_needs_and_passes_the_checker(extra_router: Path) -> None:
    policy = make_policy("kl_router", path=str(extra_router), light=1)
    assert policy.features == frozenset({ENTROPY, PROBE_ENTROPY, REVEALING}) and policy.probe_model == 1
    assert policy.model.objective == "oracle" and policy.trained_against == "heavy_seed3"
    check_policy(policy, num_models=2)


def test_a_router_on_extra_features_gives_identical_tokens_in_every_sampler(extra_router: Path) -> None:
    members = family((3, 1))
    spec = SamplingSpec(num_steps=30, seq_len=16, batch_size=5)
    policy = make_policy("kl_router", path=str(extra_router), threshold=0.0)
    runs = [sampler(members, policy, torch.arange(12), spec, meter(members)) for sampler in SAMPLERS]
    assert_identical_runs(runs)
    assert {0, 1} <= set(runs[0].actions.unique().tolist())  # both members chosen: the agreement is not trivial


def test_a_router_on_unknown_features_is_a_one_line_error(extra_router: Path, tmp_path: Path) -> None:
    model, info = kl_router.load(extra_router)
    kl_router.save(model, tmp_path, 2, info["fit"], None, ["t", "mask_fraction", "sparkle", *list(EXTRA_FEATURES)[1:]])
    with pytest.raises(ConfigError, match="fitted on other features \\(unknown router feature 'sparkle'; known: t, ") as error:
        make_policy("kl_router", path=str(tmp_path))
    assert "\n" not in str(error.value)


def records(seeds: list[int], steps: list[int], light_increments: list[float]) -> DecisionRecords:
    count = len(seeds)
    return DecisionRecords(
        seed=torch.tensor(seeds), step=torch.tensor(steps), choice=torch.zeros(count, dtype=torch.int64),
        increments=torch.tensor([[0.0, value] for value in light_increments], dtype=torch.float64),
        features=torch.zeros(count, len(feature_names(2))), extras=torch.zeros(count, 0),
    )


def test_the_oracle_only_column_is_the_light_increment_at_the_rows_previous_decision() -> None:
    interleaved = records([5, 6, 5, 6, 5], [0, 0, 3, 2, 7], [1.0, 2.0, math.inf, 4.0, 5.0])
    assert previous_increment(interleaved, 1).tolist() == [0.0, 0.0, 1.0, 2.0, 5.0]  # inf: as the largest finite increment


def test_the_held_out_split_is_by_trajectory() -> None:
    seed = np.repeat(np.arange(8), 5)
    test = held_out_trajectories(seed, 0.25)
    assert set(seed[test]) == {6, 7} and not set(seed[test]) & set(seed[~test])
    with pytest.raises(ConfigError, match="validation_fraction=0.05 holds out 0 of 8 recorded trajectories"):
        held_out_trajectories(seed, 0.05)


def job_config(family_dir: Path, run_dir: Path, *overrides: str) -> DictConfig:
    """A job that runs in seconds on the tiny family: 6 recorded trajectories and 6 evaluation seeds of 30 steps."""
    cfg = compose_config("oracle_features", [
        f"family.dir={family_dir}", "num_samples=6", "eval_samples=6", "sampling.batch_size=6", "sampling.num_steps=30", "sampling.seq_len=16",
        "calibration.num_samples=6", "calibration.tolerance=0.03", "eval.batch_size=6", "device=cpu", "top_k=3", "router.steps=200", *overrides,
    ])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def test_the_job_writes_its_table_figure_results_records_and_routers(tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = oracle_features(job_config(tiny_family, tmp_path))
    assert {path.name for path in tmp_path.iterdir()} == {
        "oracle_features.csv", "oracle_features.png", "results.json", "records_budget0.17.safetensors", "records_budget0.33.safetensors", "routers",
    }
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["budgets"].keys() == {"0.17", "0.33"} and saved["judged_by"] == "heavy_seed1" and saved["oracle"]["seed_baseline"] == "heavy_seed3"
    table = (tmp_path / "oracle_features.csv").read_text().splitlines()
    assert table[0] == "budget,fit,inputs,kind,needs,auc,accuracy,importances"
    columns = len(feature_names(2)) + len(EXTRA_FEATURES) + 1
    sets = 2 * (1 + len(EXTRA_FEATURES) + 1 + 2)  # logistic and tree on: existing, existing + each other column, all deployable, all
    assert len(table) == 1 + 2 * (columns + sets)
    for budget, result in results["budgets"].items():
        singles = {row["inputs"]: row for row in result["rows"] if row["fit"] == "logistic, one feature"}
        assert singles[PREVIOUS_INCREMENT]["kind"] == "oracle_only" and singles[PREVIOUS_INCREMENT]["needs"] == "heavy"
        assert singles["probe_margin"]["needs"] == "probe_entropy" and singles["left_revealed"]["needs"] == "revealing"
        assert all(0.0 <= row["auc"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0 for row in result["rows"])
        assert result["trajectories"] == 6 and result["held_out_trajectories"] == 2 and PREVIOUS_INCREMENT not in result["ranking"]
        # the records hold every decision of the 6 trajectories; the held-out ones are whole trajectories
        recorded = load_file(tmp_path / f"records_budget{budget}.safetensors")
        assert len(recorded["seed"]) == result["decisions"] and set(recorded["seed"].tolist()) == set(range(3_000_000, 3_000_006))
        assert recorded["extras"].shape == (result["decisions"], len(EXTRA_FEATURES)) and recorded["increments"].shape == (result["decisions"], 2)
        assert torch.equal(recorded["increments"][:, 0], torch.zeros(result["decisions"], dtype=torch.float64))  # the heavy's
        # the router reads the top_k features and runs, calibrated, on the evaluation seeds the oracle and the sandwich ran
        router = make_policy("kl_router", path=str(tmp_path / "routers" / f"budget{budget}"))
        assert router.inputs == result["router"]["inputs"] == result["ranking"][:3] and router.trained_against == "heavy_seed3"
        arms = result["arms"]
        assert [arms[name]["label"] for name in ("oracle", "router", "sandwich")] == [f"{name}@{budget}" for name in ("oracle", "router", "sandwich")]
        assert all(abs(arm["calibrated_saving"] - float(budget)) <= 0.03 for arm in arms.values())
        assert set(result["paired_excess"]) == {"router_minus_oracle", "router_minus_sandwich", "oracle_minus_sandwich"}
    printed = capsys.readouterr().out
    assert "budget 0.33: the oracle left the heavy at" in printed and "router - sandwich" in printed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("record_seed=1000004", "record_seed=1000004 (x6) overlaps the seeds 1000000..1000005 of calibration.seed; pick seeds outside them"),
        ("budgets=[]", "budgets=[] is invalid; give the budgets to analyse, such as [0.17,0.33]"),
        ("budgets=[0.2,1.5]", "budget=1.5 is invalid; it must lie in (0, 1) (the fraction of FLOPs to save)"),
        ("light=0", "light=0 is invalid; it must name a member other than the heavy, in [1, 2)"),
        ("top_k=40", "top_k=40 is invalid; the router can read at most 16 features (probe_features=True)"),
        ("probe_features=false top_k=14", "top_k=14 is invalid; the router can read at most 13 features (probe_features=False)"),
        ("eval.seed_baseline=null", "the job compares excesses over the seed floor: it needs eval.path_kl=true and eval.seed_baseline"),
        ("eval.seed_baseline=heavy_seed3", "policy oracle was trained against heavy_seed3; judge it with another seed baseline"),
        ("oracle.seed_baseline=heavy_seed9", "oracle.seed_baseline='heavy_seed9' names no denoiser folder in"),
    ],
)
def test_the_job_refuses_a_bad_value_before_any_model_loads(
    tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        oracle_features(job_config(tiny_family, tmp_path / "run", *override.split()))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert "sampling precision" not in capsys.readouterr().out and not (tmp_path / "run").exists()


def test_the_entry_point_refuses_a_wrong_value_on_one_line(tmp_path: Path) -> None:
    result = cli("oracle_features.py", tmp_path / "run", "top_k=0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: top_k=0 is invalid; it must be an integer >= 1"] and result.stdout == ""
    assert not (tmp_path / "run").exists()


def test_without_probe_features_the_router_asks_for_no_probe(tiny_family: Path, tmp_path: Path) -> None:
    results = oracle_features(job_config(tiny_family, tmp_path, "budgets=[0.25]", "probe_features=false", "top_k=5"))
    inputs = results["budgets"]["0.25"]["router"]["inputs"]
    assert len(inputs) == 5 and not any(name.startswith("probe_") for name in inputs) and "saved_so_far" not in inputs
    assert make_policy("kl_router", path=str(tmp_path / "routers" / "budget0.25")).probe_model is None
