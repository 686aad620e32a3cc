"""The sandwich in mask-fraction space: each row is light at both ends of its own trajectory.

The static sandwich puts the light model on the first and last steps, but which steps those are in terms of
progress differs per row: rows reveal at random. Here a row runs the heavy model while its mask fraction
lies in a band [low, high] and the light one outside it, so every row spends the same share of its
denoising progress on each model whatever its random reveal times.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adasched.models.dit import MDLMDenoiser
from adasched.sampling.policy import (
    DenoiseState,
    Policy,
    check_budget,
    check_model_index,
    register_policy,
)
from adasched.sampling.spec import SamplingSpec
from policies.static import _check_fraction, light_share


@register_policy("mask_fraction_router")
class MaskFractionRouter(Policy):
    """Per row: heavy iff its mask fraction lies in [low, high], else light.

    ``light_mass`` p is the share of the mask-fraction range given to light, ``skew`` the part of it at the
    start (high mask fraction): high = 1 - p * skew, low = p * (1 - skew). At p = 1 the band is a single
    point, which a row could still hit exactly, so p = 1 is all light by definition.
    With a ``budget`` p is calibrated to it: a larger p shrinks the band, so the saving never drops.
    """

    knob_range = (0.0, 1.0)

    def __init__(self, light_mass: float = 0.25, skew: float = 0.5, light: int = 1, budget: float | None = None) -> None:
        _check_fraction("light_mass", light_mass)
        _check_fraction("skew", skew)
        if budget is not None:
            check_budget(budget)
        self.light_mass, self.skew, self.light, self.budget = light_mass, skew, light, budget

    def set_knob(self, value: float) -> None:
        self.light_mass = value

    def initial_knob(self, budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> float:
        """As for the static sandwich: a row's mask fraction falls about evenly over its reveals, so about
        ``light_mass`` of its decisions are light."""
        return light_share(budget, models, spec, self.light)

    @property
    def band(self) -> tuple[float, float]:
        """(low, high): the mask fractions, inclusive, at which a row runs the heavy model."""
        return self.light_mass * (1 - self.skew), 1 - self.light_mass * self.skew

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(num_steps, num_models)
        check_model_index(self, self.light, num_models)

    def act(self, state: DenoiseState) -> torch.Tensor:
        low, high = self.band
        heavy = (state.mask_fraction >= low) & (state.mask_fraction <= high) & (self.light_mass < 1)
        return torch.where(heavy, 0, self.light).to(torch.int64)
