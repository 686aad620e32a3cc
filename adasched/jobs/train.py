"""``train(cfg)``: train one member of a family from a composed Hydra config, resumably, and export it.

A plain function (the ``@hydra.main`` wrapper lives in ``experiments/train.py``) so tests can call it with a
composed, shrunken config.
"""

from __future__ import annotations

import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from adasched.analysis.plots import plot_learning_curves
from adasched.data.tokenizer import load_or_train_tokenizer
from adasched.errors import ConfigError
from adasched.io import write_json_atomic
from adasched.models.dit import MDLMDenoiser
from adasched.models.export import METADATA_FILE, export_model
from adasched.options import LOGGER_MODES
from adasched.training.learning_curve import (
    CURVE_FILE,
    CURVE_PLOT,
    LearningCurve,
    plateau,
)
from adasched.training.module import (
    LanguageModelModule,
    evaluate,
    exponential_moving_average,
)


def validate(cfg: DictConfig) -> None:
    """Fail early, on one line, on values Lightning or wandb would reject late or silently reinterpret."""
    max_steps = cfg.trainer.max_steps
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={max_steps!r} is invalid; it must be a positive integer")
    if cfg.logger.mode not in LOGGER_MODES:
        raise ConfigError(f"logger.mode={cfg.logger.mode!r} is invalid; choose one of {', '.join(LOGGER_MODES)}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay={cfg.ema_decay} must lie in (0, 1)")
    if cfg.checkpoint_every_n_steps <= 0:
        raise ConfigError(f"checkpoint_every_n_steps={cfg.checkpoint_every_n_steps} must be a positive integer")
    for field in ("threads", "early_stopping_patience"):
        value = cfg[field]
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{field}={value!r} is invalid; it must be a positive integer or null")
    if not cfg.export_dir:
        raise ConfigError(f"export_dir={cfg.export_dir!r} is invalid; it must name the folder the trained model is exported to")
    for field in ("compile", "fused"):
        if not isinstance(cfg.optim[field], bool):
            raise ConfigError(f"optim.{field}={cfg.optim[field]!r} is invalid; it must be true or false")


def resume_checkpoint(checkpoint_dir: Path, resume: bool) -> str | None:
    """The checkpoint to continue from; a fresh start never overwrites an earlier run's checkpoints."""
    last = checkpoint_dir / "last.ckpt"
    if not last.exists():
        return None
    if not resume:
        raise ConfigError(
            f"{checkpoint_dir} already holds a run; pass resume=true to continue it or another run_name to start anew"
        )
    return str(last)


EARLY_STOP_FILE = "stopped_early.json"


def max_steps_after_early_stop(run_dir: Path, max_steps: int) -> int:
    """The step a resumed run stops at: where early stopping ended it, if it did, so a rerun only re-exports.

    Without this a rerun would restore the early-stopping state and train until the next validation.
    """
    marker = run_dir / EARLY_STOP_FILE
    return json.loads(marker.read_text())["step"] if marker.exists() else max_steps


def restore_best(module: LanguageModelModule, best_path: str) -> int:
    """Load the (EMA) weights of the best validation checkpoint into ``module``; returns its step.

    Long runs on a small corpus end past their best validation loss; shipping the best keeps them honest.
    Without a best checkpoint (no validation ran) the final weights stay.
    """
    if not best_path:
        return module.trainer.global_step
    checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)  # tensors and plain types only
    module.load_state_dict(checkpoint["state_dict"])  # WeightAveraging saves the averaged weights here
    return int(checkpoint["global_step"])


