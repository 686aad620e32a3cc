"""Path KL: how far a policy's sampler strays from the all-heavy sampler, measured exactly on its own samples.

Which positions reveal at a step does not depend on the model, and revealed tokens are drawn independently
given z_t. So for a policy's sampler Q and the all-heavy sampler P the KL between whole trajectories is

    KL(Q || P) = E_Q [ sum over steps, sum over positions revealed then, of KL(q(x0_i | z_t) || p_heavy(x0_i | z_t)) ]

with q the model the policy ran for that row at that step (the term is zero where that was the heavy model).
Evaluated along the policy's own samples with the analytic per-position KL this is an unbiased, low-variance
estimate; it upper-bounds the KL between the two samplers' final samples. It costs one heavy forward (and one
of the chosen model) at the revealed positions of every (sample, step) that ran another model; those forwards
are evaluation, counted apart from the policy's FLOPs and wall clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adasched.models.dit import MDLMDenoiser
from adasched.sampling.trajectory import nucleus


def categorical_kl(q_logits: torch.Tensor, p_logits: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """(N,) KL(q || p) in float64 between the distributions the sampler draws from (nucleus-truncated if top_p < 1).

    Tokens outside q's support add nothing; a token q can draw but p cannot makes the KL infinite.
    """
    q, p = nucleus(torch.softmax(q_logits.double(), -1), top_p), nucleus(torch.softmax(p_logits.double(), -1), top_p)
    q, p = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)
    terms = torch.where(q > 0, q * (q.log() - p.log()), 0.0)
    return terms.sum(-1)


@torch.inference_mode()
def step_kl(
    models: Sequence[MDLMDenoiser], tokens: torch.Tensor, t: torch.Tensor, reveal: torch.Tensor, action: torch.Tensor, top_p: float = 1.0
) -> tuple[torch.Tensor, float]:
    """Each row's path-KL increment for one step: the KL summed over its ``reveal`` positions of z_t ``tokens``.

    Rows on model 0 (heavy) add exactly 0 and run nothing. Returns (R,) float64 and the FLOPs the forwards cost.
    """
    increment = torch.zeros(len(tokens), dtype=torch.float64, device=tokens.device)
    t, action = t.to(tokens.device), action.to(tokens.device)  # a sampler's state and a policy's actions live on the host
    flops = 0.0
    seq_len = tokens.shape[1]
    heavy = models[0]
    for model_index in action.unique().tolist():
        if model_index == 0:
            continue
        rows = (action == model_index).nonzero(as_tuple=True)[0]
        positions = reveal[rows]
        chosen = models[model_index]
        q = chosen.project(chosen.hidden_states(tokens[rows], t[rows])[positions])
        p = heavy.project(heavy.hidden_states(tokens[rows], t[rows])[positions])
        owner = positions.nonzero(as_tuple=True)[0]
        increment[rows] = torch.zeros(len(rows), dtype=torch.float64, device=tokens.device).index_add_(0, owner, categorical_kl(q, p, top_p))
        projected = int(positions.sum())
        flops += len(rows) * (chosen.flops_per_forward(seq_len, 0) + heavy.flops_per_forward(seq_len, 0))
        flops += projected * (chosen.flops_per_forward(seq_len, 1) - chosen.flops_per_forward(seq_len, 0) + heavy.flops_per_forward(seq_len, 1) - heavy.flops_per_forward(seq_len, 0))
    return increment, flops


@dataclass
class PathKL:
    """Path KL of every sample (nats per sequence), its split over steps, and what measuring it cost."""

    per_sample: torch.Tensor  # (N,) float64
    per_step: torch.Tensor  # (num_steps,) float64 summed over samples: where along the trajectory a policy loses
    generated_tokens: int  # per sample: the positions the sampler generated (the prompt excluded)
    eval_flops: float  # FLOPs of the evaluation forwards (never charged to the policy)


def path_kl(
    models: Sequence[MDLMDenoiser], tokens: torch.Tensor, reveal_step: torch.Tensor, actions: torch.Tensor, top_p: float = 1.0, batch_size: int = 64
) -> PathKL:
    """Replay finished samples: at every (sample, step) that ran a model other than 0, rebuild z_t from the
    sample's tokens and reveal steps and add the step's KL. ``tokens``/``reveal_step`` (N, L), ``actions`` (T, N)."""
    num_steps, num_samples = actions.shape
    device = next(models[0].parameters()).device
    tokens, reveal_step, actions = tokens.to(device), reveal_step.to(device), actions.to(device)
    mask_id = models[0].config.mask_token_id
    steps, samples = ((actions > 0)).nonzero(as_tuple=True)
    per_sample = torch.zeros(num_samples, dtype=torch.float64, device=device)
    per_step = torch.zeros(num_steps, dtype=torch.float64, device=device)
    eval_flops = 0.0
    for start in range(0, len(steps), batch_size):
        step, sample = steps[start : start + batch_size], samples[start : start + batch_size]
        z = torch.where(reveal_step[sample] < step[:, None], tokens[sample], mask_id)  # the prompt's -1 is always revealed
        reveal = reveal_step[sample] == step[:, None]
        t = 1.0 - step.double() / num_steps
        increment, flops = step_kl(models, z, t, reveal, actions[step, sample], top_p)
        per_sample.index_add_(0, sample, increment)
        per_step.index_add_(0, step, increment)
        eval_flops += flops
    generated = int((reveal_step[0] >= 0).sum()) if num_samples else 0
    return PathKL(per_sample.cpu(), per_step.cpu(), generated, eval_flops)
