"""``SamplingSpec``: how to sample, in one value that every sampler, job and environment shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser


@dataclass(frozen=True)
class SamplingSpec:
    """The settings of a sampling run; checked on construction, before any model runs."""

    num_steps: int  # denoising steps from t = 1 to t = 0
    seq_len: int  # tokens per sample, the prompt included
    batch_size: int = 16  # rows sampled together (the event-driven sampler refills a finished row's slot)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens holding this much mass (1: all)
    stop_step: int | None = None  # stop before this step, leaving later reveals masked (benchmark slices); None: the end

    def __post_init__(self) -> None:
        for name in ("num_steps", "seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"sampling.{name}={value!r} is invalid; it must be a positive integer")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p} is invalid; it must lie in (0, 1]")
        if self.stop_step is not None and not 0 < self.stop_step <= self.num_steps:
            raise ConfigError(f"stop_step={self.stop_step} must lie in [1, num_steps={self.num_steps}]")

    @property
    def last_step(self) -> int:
        """The step after the last one sampled."""
        return self.num_steps if self.stop_step is None else self.stop_step

    def check(self, models: Sequence[MDLMDenoiser], prompts: torch.Tensor | None = None) -> None:
        """One-line errors for a length the models cannot take or a prompt that leaves nothing to generate."""
        if self.seq_len > models[0].config.seq_len:
            raise ConfigError(f"sampling.seq_len={self.seq_len} must lie in [1, {models[0].config.seq_len}] (the models' length)")
        if prompts is not None and prompts.shape[1] >= self.seq_len:
            raise ConfigError(f"prefix length {prompts.shape[1]} leaves nothing to generate at seq_len={self.seq_len}")
