"""Where along the trajectory a policy saves, and which members it runs: two failure modes of budgeted routers.

A router held to a budget can spend it early ("budget bankruptcy": a row's saving concentrated at the start of its
trajectory, decided before the policy can know the rest); a router conditioned on a price can collapse onto one
member as the price moves. ``saving_by_quarter`` and ``member_shares`` of a run's actions show both, and every run
records them beside its costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

QUARTERS = 4  # spans of equal step counts, from t = 1 (all masked) to t = 0


def reveal_counts(reveal_step: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(num_steps, N) positions each sample reveals at each step (a prompt's positions, -1, reveal at none)."""
    samples = torch.arange(reveal_step.shape[0]).expand_as(reveal_step.T).T
    revealed = reveal_step >= 0
    counts = torch.zeros(num_steps, reveal_step.shape[0], dtype=torch.float64)
    return counts.index_put_((reveal_step[revealed].cpu(), samples[revealed].cpu()), torch.ones(int(revealed.sum()), dtype=torch.float64), accumulate=True)


def saving_by_quarter(actions: torch.Tensor, reveal_step: torch.Tensor, trunk: Sequence[float], projection: Sequence[float]) -> list[float]:
    """The executed saving within each quarter of the steps, pooled over samples: 1 - the FLOPs the chosen members
    executed there / what the heavy (member 0) would have. A forward costs its member's ``trunk`` plus ``projection``
    per position revealed, as the sampler charges it (probes are not in ``actions`` and not counted).
    ``actions`` (num_steps, N): member per step, -1 where a sample revealed nothing; ``reveal_step`` (N, L)."""
    num_steps = actions.shape[0]
    counts = reveal_counts(reveal_step, num_steps)
    decided = actions.cpu() >= 0
    chosen = actions.cpu().clamp(min=0)
    trunk_of, projection_of = torch.tensor(trunk, dtype=torch.float64), torch.tensor(projection, dtype=torch.float64)
    executed = torch.where(decided, trunk_of[chosen] + projection_of[chosen] * counts, 0.0).sum(1)
    heavy = torch.where(decided, trunk_of[0] + projection_of[0] * counts, 0.0).sum(1)
    quarter = torch.arange(num_steps) * QUARTERS // num_steps
    savings = []
    for index in range(QUARTERS):
        spent, baseline = executed[quarter == index].sum(), heavy[quarter == index].sum()
        savings.append(float(1 - spent / baseline) if baseline > 0 else 0.0)
    return savings


def member_shares(actions: torch.Tensor, num_models: int) -> list[float]:
    """The share of all decisions (sample-steps that revealed something) each member took."""
    decided = actions[actions >= 0].cpu()
    return (torch.bincount(decided, minlength=num_models).double() / max(len(decided), 1)).tolist()
