"""Sweeps: every arm on the same seeds, paired against the reference, and resumable after a crash."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from adasched.analysis.arm_log import content_digest
from adasched.analysis.plots import plot_arms
from adasched.analysis.segment_search import (
    MEASURES,
    analysis,
    searched,
    segment_influence,
    segment_search_arms,
)
from adasched.errors import ConfigError
from adasched.jobs import sweep as sweep_job
from adasched.jobs.fit_kl_router import fit_kl_router
from adasched.jobs.sweep import merge_shards, pair_against, sweep
from adasched.models.family import load_family
from tests.helpers import TINY_MEMBERS, ROOT, compose_config, fit_kl_router_config, fitted_kl_router, sweep_config

ARMS = ["static_heavy", "static_sandwich", "mask_fraction_router", "entropy_probe", "entropy_lagged"]


class Killed(Exception):
    """Stands in for the job being killed mid-arm."""


def read_table(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "table.csv").open() as handle:
        return [{k: v for k, v in row.items() if k not in ("wall_s", "speedup_vs_reference")} for row in csv.DictReader(handle)]  # timings vary


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
            assert row["path_kl_verdict"] in ("better", "worse", "tie") and row["path_kl"] >= 0
            assert row["path_kl_excess_verdict"] in ("better", "worse", "tie") and row["path_kl_floor"] >= 0
            assert row["floor_share_%"] == (round(100 * row["path_kl_floor"] / row["path_kl"], 1) if row["path_kl"] else "")
        for arm in ARMS[1:3]:  # (random tiny models give entropies too alike to calibrate the entropy routers)
            assert abs(by_label[f"{arm}@{budget}"]["saved_executed_%"] / 100 - budget) < 0.05  # held-out seeds
    assert by_label["static_heavy"]["saved_executed_%"] == 0 and by_label["static_heavy"]["verdict"] == ""
    assert by_label["static_heavy"]["path_kl"] == by_label["static_heavy"]["path_kl_floor"] == by_label["static_heavy"]["path_kl_excess"] == 0.0
    figures = list((tmp_path / "schedules").glob("*.png"))  # a schedule and a per-step path KL curve per arm
    assert len(list((tmp_path / "samples").glob("*.jsonl"))) == len(rows) == len(figures) // 2 == sum(f.stem.endswith("_path_kl") for f in figures)
    assert (tmp_path / "quality_vs_compute.png").stat().st_size > 1000 and (tmp_path / "path_kl_per_step.png").stat().st_size > 1000
    records = {record["label"]: record for record in (json.loads(line) for line in (tmp_path / "arms.jsonl").read_text().splitlines())}
    assert records["static_heavy"]["saved_by_quarter"] == [0.0] * 4 and records["static_heavy"]["member_shares"] == {"heavy": 1.0, "light": 0.0}
    sandwich = records["static_sandwich@0.33"]["saved_by_quarter"]  # light at both ends: it saves in the outer quarters
    assert min(sandwich[0], sandwich[3]) > max(sandwich[1], sandwich[2]) and (tmp_path / "saving_by_quarter.png").stat().st_size > 1000


def three_arm_sweep_config(family: Path, run_dir: Path) -> DictConfig:
    """The sweep's first three arms (heavy, sandwich, mask fraction) at one budget: enough to pair arms."""
    cfg = sweep_config(family, run_dir, "experiment.budgets=[0.2]")
    with open_dict(cfg):
        for name in ARMS[3:]:
            cfg.experiment.arms.pop(name)
    return cfg


def test_a_finished_sweep_pairs_against_any_of_its_arms_without_resampling(tiny_family: Path, tmp_path: Path) -> None:
    cfg = three_arm_sweep_config(tiny_family, tmp_path)
    by_label = {row["label"]: row for row in sweep(cfg)}
    repaired = {row["label"]: row for row in pair_against(tmp_path, "mask_fraction_router")}
    assert repaired["mask_fraction_router@0.2"]["verdict"] == "reference"
    against, back = by_label["mask_fraction_router@0.2"], repaired["static_sandwich@0.2"]
    for key in ("diff_vs_reference", "path_kl_diff", "path_kl_excess_diff"):  # the same pairs, the other way round
        assert back[key] == pytest.approx(-against[key], abs=0.011)
    assert back["diff_ci95"] == against["diff_ci95"] and back["path_kl_diff_ci95"] == against["path_kl_diff_ci95"]
    assert back["path_kl_excess_diff_ci95"] == against["path_kl_excess_diff_ci95"]
    assert repaired["static_heavy"]["verdict"] == ""  # no unbudgeted mask_fraction_router to pair the budget-free arm with
    assert (tmp_path / "table_vs_mask_fraction_router.csv").is_file() and read_table(tmp_path) == [
        {k: str(v) for k, v in row.items() if k not in ("wall_s", "speedup_vs_reference")} for row in by_label.values()
    ]
    with pytest.raises(ConfigError, match="reference='kl_router' is not an arm of the sweep"):
        pair_against(tmp_path, "kl_router")


