"""The Policy interface: the sampler owns the loop, the math and the costs; a policy only decides.

Whenever rows are about to reveal positions, the sampler builds a ``DenoiseState`` of those rows and asks
``policy.act(state)`` for one model index per row (index 0 is the family's reference, all-heavy model).
Rows may stand at different steps: the event-driven sampler moves every row straight to its own next
reveal, so ``step`` and ``t`` are per row. After the forwards the sampler calls ``policy.observe``.

A registered policy is a pure function of the state (history it needs travels in the state: the row's
last model, last entropy, mask fraction at its previous forward, FLOPs so far). That is what lets two
samplers that visit different steps, or batch rows differently, reach the same decisions and tokens.
A policy lists the extra features it needs in ``features``; the sampler computes only those (and counts
their cost, where they need a forward). A policy that runs models of its own to decide (the analysis oracle)
gets them through ``bind`` before it calibrates or samples; such a policy is labelled ``analysis_only``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.spec import SamplingSpec

ENTROPY = "entropy"  # mean predictive entropy (nats) over the positions a row revealed at its last forward
# Entropy of ``probe_model``'s prediction at the positions revealing *now*, in ``state.extras``: the probe
# forward is run (and charged) before ``act``; rows that then choose the probe model reuse it for free.
PROBE_ENTROPY = "probe_entropy"
# The same probe's mean top probability and mean margin (top minus second probability) at those positions, in
# ``state.extras`` beside PROBE_ENTROPY: the probe's probabilities are at hand, so they cost no forward of their own.
PROBE_MAX_PROB = "probe_max_prob"
PROBE_MARGIN = "probe_margin"
# z_t of the rows (R, L), the positions revealing now (R, L, bool) and those still masked in z_t (R, L, bool),
# device tensors in ``state.extras`` under Z_T, REVEALING and MASKED. The sampler holds them anyway, so they cost
# nothing; what a policy computes from them (the oracle's forwards of every member) is its own affair and never
# reaches the sampler's costs.
REVEALING = "revealing"
Z_T = "z_t"
MASKED = "masked"
KNOWN_FEATURES = frozenset({ENTROPY, PROBE_ENTROPY, REVEALING})


@dataclass
class DenoiseState:
    """What a policy may look at before choosing each row's model for its step t -> t - 1/num_steps."""

    num_steps: int
    step: torch.Tensor  # (B,) int64, 0-based; step 0 goes from t = 1 (all masked) to t = 1 - 1/num_steps
    t: torch.Tensor  # (B,) float64 noise level at the start of the row's step
    mask_fraction: torch.Tensor  # (B,) fraction of generated positions still masked at t
    previous_mask_fraction: torch.Tensor  # (B,) the mask fraction at the row's previous forward (1 before any)
    reveal_count: torch.Tensor  # (B,) positions that reveal at this step (drawn before any model runs)
    flops: torch.Tensor  # (B,) float64 FLOPs the row's forwards (probes included) have executed so far
    all_heavy_flops: torch.Tensor  # (B,) float64 what model 0 would have executed for the same forwards
    model_flops: tuple[float, ...]  # FLOPs of one full forward (length L, all positions projected) per model
    last_action: torch.Tensor  # (B,) model of the row's previous forward, -1 before the first
    last_entropy: torch.Tensor  # (B,) see ENTROPY; NaN until the row has run a model, or when not requested
    seeds: torch.Tensor  # (B,) sample seeds (common random numbers across policies)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # features other policies declare

    @property
    def batch_size(self) -> int:
        return self.mask_fraction.shape[0]

    @property
    def s(self) -> torch.Tensor:
        """(B,) noise level at the end of the row's step."""
        return self.t - 1.0 / self.num_steps


@dataclass
class StepOutput:
    """What one step produced, for ``observe``."""

    revealed: torch.Tensor  # (B,) positions revealed
    entropy: torch.Tensor  # (B,) mean entropy over revealed positions (NaN where none, or not requested)
    flops: torch.Tensor  # (B,) float64 FLOPs the row's forwards of this step executed (probe included)
    all_heavy_flops: torch.Tensor  # (B,) float64 what model 0 would have executed for the row's step


class Policy(ABC):
    """Chooses a model per row. Subclasses implement ``act``; ``reset`` starts a run."""

    name: ClassVar[str]
    features: ClassVar[frozenset[str]] = frozenset()
    budget: float | None = None  # target fraction of FLOPs saved; policies without one leave it None
    probe_model: int | None = None  # the model a PROBE_ENTROPY policy has the sampler run before it decides
    # The seed baseline a router learned the excess over (a heavy from another seed), None for the rest: judged
    # with that same floor a router would be graded on its own training signal, so runs refuse it.
    trained_against: str | None = None
    # The family members (by name, in order) a router was trained on: it chooses among them, so the family it runs
    # in must list them first (more may follow); None for policies that name no members.
    trained_members: tuple[str, ...] | None = None
    # A reference for analysis, not a policy a sampler could deploy (the oracle decides with hindsight of every
    # member's increment): runs report no wall clock or speedup for it, only its quality and the FLOPs its choices cost.
    analysis_only: ClassVar[bool] = False
    # The seed baseline (a model folder of the family) that a policy runs itself to decide, loaded by the job and
    # handed to ``bind``; None for the rest.
    decision_baseline: str | None = None

    def bind(self, models: Sequence[MDLMDenoiser], spec: SamplingSpec, seed_baseline: MDLMDenoiser | None) -> None:
        """Before calibrating or sampling: the family (0 = heavy), how it samples, and the ``decision_baseline`` model
        (None where the policy names none). The job code calls it for every policy; only one that runs models to
        decide keeps them."""

    def reset(self, num_steps: int, num_models: int) -> None:
        """Start a run of ``num_steps`` steps over a family of ``num_models``; check the policy fits it."""
        self.num_steps = num_steps
        self.num_models = num_models

    @abstractmethod
    def act(self, state: DenoiseState) -> torch.Tensor:
        """(B,) int64 model indices in [0, num_models)."""

    def observe(self, state: DenoiseState, action: torch.Tensor, output: StepOutput) -> None:
        """See what the step produced; the registered policies ignore it (they are functions of the state)."""


def check_budget(budget: float) -> None:
    """A budget is the fraction of executed FLOPs to save against all-heavy: strictly between 0 and 1."""
    if not 0.0 < budget < 1.0:
        raise ConfigError(f"budget={budget} is invalid; it must lie in (0, 1) (the fraction of FLOPs to save)")


def check_model_index(policy: Policy, model: int, num_models: int) -> None:
    """One-line error for a policy configured with a model the family does not have."""
    if model >= num_models:
        raise ConfigError(f"policy {policy.name} uses model {model} but the family has {num_models}")


PolicyType = TypeVar("PolicyType", bound=type[Policy])
_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(name: str) -> Callable[[PolicyType], PolicyType]:
    """Class decorator: make a policy constructible by name (and listable in errors)."""

    def decorate(cls: PolicyType) -> PolicyType:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} is registered twice")
        unknown = cls.features - KNOWN_FEATURES
        if unknown:
            raise ValueError(f"policy {name!r} declares unknown features {sorted(unknown)}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, **kwargs: object) -> Policy:
    """Construct a registered policy; an unknown name lists the registered ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown policy {name!r}; registered: {', '.join(registered_policies())}")
    return _REGISTRY[name](**kwargs)
