"""Weights & Biases logging of a sampling run: config, flat metrics, samples as a Table, the schedule.

Runs of one experiment share a W&B group, so the project page compares them side by side; offline runs
are synced later with ``wandb sync``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import wandb
from omegaconf import DictConfig, OmegaConf


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested results as ``a/b/c`` keys (what W&B charts and compares)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def log_run(cfg: DictConfig, results: dict[str, Any], texts: list[str], nll: list[float], seeds: list[int], schedule_png: Path) -> None:
    if cfg.logger.mode == "disabled":
        return
    run = wandb.init(
        project=cfg.logger.project, group=cfg.logger.group, name=cfg.logger.name, mode=cfg.logger.mode,
        dir=str(cfg.run_dir), config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
    )
    run.summary.update(flatten(results))
    run.log(
        {
            "samples": wandb.Table(columns=["seed", "nll", "text"], data=[[s, n, t] for s, n, t in zip(seeds, nll, texts)]),
            "schedule": wandb.Image(str(schedule_png)),
        }
    )
    run.finish()
