"""``step_importance(cfg)``: the paper's step-importance analysis (sec. 4.1, Fig. 5 and 6) on a model family.

Compares each light model with the heavy reference on the same corrupted held-out blocks at every t of a
grid (see ``adasched.analysis.step_importance``) and writes into the run directory: step_importance.csv (one row per
t and light model), step_importance.json (settings, every curve, the t of each peak) and the two figures,
loss_difference.png (Fig. 5) and kl_relative.png (Fig. 6); then logs them to W&B.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from tqdm.auto import tqdm

from adasched.analysis.comparison import format_table, to_csv
from adasched.analysis.plots import MODEL_COLORS, save_figure
from adasched.analysis.run_logging import log_run
from adasched.analysis.step_importance import (
    StepImportance,
    choose_sequences,
    peak_times,
    score_sequences,
    summarize,
    table_rows,
    time_grid,
)
from adasched.data.tokenizer import load_tokenizer
from adasched.errors import ConfigError
from adasched.io import write_json_atomic, write_text_atomic
from adasched.compute import resolve_device
from adasched.models.dit import MDLMDenoiser
from adasched.models.family import denoiser_names, load_family

SHOWN_COLUMNS = ("t", "light", "loss_diff", "kl", "kl_baseline", "kl_relative")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid; it must be a positive integer")


def validate(cfg: DictConfig) -> None:
    """Fail on a bad value before any model or data loads."""
    if not isinstance(cfg.light_models, ListConfig) or not cfg.light_models:
        raise ConfigError(f"light_models={cfg.light_models!r} is invalid; give a non-empty list of model folders, such as [light]")
    time_grid(cfg.num_times)
    check_positive_int("num_sequences", cfg.num_sequences)
    check_positive_int("batch_size", cfg.batch_size)
    available = denoiser_names(Path(cfg.family.dir))
    for key, names in (("reference", [cfg.reference]), ("baseline", [cfg.baseline]), ("light_models", list(cfg.light_models))):
        for name in names:
            if name not in available:
                raise ConfigError(
                    f"{key} names {name!r}, which has no denoiser folder in {cfg.family.dir}; "
                    f"choose from: {', '.join(available) or 'none (no denoiser folders there)'}"
                )


def load_models(cfg: DictConfig, device: torch.device) -> dict[str, MDLMDenoiser]:
    """Reference, baseline and light models by name, each loaded once (a name may fill several roles)."""
    names = dict.fromkeys([cfg.reference, cfg.baseline, *cfg.light_models])
    family_dir = Path(cfg.family.dir)
    return {name: model.to(device) for name, model in load_family({name: family_dir / name for name in names}).items()}


def validation_blocks(cfg: DictConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (N, L) of the held-out blocks, built (and cached) as for training."""
    datamodule = instantiate(cfg.data.module, corpus=instantiate(cfg.data.corpus), tokenizer=tokenizer)
    datamodule.setup()
    blocks = datamodule.blocks["validation"]
    return torch.as_tensor(blocks["input_ids"][:]), torch.as_tensor(blocks["attention_mask"][:])


def as_list(values: torch.Tensor) -> list[float | None]:
    """JSON-safe values: NaN (no sequence had a masked position) becomes null."""
    return [None if math.isnan(value) else value for value in values.tolist()]


def results_payload(cfg: DictConfig, result: StepImportance, models: dict[str, MDLMDenoiser], device: torch.device, wall_s: float) -> dict[str, Any]:
    curves = {
        "loss": result.loss, "loss_diff": result.loss_diff, "loss_diff_ci95": result.loss_diff_ci95, "kl": result.kl,
        "kl_relative": result.kl_relative, "kl_relative_ci95": result.kl_relative_ci95,
    }
    return {
        "family": {"dir": str(cfg.family.dir), "n_blocks": {name: model.config.n_blocks for name, model in models.items()}},
        "reference": result.reference,
        "baseline": result.baseline,
        "light_models": list(cfg.light_models),
        "num_sequences": cfg.num_sequences,
        "num_times": cfg.num_times,
        "seq_len": cfg.data.seq_len,
        "seed": cfg.seed,
        "device": str(device),
        "t": result.times.tolist(),
        "sequences": result.sequences.tolist(),
        **{key: {name: as_list(curve) for name, curve in per_model.items()} for key, per_model in curves.items()},
        "kl_baseline": as_list(result.kl_baseline),
        "peak_t": peak_times(result),
        "wall_s": wall_s,
    }


def plot_curves(
    result: StepImportance, curves: dict[str, torch.Tensor], half_widths: dict[str, torch.Tensor], depths: dict[str, int], ylabel: str, path: Path
) -> Path:
    """One curve (95% band shaded) per light model against t, from t = 1 (fully masked) on the left, as the paper."""
    figure, axis = plt.subplots(figsize=(6, 4))
    t = result.times.numpy()
    for i, (name, curve) in enumerate(curves.items()):
        color = MODEL_COLORS[(i + 1) % len(MODEL_COLORS)]
        axis.plot(t, curve.numpy(), marker="o", markersize=3, color=color, label=f"{name} ({depths[name]} blocks)")
        axis.fill_between(t, (curve - half_widths[name]).numpy(), (curve + half_widths[name]).numpy(), color=color, alpha=0.2)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xlim(1.0, 0.0)
    axis.set_xlabel("t (1 = fully masked, start of sampling)")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(title=f"vs {result.reference} ({depths[result.reference]} blocks)")
    return save_figure(figure, path)


def step_importance(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg)
    device = resolve_device(cfg.device)
    models = load_models(cfg, device)
    x, attention_mask = validation_blocks(cfg, load_tokenizer(cfg.family.tokenizer))
    chosen = choose_sequences(len(x), cfg.num_sequences, cfg.seed)
    times = time_grid(cfg.num_times)
    start = time.perf_counter()
    with tqdm(total=len(times) * -(-len(chosen) // cfg.batch_size), desc="step importance", unit="batch") as bar:
        scores = score_sequences(models, cfg.reference, x[chosen], attention_mask[chosen], times, cfg.seed, cfg.batch_size, bar.update)
    result = summarize(scores, cfg.baseline, list(cfg.light_models))
    payload = results_payload(cfg, result, models, device, time.perf_counter() - start)
    rows = table_rows(result)

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "step_importance.csv", to_csv(rows, list(rows[0])))
    write_json_atomic(run_dir / "step_importance.json", payload)
    depths = payload["family"]["n_blocks"]
    images = {
        "loss_difference": plot_curves(result, result.loss_diff, result.loss_diff_ci95, depths, "mean |loss difference| (nats)", run_dir / "loss_difference.png"),
        "kl_relative": plot_curves(
            result, result.kl_relative, result.kl_relative_ci95, depths, f"KL - KL({result.reference} || {result.baseline}) (nats)", run_dir / "kl_relative.png"
        ),
    }
    columns = list(rows[0])
    log_run(cfg, cfg.logger.name, payload, {"step_importance": (columns, [[row[c] for c in columns] for row in rows])}, images)
    print(format_table([{c: round(v, 4) if isinstance(v, float) else v for c, v in row.items()} for row in rows], SHOWN_COLUMNS))
    return payload
