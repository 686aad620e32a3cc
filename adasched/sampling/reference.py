"""Samplers that step all rows through every step together, as MDLM's code does: the reference, and the step sampler.

The reference sampler is MDLM's ancestral sampler without remasking, as MDLM's code runs it.

A batch steps through every one of the ``num_steps`` steps together. Every step draws which masked
positions reveal (the REVEAL stream, step by step, not the event-driven sampler's precomputed plan), runs
the chosen model on every row, projects every position to the vocabulary and draws a token for every
masked position, keeping those that reveal. Like MDLM's ``ddpm_cache`` it re-uses the last prediction
while the batch has not changed (and the model, for a time-independent model, is the same). It shares
``Trajectory`` and ``random_streams`` with the event-driven sampler so the two give identical tokens; it
is here for tests and benchmarks, not for use.

The step sampler is adasched's first fast sampler, kept as the event-driven sampler's benchmark baseline:
MDLM's loop over every step, where only rows that reveal run a model and only revealed positions are
projected.
"""

from __future__ import annotations

from functools import partial

import torch

from adasched.sampling.random_streams import REVEAL, uniforms
from adasched.sampling.trajectory import (
    PROBE_STATISTICS,
    StepCounts,
    StepRows,
    Trajectory,
    probe_statistics,
    sample,
)


class LockstepTrajectory(Trajectory):
    """Batches of ``batch_size`` samples, each batch through all ``num_steps`` steps together."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.next_sample, self.step = 0, self.spec.last_step
        self.start_batch()

    def start_batch(self) -> None:
        """Load the next ``batch_size`` samples (fewer at the end) and restart the step count."""
        count = min(self.spec.batch_size, self.num_samples - self.next_sample)
        if count <= 0:
            return
        self.slots = torch.arange(count)
        self.device_slots = self.to_device(self.slots)
        self.load(self.slots, torch.arange(self.next_sample, self.next_sample + count))
        self.next_sample += count
        self.step = 0

    @property
    def done(self) -> bool:
        return self.step == self.spec.last_step and self.next_sample == self.num_samples

    @property
    def total_steps(self) -> int:
        return -(-self.num_samples // self.spec.batch_size) * self.spec.last_step

    def next_rows(self) -> StepRows:
        """Every row of the batch, its reveals drawn step by step on the device (and counted on the host: a wait
        per step, which the event-driven sampler does not have)."""
        masked = self.tokens[self.device_slots] == self.mask_id
        u = uniforms(self.row_seeds[self.device_slots], self.step, self.positions, REVEAL)
        reveal = masked & (u < 1.0 / (self.spec.num_steps - self.step))
        steps = torch.full((len(self.slots),), self.step)
        return StepRows(self.slots, steps, reveal.sum(1).cpu(), self.device_slots, self.to_device(steps), reveal)

    def after_step(self, rows: StepRows) -> None:
        self.step += 1
        if self.step == self.spec.last_step:
            self.unload(self.slots)
            self.start_batch()


class ReferenceTrajectory(LockstepTrajectory):
    """Full forwards and projections of every row at every step, with MDLM's cache."""

    _cached_logits: torch.Tensor | None = None  # (R, L, V) of the last forwards, while still valid
    _cached_action: torch.Tensor | None = None
    _probe_logits: torch.Tensor | None = None  # (R, L, V) of the probe model at this step

    def start_batch(self) -> None:
        super().start_batch()
        self._cached_logits = None

    def full_logits(self, model_index: int, slots: torch.Tensor, steps: torch.Tensor, probe: bool = False) -> torch.Tensor:
        everywhere = torch.arange(len(slots) * self.spec.seq_len, device=self.device)
        t = self.noise_level(steps)
        return self.forward(model_index, slots, t, everywhere, probe).view(len(slots), self.spec.seq_len, -1)

    def probe(self, rows: StepRows) -> torch.Tensor:
        self._probe_logits = self.full_logits(self.probe_model, rows.device_slots, rows.device_steps, probe=True)
        owners = rows.reveal.nonzero(as_tuple=True)[0]
        return probe_statistics(torch.softmax(self._probe_logits[rows.reveal].double(), -1), owners, len(rows.slots))

    def cache_is_valid(self, action: torch.Tensor) -> bool:
        time_dependent = any(self.models[m].config.time_conditioning for m in action.unique().tolist())
        return self._cached_logits is not None and torch.equal(action, self._cached_action) and not time_dependent

    def denoise(self, rows: StepRows, action: torch.Tensor, counts: StepCounts) -> torch.Tensor:
        slots, steps, reveal = rows.device_slots, rows.device_steps, rows.reveal
        if not self.cache_is_valid(action):
            logits = None
            for model_index in action.unique().tolist():
                mine = (action == model_index).nonzero(as_tuple=True)[0]
                if self._probe_logits is not None and model_index == self.probe_model:
                    part = self._probe_logits[mine]  # the probe already ran this model on these rows
                    self.charge_baseline(len(mine), len(mine) * self.spec.seq_len)
                else:
                    part = self.full_logits(model_index, slots[mine], steps[mine])
                if logits is None:
                    logits = torch.empty(len(slots), *part.shape[1:], dtype=part.dtype, device=self.device)
                logits[mine] = part
            self._cached_logits, self._cached_action = logits, action
        self._probe_logits = None
        masked = self.tokens[slots] == self.mask_id
        entropy = self.draw(self._cached_logits[masked], slots, steps, masked.flatten().nonzero().squeeze(1), keep=reveal[masked])
        if rows.reveal_count.any():
            self._cached_logits = None  # the batch changed: MDLM's cache is dropped
        return entropy


class StepTrajectory(LockstepTrajectory):
    """Every step, only the rows that reveal run their model (grouped), projecting only revealed positions."""

    def revealing(self, rows: StepRows) -> tuple[StepRows, torch.Tensor]:
        """The rows of ``rows`` that reveal something at this step, and their indices among ``rows`` (device)."""
        active = (rows.reveal_count > 0).nonzero(as_tuple=True)[0]
        device_active = self.to_device(active)
        subset = StepRows(
            rows.slots[active], rows.steps[active], rows.reveal_count[active],
            rows.device_slots[device_active], rows.device_steps[device_active], rows.reveal[device_active],
        )
        return subset, device_active

    def probe(self, rows: StepRows) -> torch.Tensor:
        active, device_active = self.revealing(rows)
        statistics = torch.full((len(rows.slots), len(PROBE_STATISTICS)), float("nan"), dtype=torch.float64, device=self.device)
        statistics[device_active] = self.probe_revealed(active)
        return statistics

    def denoise(self, rows: StepRows, action: torch.Tensor, counts: StepCounts) -> torch.Tensor:
        active, device_active = self.revealing(rows)
        entropy = torch.full((len(rows.slots),), float("nan"), dtype=torch.float64, device=self.device)
        if len(active.slots):
            entropy[device_active] = self.denoise_revealed(active, action[device_active], counts)
        return entropy


# Same contract as ``adasched.sampling.trajectory.sample``, with MDLM's full forwards / the step sampler.
reference_sample = partial(sample, trajectory_type=ReferenceTrajectory)
step_sample = partial(sample, trajectory_type=StepTrajectory)
