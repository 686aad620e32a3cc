"""Lightning training of any member of a family: MDLM denoisers and the autoregressive evaluator.

The module owns only what every model shares (optimizer, warmup, logging, deterministic validation noise);
what a loss is lives in an objective, so the denoisers and the evaluator are trained by the same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from adasched.training.diffusion import masked_nelbo

VALIDATION_SEED = 1234  # validation noise is the same for every model and every evaluation: paired numbers


def validation_generator(batch_idx: int, device: torch.device) -> torch.Generator:
    """The noise of validation batch ``batch_idx``: fixed, so every model is scored on the same corruptions."""
    return torch.Generator(device=device).manual_seed(VALIDATION_SEED + batch_idx)


class Objective(Protocol):
    """Loss in nats per token of a batch; ``generator`` makes the noise reproducible where there is any."""

    metric: str

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor: ...


class MaskedDiffusionObjective:
    """MDLM's NELBO (an upper bound on the NLL), in nats per token."""

    metric = "nelbo"

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        return masked_nelbo(model, batch["input_ids"], batch["attention_mask"], self.eps, generator)


class CausalLMObjective:
    """Next-token cross-entropy of a ``transformers`` causal LM, in nats per predicted token."""

    metric = "nll"

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then a cosine down to ``final_lr_ratio`` at ``total_steps``.

    ``final_lr_ratio=1`` keeps the LR constant after warmup (MDLM's schedule).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def exponential_moving_average(decay: float) -> WeightAveraging:
    """EMA of the weights after every step, updated with foreach kernels.

    Lightning's ``EMAWeightAveraging`` updates tensor by tensor: for the heavy model's 65 tensors on one CPU
    thread that is ~16 ms a step against ~2 ms here, for the same average.
    """
    return WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(decay))


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each repeated Transformer block in place (the denoisers' and GPT-2's).

    Compiling blocks rather than the whole model keeps the objectives free to call any part of the model
    (the MDLM loss projects only masked positions, a data-dependent shape) while the fused block kernels
    give the speed: with bf16 autocast on CPU, about 1.3x over eager at the heavy depth.
    """
    blocks = getattr(model, "blocks", None) or getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks or .transformer.h to compile")
    for block in blocks:
        block.compile()


class LanguageModelModule(L.LightningModule):
    """AdamW with warmup and cosine decay, train/validation loss logging, tokens and time kept."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 500,
        final_lr_ratio: float = 0.1,
        compile: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.final_lr_ratio = final_lr_ratio
        self.fused = fused
        if compile:
            compile_blocks(model)
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self._clock = time.perf_counter()

    def on_train_start(self) -> None:
        self._clock = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.objective(self.model, batch)
        self.tokens_seen += int(batch["attention_mask"].sum()) * self.trainer.world_size
        self.log(f"train/{self.objective.metric}", loss, prog_bar=True)
        self.log("train/tokens_seen", float(self.tokens_seen))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.objective(self.model, batch, validation_generator(batch_idx, self.device))
        tokens = batch["attention_mask"].sum()
        self.log(f"val/{self.objective.metric}", loss, prog_bar=True, batch_size=int(tokens), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        # fused: one kernel for all tensors; on a CPU thread ~4 ms a step for the heavy, ~18 ms for torch's default.
        # Not under fp16 loss scaling, where a fused step unscales the gradients itself, after clipping would have run.
        fused = self.fused and self.trainer.precision != "16-mixed"
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, fused=fused
        )
        total, warmup, final = self.trainer.max_steps, self.warmup_steps, self.final_lr_ratio
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, final))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip a fused optimizer's gradients here: Lightning refuses to under any mixed precision, for fp16 loss
        scaling's sake, but a fused optimizer only runs without a scaler (``configure_optimizers``)."""
        if not optimizer.defaults.get("fused") or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.model.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self._clock
        self._clock = now
        checkpoint["adasched"] = {"tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("adasched", {})
        self.tokens_seen = state.get("tokens_seen", 0)
        self.train_seconds = state.get("train_seconds", 0.0)

    def elapsed_seconds(self) -> float:
        """Training wall time over all resumed runs, up to now."""
        return self.train_seconds + time.perf_counter() - self._clock


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, loader: Iterable[dict[str, torch.Tensor]], device: torch.device | str = "cpu") -> float:
    """Token-weighted validation loss of ``model`` with the same fixed noise as ``validation_step``."""
    model.eval().to(device)
    total, tokens = 0.0, 0
    for batch_idx, batch in enumerate(loader):
        batch = {key: value.to(device) for key, value in batch.items()}
        count = int(batch["attention_mask"].sum())
        total += float(objective(model, batch, validation_generator(batch_idx, torch.device(device)))) * count
        tokens += count
    return total / tokens
