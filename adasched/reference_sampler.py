"""The reference sampler: MDLM's ancestral sampler without remasking, as MDLM's code runs it.

Every step it runs the chosen model on the whole batch, projects every position to the vocabulary and
draws a token for every masked position, keeping those that reveal. Like MDLM's ``ddpm_cache`` it re-uses
the last prediction while the batch has not changed (and the model, for a time-independent model, is the
same). It shares ``random_streams`` with ``adasched.sampling.sample`` so the two give identical tokens; it is
here for tests and benchmarks, not for use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from adasched.costs import CostMeter
from adasched.models.dit import MDLMDenoiser
from adasched.random_streams import TOKEN, uniforms
from adasched.sampling import SampleOutput, Trajectory, check_sampling_args, mean_entropy_per_row, sample_categorical
from policies.base import ENTROPY, Policy


@torch.inference_mode()
def reference_sample(
    models: Sequence[MDLMDenoiser],
    policy: Policy,
    seeds: torch.Tensor,
    num_steps: int,
    seq_len: int,
    meter: CostMeter,
    prefix: torch.Tensor | None = None,
    top_p: float = 1.0,
    budget: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> SampleOutput:
    """Same contract as ``adasched.sampling.sample``."""
    check_sampling_args(models, num_steps, seq_len, top_p, prefix)
    path = Trajectory(models, seeds, num_steps, seq_len, prefix, budget)
    policy.reset(len(seeds), num_steps, len(models), seed=int(seeds[0]))
    batch = len(seeds)
    everyone = torch.arange(batch, device=path.device)
    cached_logits: torch.Tensor | None = None
    cached_action: torch.Tensor | None = None
    for step in range(num_steps):
        reveal = path.reveals(step)
        state, action = path.decide(policy, step, reveal, meter)
        reusable = (
            cached_logits is not None
            and torch.equal(action, cached_action)
            and not any(models[m].config.time_conditioning for m in action.unique().tolist())
        )
        if not reusable:
            dtype = next(models[0].parameters()).dtype
            cached_logits = torch.empty(batch, seq_len, models[0].config.vocab_size, dtype=dtype, device=path.device)
            t = torch.full((batch,), state.t, device=path.device)
            for model_index in action.unique().tolist():
                rows = everyone[action == model_index]
                with meter.timed(model_index, path.device):
                    cached_logits[rows] = models[model_index].project(models[model_index].hidden_states(path.tokens[rows], t[rows]))
                path.charge(meter, model_index, rows, torch.full((len(rows),), seq_len, device=path.device))
            cached_action = action
        masked = path.masked
        u = uniforms(seeds, step, path.positions, TOKEN)
        drawn, probs = sample_categorical(cached_logits[masked], u[masked], top_p)
        keep = reveal[masked]  # which of the masked positions' draws reveal now
        path.write(step, reveal, drawn[keep])
        entropy = torch.full((batch,), float("nan"), dtype=torch.float64, device=path.device)
        if ENTROPY in policy.features and keep.any():
            owner = everyone.repeat_interleave(masked.sum(1))[keep]
            entropy = mean_entropy_per_row(probs[keep], owner, batch)
        if reveal.any():
            cached_logits = None  # the batch changed: MDLM's cache is dropped
        path.finish(policy, state, action, reveal, entropy)
        if on_step is not None:
            on_step(1)  # progress: the caller's bar advances one step
    return path.output()
