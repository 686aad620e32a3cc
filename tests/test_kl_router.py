"""The KL router: step records are sound, the fit learns, the saved router round-trips and calibrates."""

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
from policies.kl_router import INPUTS, examples, fit, load, mse, save
from tests.helpers import family

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


def test_fit_reduces_the_training_loss(records: StepRecords) -> None:
    _, metadata = fit(examples(records.features, records.kl, 2), steps=100)
    assert metadata["train_mse"] < 0.5 * metadata["train_mse_initial"]


def test_save_and_load_give_identical_predictions(records: StepRecords, router_dir: Path) -> None:
    model, _ = fit(examples(records.features, records.kl, 2), steps=100)
    loaded, info = load(router_dir)
    inputs = examples(records.features, records.kl, 2)[0]
    assert torch.equal(model.predict_kl(inputs), loaded.predict_kl(inputs))
    assert info["feature_names"] == INPUTS and mse(loaded, examples(records.features, records.kl, 2)) == info["fit"]["train_mse"]


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
    from tests.helpers import compose_config

    cfg = compose_config("fit_kl_router", [
        f"family.dir={tiny_family}", "num_trajectories=4", "batch_size=4", "num_steps=20", "seq_len=16",
        "fit.steps=20", "device=cpu", "precision=bf16", f"out_dir={tmp_path / 'router'}",
    ])
    metadata = fit_kl_router(cfg)
    assert metadata["num_trajectories"] == 4 and metadata["validation_trajectories"] == 1
    assert metadata["train_records"] > 0 and metadata["validation_records"] > 0
    _, saved = load(tmp_path / "router")
    assert saved["fit"]["family"]["members"] == ["heavy", "light"] and saved["fit"]["precision"] == "bf16"
    assert saved["fit"]["validation_mse"] == metadata["validation_mse"]
