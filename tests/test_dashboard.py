"""Dashboards: the local page shows every arm's numbers and figures; the W&B report charts what the sweep logged."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import wandb
import wandb_workspaces.reports.v2 as wr
from omegaconf import DictConfig, OmegaConf
from wandb_workspaces import expr

from adasched.analysis.dashboard import build_report, dashboard, load_sweep
from adasched.analysis.run_logging import flatten
from adasched.errors import ConfigError
from adasched.io import write_json_atomic
from adasched.jobs import sweep as sweep_job
from adasched.jobs.sweep import merge_shards, sweep
from tests.helpers import ROOT, compose_config, sweep_config

COMMAND = "python experiments/dashboard.py sweep_dir=some/sweep"


@pytest.fixture(scope="module")
def placement(tiny_family: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[DictConfig, dict[str, Any]]]]:
    """A finished tiny placement sweep, saved with its Hydra config as the entry point saves it, and what it sent
    to W&B: (config, summary) of every arm's run."""
    folder = tmp_path_factory.mktemp("placement")
    cfg = sweep_config(tiny_family, folder, "experiment=placement")
    logged = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep_job, "log_run", lambda cfg, name, results, *rest: logged.append((cfg, results)))
        sweep(cfg)
    (folder / ".hydra").mkdir()
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    return folder, logged


def dashboard_config(*overrides: str) -> DictConfig:
    return compose_config("dashboard", list(overrides))