def without_floor(record: dict) -> dict:
    """An arm as logged before path KL's floor was measured."""
    path_kl = {key: value for key, value in record["path_kl"].items() if key not in ("floor", "excess")}
    return {key: value for key, value in record.items() if key != "path_kl_excess_per_sample"} | {"path_kl": path_kl}


def test_arms_logged_before_the_floor_still_pair_and_tabulate(tiny_family: Path, tmp_path: Path) -> None:
    cfg = three_arm_sweep_config(tiny_family, tmp_path)
    measured = {row["label"]: row for row in sweep(cfg)}
    lines = [json.loads(line) for line in (tmp_path / "arms.jsonl").read_text().splitlines()]
    (tmp_path / "arms.jsonl").write_text("".join(json.dumps(without_floor(line) if line["arm"] == "static_sandwich" else line) + "\n" for line in lines))
    rows = {row["label"]: row for row in sweep(cfg)}  # nothing to resample: the report of the log as it now reads
    old, new = rows["static_sandwich@0.2"], rows["mask_fraction_router@0.2"]  # the reference, then an arm paired with it
    assert old["path_kl"] == measured["static_sandwich@0.2"]["path_kl"] and [old[key] for key in ("path_kl_floor", "path_kl_excess")] == ["", ""]
    assert new["path_kl_diff"] == measured["mask_fraction_router@0.2"]["path_kl_diff"] != ""  # path KL still pairs
    assert new["path_kl_excess"] == measured["mask_fraction_router@0.2"]["path_kl_excess"] != "" and new["path_kl_excess_diff"] == ""
    assert next(line for line in read_table(tmp_path) if line["label"] == "static_sandwich@0.2")["path_kl_excess"] == ""


SEARCH = ["experiment=exhaustive", "experiment.segment_search.num_segments=4", "experiment.segment_search.light_segments=2"]


