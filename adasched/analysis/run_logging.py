"""Weights & Biases logging of a sampling run: config, flat metrics, samples as a Table, the schedule.

Runs of one experiment share a W&B group, so the project page compares them side by side; offline runs
are synced later with ``wandb sync``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import wandb
from omegaconf import DictConfig, OmegaConf

from adasched.compute import AUTO, resolve_device, resolve_precision

Table = tuple[list[str], list[list[Any]]]  # columns, rows


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


def samples_table(seeds: list[int], nll: list[float], texts: list[str]) -> Table:
    """Generated samples as rows (seed, evaluator NLL, text): rerun any one alone with its seed."""
    return ["seed", "nll", "text"], [[s, n, t] for s, n, t in zip(seeds, nll, texts)]


def rows_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> Table:
    """A report's rows (e.g. the Pareto table) as W&B wants a Table: one type per column, so a blank cell is None and
    a column mixing numbers with text (an iso-quality saving of ">max") is text."""
    texts = {column for column in columns if any(isinstance(row[column], str) and row[column] != "" for row in rows)}
    return list(columns), [[None if row[c] == "" else str(row[c]) if c in texts else row[c] for c in columns] for row in rows]


def with_resolved_precision(cfg: DictConfig) -> dict[str, Any]:
    """The whole config, with ``sampling.precision: auto`` replaced by what it chose on this machine."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if "sampling" in config and config["sampling"].get("precision") == AUTO:
        config["sampling"]["precision"] = resolve_precision(AUTO, resolve_device(cfg.get("device", "auto")))
    return config


def log_run(cfg: DictConfig, name: str, results: Mapping[str, Any], tables: Mapping[str, Table], images: Mapping[str, Path]) -> None:
    """One W&B run named ``name`` in the experiment's group: the config, ``results`` as summary, ``tables``
    (name -> (columns, rows)) as W&B Tables and ``images`` (name -> PNG)."""
    if cfg.logger.mode == "disabled":
        return
    run = wandb.init(
        project=cfg.logger.project, group=cfg.logger.group, name=name, mode=cfg.logger.mode,
        dir=str(cfg.run_dir), config=with_resolved_precision(cfg), reinit="finish_previous",
    )
    run.summary.update(flatten(results))
    logged = {key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in tables.items()}
    run.log({**logged, **{key: wandb.Image(str(png)) for key, png in images.items()}})
    run.finish()
