"""The paper's static schedules: a fixed model for every step, the same for every row.

Step 0 is the first step from the fully masked state (t = 1), as the paper's segment 0. Model 0 is the
heavy model and model 1 the light one unless ``light`` (or a segment spec's ``letters``) says otherwise.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.calibration import expected_saving
from adasched.sampling.policy import (
    DenoiseState,
    Policy,
    check_budget,
    check_model_index,
    register_policy,
)
from adasched.sampling.spec import SamplingSpec

DEFAULT_LETTERS = {"H": 0, "L": 1}


def _check_fraction(field: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"policy.{field}={value} is invalid; it must lie in [0, 1]")


def _steps(fraction: float, num_steps: int) -> int:
    return round(fraction * num_steps)


class StaticSchedule(Policy):
    """A plan of one model per step, built on ``reset`` for the run's number of steps."""

    plan: torch.Tensor

    @abstractmethod
    def schedule(self, num_steps: int) -> torch.Tensor:
        """(num_steps,) int64 model index per step."""

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(num_steps, num_models)
        self.plan = self.schedule(num_steps)
        check_model_index(self, int(self.plan.max()), num_models)

    def act(self, state: DenoiseState) -> torch.Tensor:
        return self.plan.to(state.step.device)[state.step]


def light_share(budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec, light: int) -> float:
    """The share of decisions on ``light`` that saves ``budget`` in expectation (above 1: out of reach)."""
    saving = expected_saving(models, spec, light)
    return budget / saving if saving > 0 else 1.0


def blocks(num_steps: int, spans: Sequence[tuple[int, int]], model: int, default: int = 0) -> torch.Tensor:
    """A plan of ``default`` with ``model`` on each [start, stop) span."""
    plan = torch.full((num_steps,), default, dtype=torch.int64)
    for start, stop in spans:
        plan[start:stop] = model
    return plan


@register_policy("static_heavy")
class StaticHeavy(StaticSchedule):
    """All steps heavy: the quality and cost reference."""

    def schedule(self, num_steps: int) -> torch.Tensor:
        return torch.zeros(num_steps, dtype=torch.int64)


@register_policy("static_light")
class StaticLight(StaticSchedule):
    """All steps on the light model."""

    def __init__(self, light: int = 1) -> None:
        self.light = light

    def schedule(self, num_steps: int) -> torch.Tensor:
        return torch.full((num_steps,), self.light, dtype=torch.int64)


