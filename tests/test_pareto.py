"""Pareto fronts: headroom captured between the sandwich and the oracle, iso-quality savings, and the sweep's report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import wandb

from adasched.analysis.dashboard import dashboard
from adasched.analysis.pareto import (
    FIGURE_FILE,
    ISO_COLUMN,
    ISO_FILE,
    TABLE_FILE,
    headroom_captured,
    iso_quality_saving,
    pareto_summary,
)
from adasched.analysis.plots import shown_label
from adasched.errors import ConfigError
from adasched.jobs import sweep as sweep_job
from adasched.jobs.sweep import merge_shards, sweep
from tests.helpers import compose_config, sweep_config


def test_a_policy_halfway_between_the_sandwich_and_the_oracle_captures_half_the_headroom() -> None:
    generator = torch.Generator().manual_seed(0)
    sandwich = 10 + 2 * torch.randn(64, generator=generator, dtype=torch.float64)
    oracle = sandwich - 4 + torch.randn(64, generator=generator, dtype=torch.float64)
    assert headroom_captured((sandwich + oracle) / 2, sandwich, oracle) == pytest.approx((0.5, 0.5, 0.5))  # every resampling: exactly half
    noise = torch.randn(64, generator=generator, dtype=torch.float64)
    policy = (sandwich + oracle) / 2 + noise - noise.mean()  # halfway on average, each seed off by its own noise
    captured, low, high = headroom_captured(policy.tolist(), sandwich.tolist(), oracle.tolist())
    assert captured == pytest.approx(0.5) and low < 0.5 < high and 0.05 < high - low < 0.3
    assert headroom_captured(policy.tolist(), sandwich.tolist(), oracle.tolist()) == (captured, low, high)  # seeded: the same interval
    assert headroom_captured(sandwich, sandwich, oracle) == pytest.approx((0.0, 0.0, 0.0))
    assert headroom_captured(oracle, sandwich, oracle) == pytest.approx((1.0, 1.0, 1.0))
    assert headroom_captured(policy, sandwich, sandwich) is None  # no headroom between them
    with pytest.raises(ConfigError, match="the same seeds"):
        headroom_captured(policy[:10], sandwich, oracle)


FRONT = [(0.33, 7.0), (0.05, 1.0), (0.17, 3.0)]  # (saving, excess), in no order


@pytest.mark.parametrize(
    ("front", "level", "expected"),
    [
        (FRONT, 5.0, 0.25),  # between 0.17 (3.0) and 0.33 (7.0): halfway
        (FRONT, 3.0, 0.17),
        (FRONT, 7.0, 0.33),
        (FRONT, 9.0, ">max"),  # better than the level even at its largest saving
        (FRONT, 0.5, "<min"),  # worse even at its smallest
        ([(0.1, 1.0), (0.2, 6.0), (0.3, 2.0), (0.4, 8.0)], 5.0, 0.35),  # crossed three times: the largest saving that meets it
        ([(0.2, 1.0)], 3.0, ">max"),
    ],
)
def test_iso_quality_saving_interpolates_along_the_front_or_says_where_it_misses(front: list, level: float, expected: float | str) -> None:
    found = iso_quality_saving(front, level)
    assert found == (expected if isinstance(expected, str) else pytest.approx(expected))


def record(arm: str, budget: float | None, excess: list[float], saved: float, policy: str | None = None) -> dict:
    """An arm's record with what the fronts read: its executed saving, gen PPL, and per-sample excess over a floor of 1."""
    def measured(values: list[float]) -> dict:
        return {"per_sequence": {"mean": sum(values) / len(values), "ci95": 0.1}}

    return {
        "label": arm if budget is None else f"{arm}@{budget:g}", "arm": arm, "budget": budget, "policy": policy or arm,
        "seeds": list(range(len(excess))), "flops": {"saved_executed": saved}, "gen_ppl": {"mean": 600.0, "ci95": 30.0},
        "path_kl": {
            **measured([v + 1 for v in excess]), "floor": {**measured([1.0] * len(excess)), "seed_baseline": "heavy_seed1"},
            "excess": measured(excess),
        },
        "path_kl_excess_per_sample": excess,
    }