@pytest.mark.parametrize("experiment", [[], SEARCH], ids=["budget_comparison", "exhaustive"])
def test_a_killed_sweep_resumes_to_the_same_table(tiny_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, experiment: list[str]) -> None:
    rows = sweep(sweep_config(tiny_family, tmp_path / "uninterrupted", *experiment))

    evaluate = sweep_job.evaluate_arm
    calls, crash_at = [], [4]

    def crash_on_the_fourth_arm(*args, **kwargs):
        calls.append(1)
        if len(calls) in crash_at:
            crash_at.clear()
            raise Killed
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(sweep_job, "evaluate_arm", crash_on_the_fourth_arm)
    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        sweep(sweep_config(tiny_family, resumed, *experiment))
    lines = (resumed / "arms.jsonl").read_text().splitlines()
    assert len(lines) == 3 and not (resumed / "table.csv").exists()
    with (resumed / "arms.jsonl").open("a") as handle:
        handle.write(lines[0][: len(lines[0]) // 2])  # a line torn by a kill mid-write

    calls.clear()
    sweep(sweep_config(tiny_family, resumed, *experiment))
    assert len(calls) == len(rows) - 3  # only the arms not finished before the crash
    assert read_table(resumed) == read_table(tmp_path / "uninterrupted")
    analyses = [json.loads((folder / "results.json").read_text()).get("segment_search") for folder in (resumed, tmp_path / "uninterrupted")]
    assert analyses[0] == analyses[1] and (analyses[0] is not None) == bool(experiment)  # the exhaustive search's too


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


def test_an_arm_whose_router_was_refitted_since_it_ran_is_sampled_again(tiny_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = list(load_family({name: tiny_family / name for name in ("heavy", "light")}).values())
    router = fitted_kl_router(models, tmp_path / "router", num_steps=20)
    cfg = sweep_config(tiny_family, tmp_path / "run", "experiment.budgets=[]", "experiment.reference=null")
    with open_dict(cfg):
        cfg.experiment.arms = {
            "static_heavy": cfg.experiment.arms.static_heavy,
            "kl_router": {"_target_": "policies.make_policy", "name": "kl_router", "path": str(router), "threshold": 0.0, "light": 1},
        }
    evaluate, calls = sweep_job.evaluate_arm, []
    monkeypatch.setattr(sweep_job, "evaluate_arm", lambda setting, label, *args, **kwargs: calls.append(label) or evaluate(setting, label, *args, **kwargs))
    sweep(cfg)
    sweep(cfg)  # nothing changed: nothing runs
    assert calls == ["static_heavy", "kl_router"]
    first = json.loads((tmp_path / "run" / "arms.jsonl").read_text().splitlines()[1])
    assert first["artifacts"] == {"path": content_digest(router)} and content_digest(router) != content_digest(tiny_family / "heavy")
    fitted_kl_router(models, router, num_steps=40)  # refitted on other rollouts
    sweep(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "arms.jsonl").read_text().splitlines()]
    assert calls == ["static_heavy", "kl_router", "kl_router"] and [line["label"] for line in lines] == ["static_heavy", "kl_router", "kl_router"]
    assert lines[2]["artifacts"] == {"path": content_digest(router)} != first["artifacts"]  # the old line stays, superseded


def test_an_arm_with_its_own_budgets_runs_only_at_those_of_the_experiment() -> None:
    cfg = compose_config("sweep", ["experiment.budgets=[0.1,0.17,0.33]", "logger.mode=disabled"])
    with open_dict(cfg):
        arms = cfg.experiment.arms
        cfg.experiment.arms = {"static_heavy": arms.static_heavy, "static_sandwich": arms.static_sandwich, "mask_fraction_router": arms.mask_fraction_router}
        cfg.experiment.arms.mask_fraction_router.budgets = [0.17, 0.33, 0.5]  # 0.5: not one of the experiment's
    expanded = sweep_job.expand_arms(cfg.experiment)
    assert [arm.label for arm in expanded] == [
        "static_heavy", "static_sandwich@0.1", "static_sandwich@0.17", "mask_fraction_router@0.17", "static_sandwich@0.33", "mask_fraction_router@0.33",
    ]
    assert all("budgets" not in arm.config for arm in expanded)  # no key of the policy (nor of the arm's logged config)
    for arm, budgets, message in (
        ("static_heavy", [0.17], "experiment.arms.static_heavy.budgets is set but its policy 'static_heavy' takes no budget"),
        ("mask_fraction_router", [0.17, 1.5], "budget=1.5 is invalid"),
        ("mask_fraction_router", 0.17, "experiment.arms.mask_fraction_router.budgets=0.17 is invalid; it must be a list"),
    ):
        broken = copy.deepcopy(cfg)
        with open_dict(broken):
            broken.experiment.arms[arm].budgets = budgets
        with pytest.raises(ConfigError, match=re.escape(message)):
            sweep_job.expand_arms(broken.experiment)
    pareto = compose_config("sweep", ["experiment=pareto", "logger.mode=disabled"]).experiment
    ships = sweep_job.arm_configs(pareto)["learned_router"]  # one router per budget: it runs at those two only
    assert sweep_job.arm_budgets("learned_router", ships, list(pareto.budgets)) == [0.17, 0.33] and 0.17 in pareto.budgets


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


def test_an_arm_judged_by_the_seed_baseline_its_router_was_fitted_against_stops_the_sweep_before_sampling(tiny_family: Path, tmp_path: Path) -> None:
    router = tmp_path / "router"
    fit_kl_router(fit_kl_router_config(tiny_family, router, "objective=excess"))  # against heavy_seed3
    cfg = sweep_config(tiny_family, tmp_path / "run", "experiment.budgets=[0.2]", "experiment.reference=null", "eval.seed_baseline=heavy_seed3")
    with open_dict(cfg):
        cfg.experiment.arms = {
            "static_heavy": cfg.experiment.arms.static_heavy,
            "kl_router_excess": {"_target_": "policies.make_policy", "name": "kl_router", "path": str(router), "budget": None},
        }
    with pytest.raises(ConfigError, match=r"^policy kl_router_excess@0.2 was trained against heavy_seed3; judge it with another seed baseline"):
        sweep(cfg)
    assert not (tmp_path / "run" / "arms.jsonl").exists()


def segment_record(light_segments: list[int], ppl: float, path_kl: float) -> dict:
    return {
        "label": "light_" + "-".join(map(str, light_segments)), "policy": "static_segment_mask", "gen_ppl": {"mean": ppl},
        "path_kl": {"per_sequence": {"mean": path_kl}}, "policy_config": {"num_segments": 4, "light_segments": light_segments},
    }


def test_segment_influence_and_frequencies_follow_eq_8_for_each_measure() -> None:
    arms = segment_search_arms(num_segments=4, light_segments=2)
    assert len(arms) == 6 and arms["light_0-3"]["light_segments"] == [0, 3]
    # perplexity = 10 + how many middle segments (1, 2) are light: the middle is what hurts;
    # path KL = the sum of the light segments' indices: the later, the worse
    records = [
        segment_record(config["light_segments"], 10.0 + sum(j in (1, 2) for j in config["light_segments"]), float(sum(config["light_segments"])))
        for config in arms.values()
    ]
    ppl, path_kl = MEASURES
    influence = segment_influence(searched(records, ppl), ppl)
    mean = 11.0
    assert influence == pytest.approx([(10 + 11 + 11) / 3 - mean, (11 + 12 + 11) / 3 - mean, (11 + 12 + 11) / 3 - mean, (11 + 11 + 10) / 3 - mean])
    # each segment is light in 3 schedules, with each other segment once: I(j) = (3j + (6 - j)) / 3 - 3 = 2(j - 1.5) / 3
    assert segment_influence(searched(records, path_kl), path_kl) == pytest.approx([2 * (j - 1.5) / 3 for j in range(4)])
    summary = analysis(records, top_k=1)
    assert summary["schedules"] == 6
    assert summary["gen_ppl"]["best"][0] == ("light_0-3", 10.0) and summary["gen_ppl"]["worst"][-1] == ("light_1-2", 12.0)
    assert summary["gen_ppl"]["frequency_top1"] == [1, 0, 0, 1] and summary["gen_ppl"]["frequency_bottom1"] == [0, 1, 1, 0]
    assert summary["path_kl"]["best"][0] == ("light_0-1", 1.0) and summary["path_kl"]["frequency_bottom1"] == [0, 0, 1, 1]
    without_path_kl = [{key: value for key, value in record.items() if key != "path_kl"} for record in records]
    assert "path_kl" not in analysis(without_path_kl)


def test_shards_merge_to_the_single_job_table_with_the_segment_analysis(tiny_family: Path, tmp_path: Path) -> None:
    single = sweep(sweep_config(tiny_family, tmp_path / "single", *SEARCH))
    assert len(single) == 1 + 6
    for shard in range(2):
        sweep(sweep_config(tiny_family, tmp_path / "multirun" / f"shard{shard}", *SEARCH, f"experiment.shard_index={shard}", "experiment.num_shards=2"))
    merged = merge_shards(tmp_path / "multirun")
    assert [row["label"] for row in merged] == [row["label"] for row in single]
    assert read_table(tmp_path / "multirun") == read_table(tmp_path / "single")
    results = json.loads((tmp_path / "multirun" / "results.json").read_text())
    assert results["segment_search"]["schedules"] == 6
    assert all(len(results["segment_search"][key]["influence"]) == 4 for key in ("gen_ppl", "path_kl"))
    for figure in ("segments_best_worst", "segments_frequency", "segments_influence", "quality_by_arm"):
        assert (tmp_path / "multirun" / f"{figure}.png").stat().st_size > 1000
    sweep(sweep_config(tiny_family, tmp_path / "multirun" / "odd", *SEARCH, "seed=5"))
    with pytest.raises(ConfigError, match="other settings"):
        merge_shards(tmp_path / "multirun")


@pytest.mark.slow
def test_a_hydra_multirun_over_shards_with_joblib_merges(tiny_family: Path, tmp_path: Path) -> None:
    settings = [
        f"family.dir={tiny_family}", TINY_MEMBERS, "sampling.num_samples=4", "sampling.batch_size=4", "sampling.num_steps=20", "sampling.seq_len=16",
        "eval.batch_size=4", "logger.mode=disabled", "device=cpu", *SEARCH,
    ]
    shards = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment.num_shards=2", "experiment.shard_index=range(0,2)"]
    environment = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "experiments/sweep.py", *shards, f"hydra.sweep.dir={tmp_path}", *settings], cwd=ROOT, env=environment, check=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("shard")) == ["shard0-of-2", "shard1-of-2"]
    subprocess.run([sys.executable, "experiments/merge_sweep.py", str(tmp_path)], cwd=ROOT, env=environment, check=True)
    assert [row["label"] for row in read_table(tmp_path)] == ["static_heavy", *segment_search_arms(4, 2)]


@pytest.mark.parametrize("experiment", sorted(path.stem for path in (ROOT / "experiments" / "configs" / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_expands_to_arms_of_shipped_members(experiment: str) -> None:
    cfg = compose_config("sweep", [f"experiment={experiment}", "logger.mode=disabled"])
    arms = sweep_job.expand_arms(cfg.experiment)
    assert cfg.experiment.reference in {arm.name for arm in arms}
    members = list(cfg.family.members)
    assert all((Path(cfg.family.dir) / member / "model.safetensors").is_file() for member in members), members
    assert all(arm.config.get("light", 1) < len(members) for arm in arms)


def test_a_search_with_hundreds_of_arms_draws_a_readable_ranked_figure(tmp_path: Path) -> None:
    rows = [{"label": f"arm{i}", "gen_ppl": {"mean": 500.0 + i % 17, "ci95": 9.0}, "path_kl": {"per_sequence": {"mean": float(i % 13), "ci95": 1.0}}} for i in range(211)]
    header = plot_arms(rows, tmp_path / "arms.png").read_bytes()[16:24]  # a PNG's IHDR: width, height
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")
    assert 1000 < width <= 2 * 8 * 120 + 100 and height < 600  # two 8-inch panels at 120 dpi, not 0.6 inch per arm
