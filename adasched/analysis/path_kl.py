"""Path KL: how far a policy's sampler strays from the all-heavy sampler, measured exactly on its own samples.

Which positions reveal at a step does not depend on the model, and revealed tokens are drawn independently
given z_t. So for a policy's sampler Q and the all-heavy sampler P the KL between whole trajectories is

    KL(Q || P) = E_Q [ sum over steps, sum over positions revealed then, of KL(q(x0_i | z_t) || p_heavy(x0_i | z_t)) ]

with q the model the policy ran for that row at that step (the term is zero where that was the heavy model).
Evaluated along the policy's own samples with the analytic per-position KL this is an unbiased, low-variance
estimate; it upper-bounds the KL between the two samplers' final samples. It costs one heavy forward (and one
of the chosen model) at the revealed positions of every (sample, step) that ran another model; those forwards
are evaluation, counted apart from the policy's FLOPs and wall clock.

Path KL charges for being *another* network, not only a worse one: a second heavy trained from another seed,
as good as the heavy, costs most of a light sandwich's path KL in its light slots. The floor is what such a
seed baseline (never a choice of the policy) costs at the very steps and positions the policy gave away,
KL(q_seed || p_heavy) there; path KL minus the floor (the excess) is what the policy loses beyond it.
Measuring the floor costs one more forward per (sample, step), the heavy's logits being shared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from adasched.models.dit import MDLMDenoiser
from adasched.sampling.trajectory import nucleus


def sampler_log_probs(logits: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """(N, V) float64 log-probabilities of the distribution the sampler draws from (nucleus-truncated and
    renormalized if top_p < 1): computed once per model, they serve every KL taken against it."""
    log_probs = torch.log_softmax(logits.double(), -1)
    if top_p >= 1.0:
        return log_probs
    log_probs = log_probs.masked_fill(nucleus(log_probs.exp(), top_p) == 0, -math.inf)
    return log_probs - torch.logsumexp(log_probs, -1, keepdim=True)


def log_prob_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """(N,) KL(q || p) from ``sampler_log_probs``: tokens q cannot draw add nothing; one that q can draw but p
    cannot makes the KL infinite."""
    return torch.where(log_q > -math.inf, log_q.exp() * (log_q - log_p), 0.0).sum(-1)


def categorical_kl(q_logits: torch.Tensor, p_logits: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """(N,) KL(q || p) in float64 between the distributions the sampler draws from (nucleus-truncated if top_p < 1)."""
    return log_prob_kl(sampler_log_probs(q_logits, top_p), sampler_log_probs(p_logits, top_p))


def forward_flops(model: MDLMDenoiser, rows: int, projected: int, seq_len: int) -> float:
    """FLOPs of one forward of ``rows`` sequences that projects only ``projected`` positions to the vocabulary."""
    body = model.flops_per_forward(seq_len, 0)
    return rows * body + projected * (model.flops_per_forward(seq_len, 1) - body)


def revealed_logits(model: MDLMDenoiser, tokens: torch.Tensor, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(P, V) logits at the ``positions`` (an (R, L) mask) only: the positions a step reveals are all the KL needs."""
    return model.project(model.hidden_states(tokens, t)[positions])


def row_sums(values: torch.Tensor, owner: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows,) float64 sums of per-position ``values`` by the row that ``owner`` names for each."""
    return torch.zeros(num_rows, dtype=torch.float64, device=values.device).index_add_(0, owner, values)


def revealed_kl(
    model: MDLMDenoiser, heavy_logits: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, top_p: float = 1.0
) -> torch.Tensor:
    """(R,) float64 path-KL increment of running ``model`` on z_t ``tokens`` at times ``t``: KL(q_model || p_heavy)
    summed over each row's ``positions`` (an (R, L) mask), given the heavy's ``revealed_logits`` there."""
    owner = positions.nonzero(as_tuple=True)[0]
    return row_sums(categorical_kl(revealed_logits(model, tokens, t, positions), heavy_logits, top_p), owner, len(tokens))


def masked_sample(tokens: torch.Tensor, mask_id: int, size: int | None, generator: torch.Generator) -> torch.Tensor:
    """(R, L) mask of ``size`` of each row's masked positions drawn uniformly without replacement (all of them
    where it has no more, or if ``size`` is None): ``step_kl``'s ``averaged`` positions."""
    masked = tokens == mask_id
    if size is None:
        return masked
    keys = torch.rand(tokens.shape, generator=generator).to(tokens.device).masked_fill(~masked, 2.0)  # unmasked last
    drawn = torch.zeros_like(masked).scatter_(1, keys.argsort(1)[:, :size], True)
    return drawn & masked