def test_offline_dashboard_shows_every_arm_and_its_figures(placement, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = placement
    monkeypatch.setattr(wr.Report, "save", lambda self: pytest.fail("an offline dashboard saved a W&B report"))
    path = dashboard(dashboard_config(f"sweep_dir={folder}", f"out_dir={tmp_path}"), COMMAND)
    text = path.read_text(encoding="utf-8")
    rows = json.loads((folder / "results.json").read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        line = next(line for line in text.splitlines() if line.startswith(f"| `{row['label']}` |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert f"{row['gen_ppl']} ± {row['ci95']}" in cells and row["verdict"] in cells
        assert str(row["saved_nominal_%"]) in cells and str(row["saved_executed_%"]) in cells
        assert f"{row['path_kl']} ± {row['path_kl_ci95']}" in cells
        assert f"{row['path_kl_floor']} ± {row['path_kl_floor_ci95']}" in cells and f"{row['path_kl_excess']} ± {row['path_kl_excess_ci95']}" in cells
        if row["verdict"] != "reference":
            assert f"{row['diff_vs_reference']} ± {row['diff_ci95']}" in cells and str(row["speedup_vs_reference"]) in cells
            assert f"{row['path_kl_diff']} ± {row['path_kl_diff_ci95']}" in cells and row["path_kl_verdict"] in cells
            assert f"{row['path_kl_excess_diff']} ± {row['path_kl_excess_diff_ci95']}" in cells and row["path_kl_excess_verdict"] in cells
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"quality_vs_compute.png", "quality_by_arm.png", "path_kl_per_step.png"} <= set(figures)
    assert all((tmp_path / figure).stat().st_size > 1000 for figure in figures)
    assert f"`{COMMAND}`" in text and "group `shakespeare-placement`" in text


def test_report_charts_the_summary_keys_the_sweep_logged_over_its_group(placement) -> None:
    folder, logged = placement
    experiment = load_sweep(folder)
    report = build_report(experiment, "the summary", "team", experiment.project, experiment.groups)  # built, never saved
    summary, grid = report.blocks
    assert summary.text == "the summary" and (report.entity, report.project) == ("team", "adasched")
    runset = grid.runsets[0]
    assert (runset.entity, runset.project) == ("team", "adasched")
    group_filter = expr.expr_to_filters(runset.filters)
    assert (group_filter.key.section, group_filter.key.name, group_filter.op) == ("run", "group", "IN")
    assert group_filter.value == sorted({cfg.logger.group for cfg, _ in logged}) == ["shakespeare-placement"]

    scatter, bars, comparer = grid.panels
    assert (scatter.x.name, scatter.y.name) == ("flops/saved_executed", "gen_ppl/mean")
    assert [metric.name for metric in bars.metrics] == ["gen_ppl/mean"] and isinstance(comparer, wr.RunComparer)
    charted = {scatter.x.name, scatter.y.name, runset.order[0].name.name} | {column.removeprefix("summary:") for column in runset.visible_columns}
    assert len(logged) == 6
    for _, results in logged:
        assert charted <= flatten(results).keys()


def test_online_mode_saves_the_report_and_prints_its_url(
    placement, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = placement
    saved: list[wr.Report] = []

    def save(report: wr.Report) -> wr.Report:
        report.id = "r1"
        saved.append(report)
        return report

    monkeypatch.setattr(wandb, "Api", lambda: SimpleNamespace(default_entity="me"))
    monkeypatch.setattr(wr.Report, "save", save)
    monkeypatch.setattr(wr.Report, "url", property(lambda report: f"https://wandb.test/{report.entity}/{report.project}/reports/{report.id}"))
    dashboard(dashboard_config(f"sweep_dir={folder}", f"out_dir={tmp_path}", "logger.mode=online"), COMMAND)
    assert len(saved) == 1 and saved[0].blocks[0].text.startswith("# placement")
    assert "W&B report: https://wandb.test/me/adasched/reports/r1" in capsys.readouterr().out
    assert (tmp_path / "dashboard.md").is_file()  # the local files too


def test_run_folders_make_a_dashboard_too(placement, tmp_path: Path) -> None:
    folder, _ = placement
    for line in (folder / "arms.jsonl").read_text().splitlines():  # each arm as a run folder with its results.json
        record = json.loads(line)
        record["policy_config"].pop("_target_")  # as run.py writes it
        (tmp_path / "runs" / record["label"]).mkdir(parents=True)
        write_json_atomic(tmp_path / "runs" / record["label"] / "results.json", record)
    text = dashboard(dashboard_config(f"run_dirs=[{tmp_path / 'runs'}]"), COMMAND).read_text(encoding="utf-8")
    assert text.count("| `static_quarter(") == 4 and "| `static_heavy` |" in text
    assert (tmp_path / "runs" / "dashboard" / "quality_vs_compute.png").is_file()


def test_a_merged_multirun_makes_the_same_dashboard_as_one_sweep(placement, tmp_path: Path) -> None:
    folder, _ = placement
    lines = (folder / "arms.jsonl").read_text().splitlines(keepends=True)
    for shard in range(2):  # the arms split over two shards, as a multirun over experiment.shard_index leaves them
        shard_dir = tmp_path / "multirun" / f"shard{shard}-of-2"
        shutil.copytree(folder / ".hydra", shard_dir / ".hydra")
        shutil.copy(folder / "settings.json", shard_dir)
        (shard_dir / "arms.jsonl").write_text("".join(lines[shard::2]))
    merge_shards(tmp_path / "multirun")
    merged = dashboard(dashboard_config(f"sweep_dir={tmp_path / 'multirun'}", f"out_dir={tmp_path / 'merged'}"), COMMAND).read_text()
    single = dashboard(dashboard_config(f"sweep_dir={folder}", f"out_dir={tmp_path / 'single'}"), COMMAND).read_text()
    table = [line for line in single.splitlines() if line.startswith("| `")]
    assert len(table) == 6 and table == [line for line in merged.splitlines() if line.startswith("| `")]
    assert "group `shakespeare-placement`" in merged


@pytest.mark.parametrize(("make", "message"), [("missing", "no such sweep folder: "), ("run", "no sweep under ")])
def test_a_missing_or_non_sweep_folder_is_refused(tmp_path: Path, make: str, message: str) -> None:
    folder = tmp_path / make
    if make == "run":
        folder.mkdir()
        write_json_atomic(folder / "results.json", {"policy": "static_heavy"})
    with pytest.raises(ConfigError, match=message) as error:
        dashboard(dashboard_config(f"sweep_dir={folder}"), COMMAND)
    assert str(folder) in str(error.value) and not (folder / "dashboard").exists()


def test_cli_names_the_bad_folder_in_one_line(tmp_path: Path) -> None:
    env = os.environ | {"WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "experiments/dashboard.py", f"sweep_dir={tmp_path / 'nope'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: no such sweep folder: {tmp_path / 'nope'}"]
