"""The MDLM objective: a hand-computed case, the masking rate, and the 1/t weighting, statistically."""

from __future__ import annotations

import math

import pytest
import torch

from adasched.models import DenoiserConfig, MDLMDenoiser
from adasched.training.diffusion import (
    corrupt,
    masked_nelbo,
    nelbo_of_corruption,
    sample_times,
)


class FixedLogits(MDLMDenoiser):
    """A denoiser whose logits are a fixed vector at every position: its losses can be computed by hand."""

    def __init__(self, logits: list[float], mask_token_id: int) -> None:
        super().__init__(DenoiserConfig(vocab_size=len(logits), mask_token_id=mask_token_id, n_blocks=1, d_model=8, n_heads=2))
        self.fixed = torch.tensor(logits)

    def hidden_states(self, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(*z.shape, 1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.fixed.expand(*hidden.shape[:-1], -1).clone()
        logits[..., self.config.mask_token_id] = float("-inf")
        return logits


def test_nelbo_matches_a_hand_computed_case() -> None:
    # vocabulary {0, 1, 2, mask=3}; logits (0, ln 2, ln 5) -> p = (1/8, 2/8, 5/8) over the real tokens
    model = FixedLogits([0.0, math.log(2.0), math.log(5.0), 7.0], mask_token_id=3)
    x = torch.tensor([[0, 1, 2, 2], [2, 2, 1, 0]])
    z = torch.tensor([[3, 1, 3, 2], [2, 2, 3, 0]])
    t = torch.tensor([0.5, 0.25])
    # row 0 masks x=0 (p=1/8) and x=2 (p=5/8), weight 1/0.5; row 1 masks x=1 (p=2/8), weight 1/0.25
    expected = (2.0 * (math.log(8.0) + math.log(8.0 / 5.0)) + 4.0 * math.log(4.0)) / 8.0
    got = nelbo_of_corruption(model, x, z, t, torch.ones_like(x))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_padding_carries_no_loss_and_is_not_counted() -> None:
    model = FixedLogits([0.0, math.log(2.0), math.log(5.0), 7.0], mask_token_id=3)
    x = torch.tensor([[0, 1, 2, 2]])
    z = torch.tensor([[3, 3, 3, 3]])
    attention = torch.tensor([[1, 1, 0, 0]])
    expected = (math.log(8.0) + math.log(4.0)) / 0.5 / 2.0
    got = nelbo_of_corruption(model, x, z, torch.tensor([0.5]), attention)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_times_are_antithetic_and_in_range() -> None:
    t = sample_times(64, eps=1e-3, generator=torch.Generator().manual_seed(0))
    gaps = t.sort().values.diff()
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - 1e-3) / 64), atol=1e-5)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_masking_rate_is_t(rate: float) -> None:
    n = 200_000
    x = torch.zeros(4, n // 4, dtype=torch.long)
    z = corrupt(x, torch.full((4,), rate), mask_id=7, generator=torch.Generator().manual_seed(1))
    fraction = (z == 7).float().mean().item()
    assert abs(fraction - rate) < 5 * math.sqrt(rate * (1 - rate) / n)


def test_inverse_t_weighting_makes_the_estimate_unbiased() -> None:
    # Uniform predictions give NLL ln(3) at every masked token; E[(1/t) * (#masked) * ln 3 / L] = ln 3 for
    # any t-distribution only with the 1/t weight (without it the mean would be ln(3) / 2).
    model = FixedLogits([0.0, 0.0, 0.0, 0.0], mask_token_id=3)
    generator = torch.Generator().manual_seed(2)
    x = torch.zeros(16, 64, dtype=torch.long)
    draws = torch.stack([masked_nelbo(model, x, eps=0.05, generator=generator) for _ in range(400)])
    mean, sem = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    assert abs(mean - math.log(3.0)) < 4 * sem