def command_line() -> str:
    """The command that reproduces this run (its Hydra overrides, when run through Hydra)."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["python experiments/train.py", *overrides])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model on the configured corpus; returns the metadata written next to the export."""
    validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    corpus = instantiate(cfg.data.corpus)
    tokenizer = load_or_train_tokenizer(
        cfg.tokenizer.kind, cfg.tokenizer.path, cfg.tokenizer.vocab_size, lambda: corpus.load()["train"]["text"]
    )
    datamodule = instantiate(cfg.data.module, corpus=corpus, tokenizer=tokenizer)
    model = instantiate(cfg.model.net, tokenizer=tokenizer, seq_len=cfg.data.seq_len)
    objective = instantiate(cfg.model.objective)
    module = LanguageModelModule(model, objective, **cfg.optim)

    checkpoint_dir = run_dir / "checkpoints"
    ckpt_path = resume_checkpoint(checkpoint_dir, cfg.resume)
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=f"val/{objective.metric}", mode="min", save_top_k=1)
    curve = LearningCurve(run_dir / CURVE_FILE, objective.metric)
    callbacks = [
        exponential_moving_average(cfg.ema_decay),
        curve,
        ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, every_n_train_steps=cfg.checkpoint_every_n_steps),
        best,
        LearningRateMonitor(logging_interval="step"),
    ]
    early_stopping = None
    if cfg.early_stopping_patience is not None:  # past its best on a small corpus, a run only overfits
        early_stopping = EarlyStopping(monitor=f"val/{objective.metric}", mode="min", patience=cfg.early_stopping_patience)
        callbacks.append(early_stopping)
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))  # plain text: readable in logs and on clusters
    loggers = [CSVLogger(run_dir, name="metrics", version="")]  # CSV: curves offline too, and without wandb
    if cfg.logger.mode != "disabled":
        loggers.append(instantiate(cfg.logger))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the W&B config is the whole config
    max_steps = max_steps_after_early_stop(run_dir, cfg.trainer.max_steps) if ckpt_path else cfg.trainer.max_steps
    trainer: L.Trainer = instantiate(cfg.trainer, max_steps=max_steps, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    trainer.save_checkpoint(checkpoint_dir / "last.ckpt")  # max_time may stop between periodic saves
    if early_stopping is not None and early_stopping.wait_count >= early_stopping.patience and trainer.is_global_zero:
        write_json_atomic(run_dir / EARLY_STOP_FILE, {"step": trainer.global_step, "best": float(early_stopping.best_score)})

    if not trainer.is_global_zero:
        return {}
    exported_step = restore_best(module, best.best_model_path) if cfg.export_best else trainer.global_step
    metadata = {
        "name": cfg.model.name,
        "command": command_line(),
        "steps": trainer.global_step,
        "max_steps": cfg.trainer.max_steps,
        "stopped_early": (run_dir / EARLY_STOP_FILE).exists(),
        "exported_step": exported_step,
        "tokens_seen": module.tokens_seen,
        "train_wall_seconds": round(module.elapsed_seconds(), 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": cfg.seed,
        "corpus": cfg.data.name,
        "seq_len": cfg.data.seq_len,
        "vocab_size": len(tokenizer),
        "ema_decay": cfg.ema_decay,
        "precision": str(cfg.trainer.precision),
        "learning_curve": CURVE_FILE,
        "plateau": plateau(curve.points),
        "export_dtype": cfg.export_dtype,
        "trained_on": f"{platform.machine()} {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
        "torch": torch.__version__,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if isinstance(model, MDLMDenoiser):
        metadata["n_blocks"] = model.config.n_blocks
        metadata["flops_per_forward_full_projection"] = model.flops_per_forward(cfg.data.seq_len, cfg.data.seq_len)
    export_dir = export_model(model, cfg.export_dir, cfg.export_dtype, metadata)  # the family's one tokenizer stays at tokenizer.path
    if curve.points:
        shutil.copyfile(run_dir / CURVE_FILE, export_dir / CURVE_FILE)
        plot_learning_curves({cfg.model.name: curve.points}, export_dir / CURVE_PLOT, f"{cfg.model.name} ({cfg.data.name})")
    # Score the exported (16-bit) weights themselves, so the number shipped is the number of the files shipped.
    exported = type(model).from_pretrained(str(export_dir)).float()
    metadata[f"val_{objective.metric}_nats_per_token"] = round(evaluate(exported, objective, datamodule.val_dataloader(), module.device), 4)
    write_json_atomic(export_dir / METADATA_FILE, metadata)
    print(f"exported {cfg.model.name} to {export_dir}: val {objective.metric} {metadata[f'val_{objective.metric}_nats_per_token']} nats/token")
    return metadata