class StepKL(NamedTuple):
    """One step's path-KL increment per row, the seed baseline's at the same rows and positions, and their cost."""

    kl: torch.Tensor  # (R,) float64
    floor: torch.Tensor | None  # (R,) float64; None without a seed baseline
    flops: float  # of the evaluation forwards
    # each chosen member (off the heavy) -> its logits at its rows' revealed positions, row-major: what a sampler
    # stepping the same rows would compute (``Trajectory.reuse_logits``)
    logits: dict[int, torch.Tensor]
    expected_kl: torch.Tensor | None = None  # (R,) float64: ``kl`` in expectation over which masked positions reveal
    expected_floor: torch.Tensor | None = None  # (R,) float64: ``floor`` alike; both None without ``averaged`` positions


@torch.inference_mode()
def step_kl(
    models: Sequence[MDLMDenoiser], tokens: torch.Tensor, t: torch.Tensor, reveal: torch.Tensor, action: torch.Tensor, top_p: float = 1.0,
    seed_baseline: MDLMDenoiser | None = None, averaged: torch.Tensor | None = None,
) -> StepKL:
    """Each row's path-KL increment for one step: the KL summed over its ``reveal`` positions of z_t ``tokens``,
    and with a ``seed_baseline`` its floor increment, KL(q_seed || p_heavy) at the same positions.

    Rows on model 0 (heavy) add exactly 0 to both and run nothing. The heavy and the seed baseline run once on all
    the other rows, each other member on its own rows.

    With ``averaged`` (an (R, L) mask: all of each row's masked positions, or a uniform sample of them) both are
    also given in expectation over which positions reveal. Given that k of a row's masked positions reveal, which
    ones is a uniform k-subset whatever the model, so that expectation is k times the mean KL over all masked
    positions, which the mean over a uniform sample estimates without bias: the revealed sum's mean without the
    noise of the draw (a reward to learn from). The forwards then also project the ``averaged`` positions.
    """
    zeros = torch.zeros(len(tokens), dtype=torch.float64, device=tokens.device)
    increment, floor = zeros.clone(), (None if seed_baseline is None else zeros.clone())
    expected_kl = None if averaged is None else zeros.clone()
    expected_floor = None if averaged is None or seed_baseline is None else zeros.clone()
    t, action = t.to(tokens.device), action.to(tokens.device)  # a sampler's state and a policy's actions live on the host
    rows = (action != 0).nonzero(as_tuple=True)[0]
    if not len(rows):
        return StepKL(increment, floor, 0.0, {}, expected_kl, expected_floor)
    seq_len = tokens.shape[1]
    z, t_rows, chosen, revealing = tokens[rows], t[rows], action[rows], reveal[rows]
    sampled = revealing if averaged is None else averaged[rows].to(tokens.device)
    positions = revealing | sampled  # what every forward projects
    revealed, in_sample = revealing[positions], sampled[positions]  # in the projected (row-major) order
    owner = positions.nonzero(as_tuple=True)[0]  # the row (of ``rows``) of each projected position
    reveal_weight = revealing.sum(1).double() / sampled.sum(1).clamp(min=1)  # k / the sample's size, per row

    def split(per_position: torch.Tensor, realized: torch.Tensor, in_expectation: torch.Tensor | None) -> None:
        """Sum per-position KLs into the rows' revealed increments and, if asked, their expected ones."""
        realized[rows] = row_sums(torch.where(revealed, per_position, 0.0), owner, len(rows))
        if in_expectation is not None:
            in_expectation[rows] = row_sums(torch.where(in_sample, per_position, 0.0), owner, len(rows)) * reveal_weight

    log_p = sampler_log_probs(revealed_logits(models[0], z, t_rows, positions), top_p)
    ran = [(models[0], len(rows), len(owner))]
    if seed_baseline is not None:
        split(log_prob_kl(sampler_log_probs(revealed_logits(seed_baseline, z, t_rows, positions), top_p), log_p), floor, expected_floor)
        ran.append((seed_baseline, len(rows), len(owner)))
    per_position = torch.zeros(len(owner), dtype=torch.float64, device=tokens.device)
    logits = {}
    for model_index in chosen.unique().tolist():
        mine = chosen == model_index
        kept = mine[owner]  # the projected positions of this member's rows
        member_logits = revealed_logits(models[model_index], z[mine], t_rows[mine], positions[mine])
        per_position[kept] = log_prob_kl(sampler_log_probs(member_logits, top_p), log_p[kept])
        logits[model_index] = member_logits[revealed[kept]]
        ran.append((models[model_index], int(mine.sum()), int(kept.sum())))
    split(per_position, increment, expected_kl)
    flops = sum(forward_flops(model, count, projected, seq_len) for model, count, projected in ran)
    return StepKL(increment, floor, flops, logits, expected_kl, expected_floor)


