"""Where a policy saves along the trajectory and which members it runs: the budgeted routers' failure modes."""

from __future__ import annotations

import pytest
import torch

from adasched.analysis.schedule_profile import member_shares, reveal_counts, saving_by_quarter

TRUNK, PROJECTION = [6.0, 2.0, 3.0], [1.0, 1.0, 1.0]


def test_reveal_counts_count_each_samples_positions_per_step_and_skip_the_prompt() -> None:
    reveal_step = torch.tensor([[-1, 0, 0, 3], [2, 2, 2, 1]])
    assert reveal_counts(reveal_step, 4).tolist() == [[2, 0], [0, 1], [0, 3], [1, 0]]


def test_a_schedule_that_spends_its_saving_early_shows_it_in_the_first_quarter() -> None:
    """Light for the first quarter of the steps (bankruptcy's shape) against a sandwich of the same light steps."""
    steps, samples = 8, 3
    reveal_step = torch.arange(steps).repeat(samples, 1)  # one position per step, every sample
    early = torch.zeros(steps, samples, dtype=torch.int64)
    early[:2] = 1
    sandwich = torch.zeros(steps, samples, dtype=torch.int64)
    sandwich[0] = sandwich[-1] = 1
    light_saving = 1 - (2.0 + 1.0) / (6.0 + 1.0)  # a light forward projecting one position, against the heavy's
    assert saving_by_quarter(early, reveal_step, TRUNK, PROJECTION) == pytest.approx([light_saving, 0, 0, 0])
    assert saving_by_quarter(sandwich, reveal_step, TRUNK, PROJECTION) == pytest.approx([light_saving / 2, 0, 0, light_saving / 2])


def test_steps_that_reveal_nothing_cost_nothing_and_shares_count_decisions_only() -> None:
    actions = torch.tensor([[2, -1], [0, 0], [-1, 1], [0, 0]])
    reveal_step = torch.tensor([[0, 1, 3], [1, 2, 3]])
    # quarter k is step k: step 0 runs member 2 on sample 0 alone (one position), step 2 member 1 on sample 1
    assert saving_by_quarter(actions, reveal_step, TRUNK, PROJECTION) == pytest.approx([1 - 4 / 7, 0, 1 - 3 / 7, 0])
    assert member_shares(actions, 3) == pytest.approx([4 / 6, 1 / 6, 1 / 6])
