"""W&B logging: flat summary keys, and an offline run that keeps the tables and images for ``wandb sync``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from adasched.analysis.run_logging import flatten, log_run, samples_table


def test_flatten_keeps_numeric_leaves_as_slash_keys() -> None:
    assert flatten({"gen_ppl": {"mean": 2.0, "ci95": 0.5}, "policy": "x", "ok": True, "n": 3}) == {"gen_ppl/mean": 2.0, "gen_ppl/ci95": 0.5, "n": 3}


def test_an_offline_run_holds_the_tables_and_images(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"logger": {"mode": "offline", "project": "adasched-test", "group": "g"}, "run_dir": str(tmp_path)})
    figure = plt.figure()
    figure.savefig(tmp_path / "schedule.png")
    plt.close(figure)
    table = samples_table([7, 8], [1.5, 2.5], ["to be", "or not"])
    log_run(cfg, "arm", {"gen_ppl": {"mean": 3.0}}, {"samples": table}, {"schedule": tmp_path / "schedule.png"})
    [run] = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))  # the summary and history, in W&B's binary log
    [logged] = (run / "files" / "media" / "table").glob("samples_*.table.json")
    assert json.loads(logged.read_text())["data"] == [[7, 1.5, "to be"], [8, 2.5, "or not"]]
    assert list((run / "files" / "media" / "images").glob("schedule_*.png"))
