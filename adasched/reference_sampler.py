"""The reference sampler: MDLM's ancestral sampler without remasking, as MDLM's code runs it.

Every step it runs the chosen model on the whole batch, projects every position to the vocabulary and
draws a token for every masked position, keeping those that reveal. Like MDLM's ``ddpm_cache`` it re-uses
the last prediction while the batch has not changed (and the model, for a time-independent model, is the
same). It shares ``Trajectory`` and ``random_streams`` with ``adasched.sampling`` so the two give identical
tokens; it is here for tests and benchmarks, not for use.
"""

from __future__ import annotations

from functools import partial

import torch

from adasched.random_streams import TOKEN, uniforms
from adasched.sampling import Trajectory, mean_entropy_per_row, sample, sample_categorical
from policies.base import ENTROPY


class ReferenceTrajectory(Trajectory):
    """Full forwards and full projections on every row, with MDLM's cache while nothing changes."""

    _cached_logits: torch.Tensor | None = None  # (B, L, V) of the last forwards, while still valid
    _cached_action: torch.Tensor | None = None
    _probe_logits: torch.Tensor | None = None  # (B, L, V) of the probe model at this step

    def full_logits(self, model_index: int, rows: torch.Tensor, t: float, probe: bool = False) -> torch.Tensor:
        everywhere = torch.ones(len(rows), self.tokens.shape[1], dtype=torch.bool, device=self.device)
        return self.forward(model_index, rows, self.row_times(t), everywhere, probe).view(len(rows), self.tokens.shape[1], -1)

    def probe(self, reveal: torch.Tensor, t: float) -> torch.Tensor:
        everyone = torch.arange(self.batch_size, device=self.device)
        self._probe_logits = self.full_logits(self.probe_model, everyone, t, probe=True)
        owner = everyone.repeat_interleave(reveal.sum(1))
        return mean_entropy_per_row(torch.softmax(self._probe_logits[reveal].double(), -1), owner, self.batch_size)

    def cache_is_valid(self, action: torch.Tensor) -> bool:
        time_dependent = any(self.models[m].config.time_conditioning for m in action.unique().tolist())
        return self._cached_logits is not None and torch.equal(action, self._cached_action) and not time_dependent

    def denoise(self, reveal: torch.Tensor, action: torch.Tensor, t: float) -> torch.Tensor:
        if not self.cache_is_valid(action):
            everyone = torch.arange(self.batch_size, device=self.device)
            logits = None
            for model_index in action.unique().tolist():
                rows = everyone[action == model_index]
                if self._probe_logits is not None and model_index == self.probe_model:
                    part = self._probe_logits[rows]  # the probe already ran this model on these rows
                    self.charge_baseline(torch.full((len(rows),), self.tokens.shape[1], device=self.device))
                else:
                    part = self.full_logits(model_index, rows, t)
                if logits is None:
                    logits = torch.empty(self.batch_size, *part.shape[1:], dtype=part.dtype, device=self.device)
                logits[rows] = part
            self._cached_logits, self._cached_action = logits, action
        self._probe_logits = None
        masked = self.masked
        u = uniforms(self.seeds, self.step, self.positions, TOKEN)
        drawn, probs = sample_categorical(self._cached_logits[masked], u[masked], self.top_p)
        keep = reveal[masked]  # which of the masked positions' draws reveal now
        self.write(reveal, drawn[keep])
        entropy = self.nan_per_row()
        if ENTROPY in self.features and keep.any():
            owner = torch.arange(self.batch_size, device=self.device).repeat_interleave(masked.sum(1))[keep]
            entropy = mean_entropy_per_row(probs[keep], owner, self.batch_size)
        if reveal.any():
            self._cached_logits = None  # the batch changed: MDLM's cache is dropped
        return entropy


# Same contract as ``adasched.sampling.sample``, with MDLM's full forwards.
reference_sample = partial(sample, trajectory_type=ReferenceTrajectory)
