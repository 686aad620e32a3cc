"""Sweeps: every arm on the same seeds, paired against the reference, and resumable after a crash."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from adasched.errors import ConfigError
from adasched.jobs import sweep as sweep_job
from adasched.jobs.sweep import sweep
from tests.conftest import compose_config

ARMS = ["static_heavy", "static_sandwich", "mask_fraction_router", "entropy_probe", "entropy_lagged"]


def sweep_config(family: Path, run_dir: Path, *overrides: str) -> DictConfig:
    cfg = compose_config(
        "sweep",
        [
            f"family.dir={family}", "sampling.num_samples=6", "sampling.batch_size=6", "sampling.num_steps=20",
            "sampling.seq_len=16", "eval.batch_size=6", "logger.mode=disabled", "device=cpu",
            "calibration.num_samples=6", "calibration.tolerance=0.03", *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        for name in ("kl_router", "learned_router"):  # routers fitted to the shipped family, not the tiny one
            cfg.experiment.arms.pop(name)
    return cfg


class Killed(Exception):
    """Stands in for the job being killed mid-arm."""


def read_table(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "table.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(handle)]


def test_every_arm_runs_at_every_budget_and_pairs_with_the_reference(tiny_family: Path, tmp_path: Path) -> None:
    rows = sweep(sweep_config(tiny_family, tmp_path))
    labels = [row["label"] for row in rows]
    assert labels == ["static_heavy"] + [f"{arm}@{b}" for b in (0.17, 0.33) for arm in ARMS[1:]]
    by_label = {row["label"]: row for row in rows}
    for budget in (0.17, 0.33):
        assert by_label[f"static_sandwich@{budget}"]["verdict"] == "reference"
        for arm in ARMS[2:]:
            row = by_label[f"{arm}@{budget}"]
            assert row["verdict"] in ("better", "worse", "tie") and row["diff_ci95"] > 0
        for arm in ARMS[1:3]:  # (random tiny models give entropies too alike to calibrate the entropy routers)
            assert abs(by_label[f"{arm}@{budget}"]["saved_executed_%"] / 100 - budget) < 0.05  # held-out seeds
    assert by_label["static_heavy"]["saved_executed_%"] == 0 and by_label["static_heavy"]["verdict"] == ""
    assert len(list((tmp_path / "samples").glob("*.jsonl"))) == len(rows) == len(list((tmp_path / "schedules").glob("*.png")))
    assert (tmp_path / "quality_vs_compute.png").stat().st_size > 1000


def test_a_killed_sweep_resumes_to_the_same_table(tiny_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep(sweep_config(tiny_family, tmp_path / "uninterrupted"))

    evaluate = sweep_job.evaluate_samples
    calls, crash_at = [], [4]

    def crash_on_the_fourth_arm(*args, **kwargs):
        calls.append(1)
        if len(calls) in crash_at:
            crash_at.clear()
            raise Killed
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(sweep_job, "evaluate_samples", crash_on_the_fourth_arm)
    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        sweep(sweep_config(tiny_family, resumed))
    lines = (resumed / "arms.jsonl").read_text().splitlines()
    assert len(lines) == 3 and not (resumed / "table.csv").exists()
    with (resumed / "arms.jsonl").open("a") as handle:
        handle.write(lines[0][: len(lines[0]) // 2])  # a line torn by a kill mid-write

    calls.clear()
    sweep(sweep_config(tiny_family, resumed))
    assert len(calls) == 1 + 4 * 2 - 3  # only the arms not finished before the crash
    assert read_table(resumed) == read_table(tmp_path / "uninterrupted")


def test_resuming_under_other_settings_or_arms_is_refused(tiny_family: Path, tmp_path: Path) -> None:
    cfg = sweep_config(tiny_family, tmp_path, "experiment.budgets=[0.2]")
    with open_dict(cfg):
        for name in ARMS[2:]:
            cfg.experiment.arms.pop(name)
    sweep(cfg)
    with pytest.raises(ConfigError, match=r"holds arms run with other settings \(sampling\)"):
        sweep(sweep_config(tiny_family, tmp_path, "experiment.budgets=[0.2]", "sampling.num_samples=4"))
    cfg.experiment.arms.static_sandwich.light = 0
    with pytest.raises(ConfigError, match="arm static_sandwich@0.2 .* was run with policy config"):
        sweep(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment.budgets=[0.2,1.5]", "budget=1.5 is invalid"),
        ("experiment.reference=nope", "experiment.reference='nope' is not one of its arms"),
    ],
)
def test_a_bad_budget_or_reference_fails_before_sampling(tiny_family: Path, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sweep(sweep_config(tiny_family, tmp_path, override))
    assert not (tmp_path / "arms.jsonl").exists()
