"""The KL router: step records are sound, the fit learns, the saved router round-trips and calibrates; the
excess objective learns signed targets and records the seed baseline it was fitted against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adasched.analysis.step_statistics import StepRecords, rollout_records
from adasched.errors import ConfigError
from adasched.sampling.calibration import calibrate
from adasched.sampling.features import feature_names
from adasched.sampling.policy_check import check_policy
from adasched.sampling.spec import SamplingSpec
from policies import make_policy
from policies.kl_router import INPUTS, examples, fit, fit_loss, load, save
from tests.helpers import compose_config, family, fit_kl_router_config

STEPS, LENGTH = 40, 16
SPEC = SamplingSpec(STEPS, LENGTH, batch_size=8)


@pytest.fixture(scope="module")
def models() -> list:
    return family()


@pytest.fixture(scope="module")
def records(models: list) -> StepRecords:
    return rollout_records(models, torch.arange(500, 508), SPEC, make_policy("static_heavy"), record_every=2)


@pytest.fixture(scope="module")
def router_dir(records: StepRecords, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("router")
    model, metadata = fit(examples(records.features, records.kl, 2), steps=100)
    save(model, directory, 2, metadata)
    return directory


def test_records_have_one_entry_per_row_and_recorded_step(records: StepRecords, models: list) -> None:
    assert records.features.shape == (len(records), len(feature_names(2))) and records.features.dtype == torch.float32
    assert records.step.max() < STEPS and len(records) <= 8 * LENGTH  # a row reveals at most LENGTH times
    assert (records.mask_fraction > 0).all() and (records.kl >= 0).all() and records.kl.isfinite().all()
    assert records.t.eq(1 - records.step.double() / STEPS).all()
    first = torch.stack([records.step[records.seed == seed].min() for seed in records.seed.unique()])
    assert records.mask_fraction[records.step == 0].eq(1).all() and len(first) == 8
    same = rollout_records([models[0], models[0]], torch.arange(500, 504), SPEC, make_policy("static_heavy"), record_every=5)
    assert same.kl.eq(0).all()


def test_a_seed_baseline_adds_its_floor_and_changes_nothing_else(records: StepRecords, models: list) -> None:
    assert records.floor is None
    floored = rollout_records(models, torch.arange(500, 508), SPEC, make_policy("static_heavy"), record_every=2, seed_baseline=models[1])
    assert torch.equal(floored.kl, records.kl) and torch.equal(floored.features, records.features)
    assert torch.equal(floored.floor, floored.kl)  # the light model as its own floor: no excess anywhere
    selected = floored.select(floored.step > 10)
    assert torch.equal(selected.floor, floored.floor[floored.step > 10]) and StepRecords.concatenate([records, records]).floor is None


def test_the_excess_fit_learns_signed_targets_and_its_knob_reaches_below_zero(models: list, tmp_path: Path) -> None:
    other_seed = family((3, 1, 3))[2]  # the same heavy and light as ``models``, and a third network
    floored = rollout_records(models, torch.arange(500, 508), SPEC, make_policy("static_heavy"), record_every=2, seed_baseline=other_seed)
    excess = floored.kl - floored.floor
    assert (excess < 0).any() and (excess > 0).any()
    model, metadata = fit(examples(floored.features, excess, 2), objective="excess", steps=100)
    assert metadata["loss"] == "mse_signed_log1p_excess_kl" and metadata["train_mse"] < 0.5 * metadata["train_mse_initial"]
    assert metadata["min_predicted_kl"] < min(0.0, metadata["max_predicted_kl"])  # raw's knob starts at 0: this one lower
    save(model, tmp_path, 2, metadata, "heavy_seed3")
    policy = make_policy("kl_router", path=str(tmp_path))
    assert policy.knob_range == (metadata["min_predicted_kl"], metadata["max_predicted_kl"]) and policy.trained_against == "heavy_seed3"
    inputs = examples(floored.features, excess, 2)[0]
    assert torch.equal(policy.model.predict_kl(inputs), model.predict_kl(inputs)) and (model.predict_kl(inputs) < 0).any()
    check_policy(policy, num_models=2)
    budgeted = make_policy("kl_router", path=str(tmp_path), budget=0.3)
    assert abs(calibrate(budgeted, models, 1000 + torch.arange(4), SPEC, tolerance=0.03).saved_executed - 0.3) <= 0.03


def test_fit_reduces_the_training_loss(records: StepRecords) -> None:
    _, metadata = fit(examples(records.features, records.kl, 2), steps=100)
    assert metadata["train_mse"] < 0.5 * metadata["train_mse_initial"]


def test_save_and_load_give_identical_predictions(records: StepRecords, router_dir: Path) -> None:
    model, _ = fit(examples(records.features, records.kl, 2), steps=100)
    loaded, info = load(router_dir)
    inputs = examples(records.features, records.kl, 2)[0]
    assert torch.equal(model.predict_kl(inputs), loaded.predict_kl(inputs))
    assert info["feature_names"] == INPUTS and fit_loss(loaded, examples(records.features, records.kl, 2)) == info["fit"]["train_mse"]


def test_router_passes_the_checker_and_routes_by_threshold(router_dir: Path) -> None:
    check_policy(make_policy("kl_router", path=str(router_dir)), num_models=2)
    everything_heavy = make_policy("kl_router", path=str(router_dir), threshold=-1.0)
    check_policy(everything_heavy, num_models=2)


def test_missing_router_names_the_path_and_the_fit_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        make_policy("kl_router", path=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message and "experiments/fit_kl_router.py" in message


def test_calibration_meets_a_budget(router_dir: Path, models: list) -> None:
    policy = make_policy("kl_router", path=str(router_dir), budget=0.3)
    result = calibrate(policy, models, 1000 + torch.arange(4), SPEC, tolerance=0.03)
    assert abs(result.saved_executed - 0.3) <= 0.03 and policy.threshold == result.knob


def test_the_fit_job_rolls_out_fits_and_saves_a_router_the_policy_loads(tiny_family: Path, tmp_path: Path) -> None:
    from adasched.jobs.fit_kl_router import fit_kl_router

    metadata = fit_kl_router(fit_kl_router_config(tiny_family, tmp_path / "router", "precision=bf16"))
    assert metadata["num_trajectories"] == 4 and metadata["validation_trajectories"] == 1
    assert metadata["train_records"] > 0 and metadata["validation_records"] > 0
    _, saved = load(tmp_path / "router")
    assert saved["fit"]["family"]["members"] == ["heavy", "light"] and saved["fit"]["precision"] == "bf16"
    assert saved["fit"]["validation_mse"] == metadata["validation_mse"]
    assert saved["objective"] == "raw" and saved["seed_baseline"] is None and make_policy("kl_router", path=str(tmp_path / "router")).trained_against is None


def test_the_excess_fit_job_subtracts_the_seed_baselines_floor_and_records_it(tiny_family: Path, tmp_path: Path) -> None:
    from adasched.jobs.fit_kl_router import fit_kl_router

    metadata = fit_kl_router(fit_kl_router_config(tiny_family, tmp_path / "router", "objective=excess"))
    model, saved = load(tmp_path / "router")
    assert saved["objective"] == model.objective == "excess" and saved["seed_baseline"] == "heavy_seed3"
    assert saved["fit"]["loss"] == metadata["loss"] == "mse_signed_log1p_excess_kl" and saved["fit"]["excess_mean"] < saved["fit"]["kl_mean"]
    assert make_policy("kl_router", path=str(tmp_path / "router")).trained_against == "heavy_seed3"


def test_the_excess_objectives_default_folder_is_its_own() -> None:
    raw, excess = (compose_config("fit_kl_router", overrides).out_dir for overrides in ([], ["objective=excess"]))
    assert Path(raw).name == "kl_router" and Path(excess).name == "kl_router_excess"
    assert Path(compose_config("run", ["policy=kl_router_excess"]).policy.path).name == "kl_router_excess"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed_baseline=heavy_seed9", "seed_baseline='heavy_seed9' names no denoiser folder in "),
        ("seed_baseline=null", "objective=excess subtracts a seed baseline's increment: set seed_baseline to a heavy from another seed, or pass objective=raw"),
    ],
)
def test_an_excess_fit_without_a_seed_baseline_fails_on_one_line_before_any_model_loads(
    override: str, message: str, tiny_family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adasched.jobs.fit_kl_router import fit_kl_router

    with pytest.raises(ConfigError) as error:
        fit_kl_router(fit_kl_router_config(tiny_family, tmp_path / "router", "objective=excess", override))
    assert str(error.value).startswith(message) and "\n" not in str(error.value) and "sampling precision" not in capsys.readouterr().out
