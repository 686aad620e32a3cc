"""``benchmark_training(cfg)``: training tokens/s of each recipe at each member depth, in one process.

Each cell builds a fresh denoiser of that depth and runs the real training loop (Lightning, the EMA of the
weights, the family's data loader) for ``warmup_steps + timed_steps`` steps; only the last ``timed_steps``
are timed, so ``torch.compile``'s first-step compilation stays out of the figure. Validation and
checkpointing are off in every cell alike. Recipes differ only in what the config says (precision,
compilation, dropout, whether the optimizer and the EMA update all tensors at once), so the ratio between them is what changing the recipe buys on this machine.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EMAWeightAveraging
from omegaconf import DictConfig, OmegaConf

from adasched.data.tokenizer import load_or_train_tokenizer
from adasched.errors import ConfigError
from adasched.io import write_json_atomic
from adasched.training.module import LanguageModelModule, exponential_moving_average


RECIPE_KEYS = ("precision", "compile", "dropout", "fused_loop")  # what a recipe sets; the rest of the loop is shared


class StepTimer(L.Callback):
    """Wall clock and tokens over the training steps after the first ``skip``."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.start: float | None = None
        self.tokens_at_start = 0
        self.seconds = 0.0
        self.tokens = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.skip:
            self.start, self.tokens_at_start = time.perf_counter(), pl_module.tokens_seen

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start
            self.tokens = pl_module.tokens_seen - self.tokens_at_start


def time_recipe(cfg: DictConfig, recipe: DictConfig, n_blocks: int, datamodule: L.LightningDataModule, tokenizer: Any) -> dict[str, Any]:
    """Tokens/s of one (recipe, depth) cell."""
    L.seed_everything(cfg.seed)
    model = instantiate(cfg.model.net, tokenizer=tokenizer, seq_len=cfg.data.seq_len, n_blocks=n_blocks, dropout=recipe.dropout)
    module = LanguageModelModule(
        model, instantiate(cfg.model.objective), lr=cfg.lr, warmup_steps=1, compile=recipe.compile, fused=recipe.fused_loop
    )
    ema = exponential_moving_average(0.995) if recipe.fused_loop else EMAWeightAveraging(decay=0.995)
    timer = StepTimer(cfg.warmup_steps)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=recipe.precision, max_steps=cfg.warmup_steps + cfg.timed_steps,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[ema, timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return {"n_blocks": n_blocks, "tokens_per_second": round(timer.tokens / timer.seconds, 1), "timed_tokens": timer.tokens, "seconds": round(timer.seconds, 2)}


def benchmark_training(cfg: DictConfig) -> dict[str, Any]:
    """Time every recipe at every depth; write ``benchmark_training.json`` with the ratio to ``baseline``."""
    if cfg.baseline not in cfg.recipes:
        raise ConfigError(f"baseline={cfg.baseline!r} is not a recipe; choose one of {', '.join(cfg.recipes)}")
    for name, recipe in cfg.recipes.items():
        missing = [key for key in RECIPE_KEYS if key not in recipe]
        if missing:
            raise ConfigError(f"recipes.{name} lacks {', '.join(missing)}; a recipe sets each of {', '.join(RECIPE_KEYS)}")
    if cfg.warmup_steps < 1 or cfg.timed_steps < 1:
        raise ConfigError(f"warmup_steps={cfg.warmup_steps} and timed_steps={cfg.timed_steps} must both be >= 1")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_or_train_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path, cfg.tokenizer.vocab_size, None)
    datamodule = instantiate(cfg.data.module, corpus=instantiate(cfg.data.corpus), tokenizer=tokenizer)
    datamodule.setup()
    cells = []
    for n_blocks in cfg.depths:
        for name, recipe in cfg.recipes.items():
            cell = {"recipe": name, **time_recipe(cfg, recipe, n_blocks, datamodule, tokenizer)}
            cells.append(cell)
            print(f"  {n_blocks} blocks  {name:<6} {cell['tokens_per_second']:8.0f} tokens/s", flush=True)
    baseline = {c["n_blocks"]: c["tokens_per_second"] for c in cells if c["recipe"] == cfg.baseline}
    for cell in cells:
        cell["ratio_to_baseline"] = round(cell["tokens_per_second"] / baseline[cell["n_blocks"]], 3)
    result = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "cells": cells,
    }
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(cfg.run_dir) / "benchmark_training.json", result)
    return result