def test_headroom_is_blank_where_the_oracle_did_not_run_and_no_front_without_two_reference_budgets() -> None:
    records = [
        record("static_heavy", None, [0.0, 0.0], 0.0),
        record("static_sandwich", 0.17, [4.0, 6.0], 0.17), record("router", 0.17, [3.0, 4.0], 0.18), record("oracle", 0.17, [2.0, 2.0], 0.16),
        record("static_sandwich", 0.33, [8.0, 9.0], 0.33), record("router", 0.33, [6.0, 7.0], 0.32),
    ]
    summary = pareto_summary(records, "static_sandwich")
    rows = {row["label"]: row for row in summary["rows"]}
    assert rows["router@0.17"]["headroom_captured"] == pytest.approx((5 - 3.5) / (5 - 2), abs=1e-3)
    assert rows["static_sandwich@0.17"]["headroom_captured"] == 0 and rows["oracle@0.17"]["headroom_captured"] == 1
    assert rows["router@0.33"]["headroom_captured"] == rows["static_heavy"]["headroom_captured"] == ""  # no oracle at 0.33; no budget
    assert summary["level"] == {"label": "static_sandwich@0.17", "path_kl_excess": 5.0, "seed_baseline": "heavy_seed1"}
    iso = {row["label"]: row[ISO_COLUMN] for row in summary["iso_quality"]}
    assert iso == {"static_sandwich": 17.0, "router": pytest.approx(100 * (0.18 + (5 - 3.5) / (6.5 - 3.5) * (0.32 - 0.18))), "oracle": ">max"}
    assert pareto_summary(records[:4], "static_sandwich") is None  # the sandwich at one budget: no front
    assert pareto_summary(records, None) is None


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_pareto_sweep_reports_every_front_and_reports_it_again_from_its_log_and_its_shards(
    tiny_family: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged: list[tuple[str, dict, dict, dict]] = []
    monkeypatch.setattr(sweep_job, "log_run", lambda cfg, name, results, tables, images: logged.append((name, results, tables, images)))
    cfg = sweep_config(tiny_family, tmp_path / "single", "experiment=pareto", "experiment.budgets=[0.17,0.33]")
    rows = {row["label"]: row for row in sweep(cfg)}
    folder = tmp_path / "single"
    results = json.loads((folder / "results.json").read_text())
    fronts = {row["label"]: row for row in results["pareto"]["rows"]}
    assert list(fronts) == list(rows) and {"oracle@0.33", "light_first@0.33"} <= fronts.keys()
    assert read_csv(folder / TABLE_FILE) == [{key: str(value) for key, value in row.items()} for row in results["pareto"]["rows"]]
    assert (folder / FIGURE_FILE).stat().st_size > 1000
    for label, row in fronts.items():  # the fronts' numbers are the sweep table's
        assert all(row[key] == rows[label][key] for key in ("saved_executed_%", "path_kl_excess", "path_kl_excess_ci95", "path_kl", "gen_ppl"))
    records = {json.loads(line)["label"]: json.loads(line) for line in (folder / "arms.jsonl").read_text().splitlines()}
    for budget in (0.17, 0.33):
        sandwich, oracle = (records[f"{arm}@{budget}"]["path_kl_excess_per_sample"] for arm in ("static_sandwich", "oracle"))
        captured, low, high = headroom_captured(records[f"mask_fraction_router@{budget}"]["path_kl_excess_per_sample"], sandwich, oracle)
        row = fronts[f"mask_fraction_router@{budget}"]
        assert (row["headroom_captured"], row["headroom_ci95_low"], row["headroom_ci95_high"]) == (round(captured, 3), round(low, 3), round(high, 3))
        assert fronts[f"static_sandwich@{budget}"]["headroom_captured"] == 0 and fronts[f"oracle@{budget}"]["headroom_captured"] == 1
    assert fronts["static_heavy"]["headroom_captured"] == ""  # no budget: nothing to pair with
    iso = {row["label"]: row for row in read_csv(folder / ISO_FILE)}
    assert set(iso) == {"static_sandwich", "light_first", "mask_fraction_router", "entropy_probe", "entropy_lagged", "oracle"}
    assert results["pareto"]["level"]["path_kl_excess"] == records["static_sandwich@0.17"]["path_kl"]["excess"]["per_sequence"]["mean"]
    sandwich_iso = iso["static_sandwich"][ISO_COLUMN]  # its front meets its own level at 0.17, so saves at least that much there
    assert sandwich_iso == ">max" or float(sandwich_iso) >= rows["static_sandwich@0.17"]["saved_executed_%"]

    (name, summary, tables, images), = logged[-1:]  # one W&B run after the arms' own, in the experiment's group
    assert name == "pareto__pareto" and images == {"pareto": folder / FIGURE_FILE} and len(logged) == len(rows) + 1
    assert summary["level"] == results["pareto"]["level"] and set(tables) == {"pareto", "pareto_iso_quality"}
    for columns, data in tables.values():
        wandb.Table(columns=columns, data=data)  # one type per column, as W&B insists

    table, iso_table = (folder / TABLE_FILE).read_text(), (folder / ISO_FILE).read_text()
    sweep(cfg)  # a rerun samples nothing and writes the same fronts from the log, without logging them again
    assert (folder / TABLE_FILE).read_text() == table and len(logged) == len(rows) + 1
    lines = (folder / "arms.jsonl").read_text().splitlines(keepends=True)
    for shard in range(2):  # the arms split over two shards, as a multirun over experiment.shard_index leaves them
        shard_dir = tmp_path / "multirun" / f"shard{shard}-of-2"
        shard_dir.mkdir(parents=True)
        shutil.copy(folder / "settings.json", shard_dir)
        (shard_dir / "arms.jsonl").write_text("".join(lines[shard::2]))
    merge_shards(tmp_path / "multirun")
    assert (tmp_path / "multirun" / TABLE_FILE).read_text() == table and (tmp_path / "multirun" / ISO_FILE).read_text() == iso_table

    page = dashboard(compose_config("dashboard", [f"sweep_dir={folder}", f"out_dir={tmp_path / 'dashboard'}"]), "python experiments/dashboard.py").read_text()
    assert "## Pareto fronts" in page and f"]({FIGURE_FILE})" in page and (tmp_path / "dashboard" / FIGURE_FILE).stat().st_size > 1000
    assert f"| `mask_fraction_router@0.17` | 0.17 | {fronts['mask_fraction_router@0.17']['saved_executed_%']} |" in page


def test_figures_mark_an_analysis_only_run_and_no_other() -> None:
    assert shown_label({"analysis_only": True}, "oracle@0.17") == "oracle@0.17 (analysis, greedy)"
    assert shown_label({"analysis_only": False}, "kl_router@0.17") == shown_label({}, "kl_router@0.17") == "kl_router@0.17"
