"""The oracle: ANALYSIS ONLY, a reference for what routing could gain, not a policy a sampler could deploy.

At every (row, step) it runs every member of the family (the heavy, model 0, among them) and a seed baseline on
the positions of z_t revealing now, measures each member's actual path-KL increment there, and chooses the
member minimizing

    increment + price * (the member's FLOPs for this row's forward / the FLOPs of one full heavy forward)

The increment is by default the excess, KL(q_member || p_heavy) minus KL(q_seed || p_heavy) summed over the same
positions (the heavy's is 0, as path KL's excess counts it), or with ``objective="raw"`` the KL alone. A member
whose excess is negative (it departs from the heavy less than the seed baseline would) wins even at price 0, so
under ``excess`` price 0 is all-heavy only where no member beats the seed baseline, and a budget below what price
0 saves needs a negative price: compute then earns its price, and the heavy wins rows it would otherwise give away.

``price`` (nats per heavy forward) is the calibration knob: raising it never moves a row to a costlier member, so
the saving never drops. Its range is [0, ``max_price``] for ``raw`` and [-``max_price``, ``max_price``] for
``excess``: increments are unbounded, so no finite price makes the lightest member optimal everywhere for sure;
the default ``max_price`` of 1000 nats lies far beyond what the shipped family needs (the sandwich's light steps
cost it ~0.3 nats of path KL each, and a light forward saves ~0.56 of a heavy one).

It is greedy: each choice is the best for its own step with hindsight of every member there, but changes the
states later steps see, so it is a strong reference, not a proven bound on what a router can reach. Its own
forwards are evaluation, never charged to the sampler: a run counts only the chosen model's FLOPs, and reports
no wall clock or speedup for it (``analysis_only``). It decides against ``seed_baseline`` (the routers' training
floor, heavy_seed3 by default), so runs refuse to judge it with that one (``trained_against``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adasched.analysis.path_kl import forward_flops, revealed_kl, revealed_logits
from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.policy import (
    REVEALING,
    Z_T,
    DenoiseState,
    Policy,
    check_budget,
    register_policy,
)
from adasched.sampling.spec import SamplingSpec

OBJECTIVES = ("excess", "raw")
ROWS_PER_FORWARD = 64  # rows per evaluation forward: calibration replays thousands of recorded rows at once


@register_policy("oracle")
class Oracle(Policy):
    """Per row and step: the member minimizing its actual increment (excess or raw) + ``price`` x its share of a heavy forward."""

    features = frozenset({REVEALING})
    analysis_only = True

    def __init__(
        self, objective: str = "excess", seed_baseline: str | None = "heavy_seed3", price: float = 1.0, max_price: float = 1000.0,
        budget: float | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ConfigError(f"policy.objective={objective!r} is invalid; choose one of {', '.join(OBJECTIVES)}")
        if objective == "excess" and seed_baseline is None:
            raise ConfigError("policy.objective=excess subtracts a seed baseline's increment: set policy.seed_baseline to a heavy from another seed, or pass policy.objective=raw")
        if not max_price > 0:
            raise ConfigError(f"policy.max_price={max_price} is invalid; it must be positive (nats per heavy forward)")
        lowest = -max_price if objective == "excess" else 0.0  # an excess may be negative: see the module's docstring
        if not lowest <= price <= max_price:
            raise ConfigError(f"policy.price={price} is invalid; it must lie in [{lowest}, {max_price}] (nats per heavy forward, objective={objective})")
        if budget is not None:
            check_budget(budget)
        self.objective, self.price, self.budget = objective, float(price), budget
        self.knob_range = (float(lowest), float(max_price))
        self.decision_baseline = self.trained_against = seed_baseline if objective == "excess" else None
        self.models: Sequence[MDLMDenoiser] = ()
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind(self, models: Sequence[MDLMDenoiser], spec: SamplingSpec, seed_baseline: MDLMDenoiser | None) -> None:
        if self.decision_baseline is not None and seed_baseline is None:
            raise ValueError(f"policy oracle decides against {self.decision_baseline}: bind it with that model")
        self.models, self.top_p = models, spec.top_p
        self.seed_baseline = seed_baseline if self.decision_baseline is not None else None  # raw subtracts nothing
        # a row's forward costs its trunk plus one projection per revealed position, as the sampler charges it
        self.trunk = torch.tensor([forward_flops(m, 1, 0, spec.seq_len) for m in models], dtype=torch.float64)
        self.projection = torch.tensor([forward_flops(m, 0, 1, spec.seq_len) for m in models], dtype=torch.float64)
        self._memo = None

    def set_knob(self, value: float) -> None:
        self.price = value

    def initial_knob(self, budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> float:
        """The configured price: what a price saves depends on the increments the models show."""
        return self.price

    def act(self, state: DenoiseState) -> torch.Tensor:
        if not self.models:
            raise RuntimeError("policy oracle runs the family to decide: bind(models, spec, seed_baseline) first (the job code does)")
        revealing = state.reveal_count > 0  # the reference sampler also asks about rows revealing nothing: they run no model
        costs = self.trunk[:, None] + self.projection[:, None] * state.reveal_count[revealing].double()
        score = self.increments(state)[:, revealing] + self.price * costs / state.model_flops[0]
        action = torch.zeros(state.batch_size, dtype=torch.int64)
        action[revealing] = score.argmin(0)  # a tie goes to the lowest index: the heavy before any other member
        return action

    def increments(self, state: DenoiseState) -> torch.Tensor:
        """(num_models, R) host float64 increments of every member at every row (0 where a row reveals nothing).

        Remembered for the last state seen: calibration's replay asks about the same recorded states at many prices.
        """
        tokens = state.extras[Z_T]
        if self._memo is None or self._memo[0] is not tokens:
            self._memo = (tokens, self.measure(tokens, state.t.to(tokens.device), state.extras[REVEALING]))
        return self._memo[1]

    @torch.inference_mode()
    def measure(self, tokens: torch.Tensor, t: torch.Tensor, reveal: torch.Tensor) -> torch.Tensor:
        """See ``increments``; rows revealing nothing add nothing, so only the others run, ROWS_PER_FORWARD at a time."""
        measured = torch.zeros(len(self.models), len(tokens), dtype=torch.float64, device=tokens.device)
        rows = reveal.any(1).nonzero(as_tuple=True)[0]
        for chunk in rows.split(ROWS_PER_FORWARD):
            z, t_rows, positions = tokens[chunk], t[chunk], reveal[chunk]
            p = revealed_logits(self.models[0], z, t_rows, positions)
            floor = 0.0 if self.seed_baseline is None else revealed_kl(self.seed_baseline, p, z, t_rows, positions, self.top_p)
            for index, model in enumerate(self.models[1:], 1):
                measured[index, chunk] = revealed_kl(model, p, z, t_rows, positions, self.top_p) - floor
        return measured.nan_to_num(nan=torch.inf).cpu()  # inf - inf (both leave the heavy's nucleus): never chosen