class LightFractionSchedule(StaticSchedule):
    """A schedule with ``light_fraction`` of its steps on the light model. With a ``budget`` the light fraction is
    calibrated to it (``adasched.sampling.calibration``), so dynamic policies are compared with static schedules at
    equal executed FLOPs."""

    knob_range = (0.0, 1.0)

    def __init__(self, light_fraction: float = 0.25, light: int = 1, budget: float | None = None) -> None:
        _check_fraction("light_fraction", light_fraction)
        if budget is not None:
            check_budget(budget)
        self.light_fraction, self.light, self.budget = light_fraction, light, budget

    def set_knob(self, value: float) -> None:
        self.light_fraction = value

    def initial_knob(self, budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> float:
        """The light fraction that saves ``budget`` in expectation: reveals are spread evenly over the steps, so
        the saving is the light fraction times what all-light saves."""
        return light_share(budget, models, spec, self.light)


@register_policy("static_quarter")
class StaticQuarter(LightFractionSchedule):
    """``light_fraction`` of the steps on the light model, starting where quarter ``quarter`` (1-4) starts.

    With a ``budget`` the light fraction is calibrated up to what fits after the quarter's start (all of the steps
    from the first quarter): the light-first front beside the sandwich's.
    """

    def __init__(self, quarter: int = 1, light_fraction: float = 0.25, light: int = 1, budget: float | None = None) -> None:
        if quarter not in (1, 2, 3, 4):
            raise ConfigError(f"policy.quarter={quarter} is invalid; choose 1, 2, 3 or 4")
        super().__init__(light_fraction, light, budget)
        self.quarter = quarter
        self.knob_range = (0.0, 1.0 - (quarter - 1) / 4)

    def schedule(self, num_steps: int) -> torch.Tensor:
        start = round((self.quarter - 1) * num_steps / 4)
        stop = start + _steps(self.light_fraction, num_steps)
        if stop > num_steps:
            raise ConfigError(
                f"policy.light_fraction={self.light_fraction} does not fit after quarter {self.quarter} start"
            )
        return blocks(num_steps, [(start, stop)], self.light)


@register_policy("static_sandwich")
class StaticSandwich(LightFractionSchedule):
    """The paper's best static schedule: ``light_fraction`` of the steps light, split over both ends."""

    def schedule(self, num_steps: int) -> torch.Tensor:
        total = _steps(self.light_fraction, num_steps)
        head, tail = total // 2, total - total // 2
        return blocks(num_steps, [(0, head), (num_steps - tail, num_steps)], self.light)


@dataclass(frozen=True)
class Segments:
    """A parsed segment spec: (model, length) pairs; lengths are step counts or fractions of the steps."""

    spec: str
    parts: tuple[tuple[int, float], ...]
    fractional: bool

    @classmethod
    def parse(cls, spec: str, letters: Mapping[str, int]) -> Segments:
        """``L125,H750,L125`` (step counts) or ``L0.125,H0.75,L0.125`` (fractions summing to 1)."""
        tokens = [token.strip() for token in spec.split(",")]
        parts = []
        for token in tokens:
            letter, amount = token[:1], token[1:]
            if letter not in letters:
                raise ConfigError(f"invalid segment {token!r} in {spec!r}: {letter!r} is not one of {', '.join(letters)}")
            try:
                value = float(amount) if "." in amount else int(amount)
            except ValueError:
                raise ConfigError(f"invalid segment {token!r} in {spec!r}: {amount!r} is not a step count or fraction") from None
            if value < 0:
                raise ConfigError(f"invalid segment {token!r} in {spec!r}: the length must be non-negative")
            parts.append((letters[letter], value))
        fractional = ["." in token for token in tokens]
        if any(fractional) and not all(fractional):
            raise ConfigError(f"segment spec {spec!r} mixes step counts and fractions; use one kind")
        if all(fractional) and abs(sum(v for _, v in parts) - 1.0) > 1e-6:
            raise ConfigError(f"segment fractions in {spec!r} sum to {sum(v for _, v in parts):g}, not 1")
        return cls(spec, tuple(parts), all(fractional))

    def plan(self, num_steps: int) -> torch.Tensor:
        """Fractions are rounded cumulatively, so segment ends stay where the spec puts them."""
        lengths = [value for _, value in self.parts]
        if self.fractional:
            edges = [round(num_steps * sum(lengths[: i + 1])) for i in range(len(lengths))]
        elif sum(lengths) != num_steps:
            raise ConfigError(f"segment spec {self.spec!r} covers {sum(lengths)} steps, not num_steps={num_steps}")
        else:
            edges = [sum(lengths[: i + 1]) for i in range(len(lengths))]
        plan = torch.empty(num_steps, dtype=torch.int64)
        start = 0
        for (model, _), stop in zip(self.parts, edges):
            plan[start:stop] = model
            start = stop
        return plan


@register_policy("static_segments")
class StaticSegments(StaticSchedule):
    """Any contiguous schedule, e.g. ``L125,H750,L125``; ``letters`` maps letters to models (3+ models too)."""

    def __init__(self, spec: str = "L0.125,H0.75,L0.125", letters: Mapping[str, int] | None = None) -> None:
        self.segments = Segments.parse(spec, dict(letters or DEFAULT_LETTERS))

    def schedule(self, num_steps: int) -> torch.Tensor:
        return self.segments.plan(num_steps)


@register_policy("static_segment_mask")
class StaticSegmentMask(StaticSchedule):
    """The exhaustive search's space: ``num_segments`` equal segments, ``light_segments`` of them light."""

    def __init__(self, num_segments: int = 10, light_segments: Sequence[int] = (0, 1, 8, 9), light: int = 1) -> None:
        if num_segments <= 0:
            raise ConfigError(f"policy.num_segments={num_segments} must be a positive integer")
        bad = [j for j in light_segments if not 0 <= j < num_segments]
        if bad:
            raise ConfigError(f"policy.light_segments has {bad[0]}; segments are 0..{num_segments - 1}")
        self.num_segments, self.light_segments, self.light = num_segments, sorted(set(light_segments)), light

    def schedule(self, num_steps: int) -> torch.Tensor:
        if num_steps < self.num_segments:
            raise ConfigError(f"num_steps={num_steps} is fewer than policy.num_segments={self.num_segments}")
        edges = [round(j * num_steps / self.num_segments) for j in range(self.num_segments + 1)]
        return blocks(num_steps, [(edges[j], edges[j + 1]) for j in self.light_segments], self.light)
