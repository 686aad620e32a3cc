"""Validation loss against tokens seen: recorded at every validation, shipped with every model, plotted.

A training's curve is what says whether it was long enough: ``plateau`` measures what the last fraction
of training still gained, and whether the loss had started to rise (then the best checkpoint is shipped).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L

from adasched.io import write_text_atomic

CURVE_FILE = "learning_curve.csv"
CURVE_PLOT = "learning_curve.png"


@dataclass(frozen=True)
class CurvePoint:
    """One validation: where training stood and what the (EMA) weights scored."""

    step: int
    tokens_seen: int
    train_seconds: float
    lr: float
    val_loss: float  # nats per token: NELBO for denoisers, NLL for the evaluator


def write_curve(path: Path, points: Sequence[CurvePoint]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(CurvePoint)])
    writer.writeheader()
    writer.writerows(asdict(point) for point in points)
    write_text_atomic(path, buffer.getvalue())


def read_curve(path: Path) -> list[CurvePoint]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            CurvePoint(int(row["step"]), int(row["tokens_seen"]), float(row["train_seconds"]), float(row["lr"]), float(row["val_loss"]))
            for row in csv.DictReader(handle)
        ]


def plateau(points: Sequence[CurvePoint], last_fraction: float = 0.2) -> dict[str, Any]:
    """What the last ``last_fraction`` of training (in tokens) gained, and whether the loss had turned up.

    ``gain_last`` is the best loss before that window minus the best loss within it (nats/token, positive
    when training still helped); ``rising`` says the final loss is above the best one.
    """
    if not points:
        return {}
    cut = points[-1].tokens_seen * (1.0 - last_fraction)
    before = [p.val_loss for p in points if p.tokens_seen <= cut]
    within = [p.val_loss for p in points if p.tokens_seen > cut]
    best = min(points, key=lambda p: p.val_loss)
    return {
        "last_fraction": last_fraction,
        "gain_last": round(min(before) - min(within), 4) if before and within else None,
        "rising": points[-1].val_loss > best.val_loss,
        "best_step": best.step,
        "best_val_loss": best.val_loss,
    }


class LearningCurve(L.Callback):
    """Appends a ``CurvePoint`` after every validation to ``path`` (rewritten atomically; resumes cleanly).

    On resume the rows past the checkpoint's step are dropped: they belong to steps that will be redone.
    """

    def __init__(self, path: Path, metric: str) -> None:
        self.path = Path(path)
        self.metric = metric
        self.points: list[CurvePoint] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # after a resume's restore
        previous = read_curve(self.path) if self.path.exists() else []
        self.points = [p for p in previous if p.step <= trainer.global_step]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get(f"val/{self.metric}")
        if loss is None:
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.points.append(
            CurvePoint(trainer.global_step, pl_module.tokens_seen, round(pl_module.elapsed_seconds(), 1), lr, round(float(loss), 5))
        )
        write_curve(self.path, self.points)
