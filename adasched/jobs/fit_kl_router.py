"""``fit_kl_router(cfg)``: fit the supervised KL router on all-heavy rollouts and save it where ``policy=kl_router`` reads it.

Rolls out ``num_trajectories`` samples on seeds disjoint from evaluation and calibration, records the
path-KL increment of the light model at every ``record_every``-th step, fits the router on most trajectories,
reports its error on the held-out ones and saves it to ``out_dir``. With ``objective=excess`` the rollout also
runs ``seed_baseline`` at every recorded step and the router learns the light model's increment minus that
floor. A plain function (the ``@hydra.main`` wrapper lives in ``experiments/fit_kl_router.py``) so tests can
call it with a composed config.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from adasched.analysis.step_statistics import StepRecords, rollout_records
from adasched.errors import ConfigError
from adasched.compute import resolve_device, resolve_precision
from adasched.jobs.arms import load_members, training_seed_baseline
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.spec import SamplingSpec
from policies import kl_router, make_policy


def collect(cfg: DictConfig, models: list, seeds: torch.Tensor, seed_baseline: MDLMDenoiser | None) -> StepRecords:
    """Records of every trajectory (with the seed baseline's floor, if any), sampled all-heavy with a progress bar over the loop's steps."""
    spec = SamplingSpec(num_steps=cfg.num_steps, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    with tqdm(desc="rollout steps", unit="step") as bar:
        return rollout_records(
            models, seeds, spec, make_policy("static_heavy"), record_every=cfg.record_every, heavy=cfg.heavy, light=cfg.light, on_step=bar.update,
            seed_baseline=seed_baseline,
        )


def targets(records: StepRecords) -> torch.Tensor:
    """What the router learns per record: the light model's increment, minus the floor where one was measured."""
    return records.kl if records.floor is None else records.kl - records.floor


def spread(values: torch.Tensor, name: str) -> dict[str, Any]:
    """Mean and deciles 1, 5 and 9 of ``values`` for the fit's record."""
    return {f"{name}_mean": float(values.mean()), f"{name}_quantiles": {str(q): float(values.quantile(q)) for q in (0.1, 0.5, 0.9)}}


def fit_kl_router(cfg: DictConfig) -> dict[str, Any]:
    """Roll out, fit on the training trajectories, validate on the held-out ones, save; returns the fit metadata."""
    held_out = round(cfg.validation_fraction * cfg.num_trajectories)
    if cfg.record_every <= 0 or not 0 < held_out < cfg.num_trajectories:
        raise ConfigError(
            f"need record_every > 0 and validation_fraction={cfg.validation_fraction} to hold out between 1 and "
            f"num_trajectories - 1 of num_trajectories={cfg.num_trajectories} trajectories"
        )
    baseline = training_seed_baseline(cfg, "", cfg.family.dir)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, key="precision")
    print(f"sampling precision: {precision}")
    models, seed_baseline = load_members(cfg.family.dir, list(cfg.family.members), baseline, precision, device)
    seeds = cfg.seed + torch.arange(cfg.num_trajectories)
    start = time.perf_counter()
    records = collect(cfg, models, seeds, seed_baseline)
    rollout_s = time.perf_counter() - start
    validation_seeds = seeds[-held_out:]
    is_validation = torch.isin(records.seed, validation_seeds)
    start = time.perf_counter()
    train, validation = records.select(~is_validation), records.select(is_validation)
    model, metadata = kl_router.fit(
        kl_router.examples(train.features, targets(train), len(models)), kl_router.examples(validation.features, targets(validation), len(models)),
        cfg.objective, **cfg.fit,
    )
    metadata |= {
        "command": " ".join(["python experiments/fit_kl_router.py", *sys.argv[1:]]),
        "family": {"name": cfg.family.name, "members": list(cfg.family.members), "heavy": cfg.heavy, "light": cfg.light},
        "behaviour": "static_heavy", "seed": cfg.seed, "num_trajectories": cfg.num_trajectories, "validation_trajectories": held_out,
        "num_steps": cfg.num_steps, "seq_len": cfg.seq_len, "record_every": cfg.record_every, "device": str(device),
        "precision": precision, **spread(records.kl, "kl"), **({} if baseline is None else spread(targets(records), "excess")),
        "rollout_wall_s": rollout_s, "fit_wall_s": time.perf_counter() - start,
    }
    kl_router.save(model, cfg.out_dir, len(models), metadata, baseline)
    print(
        f"fitted on {metadata['train_records']} records, validated on {metadata['validation_records']}: "
        f"MSE of {kl_router.OBJECTIVES[cfg.objective].target} {metadata['train_mse_initial']:.4f} -> {metadata['train_mse']:.4f} (train), "
        f"{metadata['validation_mse']:.4f} (validation; its variance {metadata['validation_variance']:.4f}); saved to {cfg.out_dir}"
    )
    return metadata