@dataclass
class PathKL:
    """Path KL of every sample (nats per sequence), its split over steps, and what measuring it cost; with a seed
    baseline also its floor, split alike (None where none was measured)."""

    per_sample: torch.Tensor  # (N,) float64
    per_step: torch.Tensor  # (num_steps,) float64 summed over samples: where along the trajectory a policy loses
    generated_tokens: int  # per sample: the positions the sampler generated (the prompt excluded)
    eval_flops: float  # FLOPs of the evaluation forwards (never charged to the policy), the floor's included
    floor_per_sample: torch.Tensor | None = None  # (N,) float64: the seed baseline at the same steps and positions
    floor_per_step: torch.Tensor | None = None  # (num_steps,) float64 summed over samples


def path_kl(
    models: Sequence[MDLMDenoiser], tokens: torch.Tensor, reveal_step: torch.Tensor, actions: torch.Tensor, top_p: float = 1.0, batch_size: int = 64,
    seed_baseline: MDLMDenoiser | None = None,
) -> PathKL:
    """Replay finished samples: at every (sample, step) that ran a model other than 0, rebuild z_t from the
    sample's tokens and reveal steps and add the step's KL (and the ``seed_baseline``'s floor, if given).
    ``tokens``/``reveal_step`` (N, L), ``actions`` (T, N)."""
    num_steps, num_samples = actions.shape
    device = next(models[0].parameters()).device
    tokens, reveal_step, actions = tokens.to(device), reveal_step.to(device), actions.to(device)
    mask_id = models[0].config.mask_token_id
    steps, samples = ((actions > 0)).nonzero(as_tuple=True)
    per_sample = torch.zeros(num_samples, dtype=torch.float64, device=device)
    per_step = torch.zeros(num_steps, dtype=torch.float64, device=device)
    floor_per_sample = None if seed_baseline is None else torch.zeros_like(per_sample)
    floor_per_step = None if seed_baseline is None else torch.zeros_like(per_step)
    eval_flops = 0.0
    for start in range(0, len(steps), batch_size):
        step, sample = steps[start : start + batch_size], samples[start : start + batch_size]
        z = torch.where(reveal_step[sample] < step[:, None], tokens[sample], mask_id)  # the prompt's -1 is always revealed
        reveal = reveal_step[sample] == step[:, None]
        t = 1.0 - step.double() / num_steps
        measured = step_kl(models, z, t, reveal, actions[step, sample], top_p, seed_baseline)
        per_sample.index_add_(0, sample, measured.kl)
        per_step.index_add_(0, step, measured.kl)
        if measured.floor is not None:
            floor_per_sample.index_add_(0, sample, measured.floor)
            floor_per_step.index_add_(0, step, measured.floor)
        eval_flops += measured.flops
    generated = int((reveal_step[0] >= 0).sum()) if num_samples else 0
    on_host = (None if values is None else values.cpu() for values in (floor_per_sample, floor_per_step))
    return PathKL(per_sample.cpu(), per_step.cpu(), generated, eval_flops, *on_host)
