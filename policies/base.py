"""The Policy interface: the sampler owns the loop, the math and the costs; a policy only decides.

At every step the sampler builds a ``DenoiseState`` and asks ``policy.act(state)`` for one model index per
row (index 0 is the family's reference, all-heavy model). After the step it calls ``policy.observe`` with
what the step produced. A policy lists the extra features it needs in ``features``; the sampler computes
only those (and counts their cost, where they need a forward).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch

from adasched.errors import ConfigError

ENTROPY = "entropy"  # mean predictive entropy (nats) over the positions a row revealed at its last forward
# Entropy of ``probe_model``'s prediction at the positions revealing *now*, in ``state.extras``: the probe
# forward is run (and charged) before ``act``; rows that then choose the probe model reuse it for free.
PROBE_ENTROPY = "probe_entropy"
KNOWN_FEATURES = frozenset({ENTROPY, PROBE_ENTROPY})


@dataclass
class DenoiseState:
    """What a policy may look at before choosing the models of one step t -> s (rows = samples)."""

    step: int  # 0-based; step 0 goes from t = 1 (all masked) to t = 1 - 1/num_steps
    num_steps: int
    t: float
    s: float
    mask_fraction: torch.Tensor  # (B,) fraction of generated positions still masked at t
    reveal_count: torch.Tensor  # (B,) positions that reveal at this step (drawn before any model runs)
    flops: torch.Tensor  # (B,) float64 executed FLOPs of each row so far
    model_flops: tuple[float, ...]  # FLOPs of one full forward (length L, all positions projected) per model
    budget: float | None  # target fraction of FLOPs saved against all-heavy, when the run has one
    last_action: torch.Tensor  # (B,) model of the row's previous step, -1 before the first
    last_entropy: torch.Tensor  # (B,) see ENTROPY; NaN until the row has run a model, or when not requested
    seeds: torch.Tensor  # (B,) sample seeds (common random numbers across policies)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # features other policies declare

    @property
    def batch_size(self) -> int:
        return self.mask_fraction.shape[0]


@dataclass
class StepOutput:
    """What one step produced, for ``observe``."""

    revealed: torch.Tensor  # (B,) positions revealed
    entropy: torch.Tensor  # (B,) mean entropy over revealed positions (NaN where none, or not requested)


class Policy(ABC):
    """Chooses a model per row and step. Subclasses implement ``act``; ``reset`` starts a new batch."""

    name: ClassVar[str]
    features: ClassVar[frozenset[str]] = frozenset()
    budget: float | None = None  # target fraction of FLOPs saved; policies without one leave it None
    probe_model: int | None = None  # the model a PROBE_ENTROPY policy has the sampler run before it decides

    def reset(self, batch_size: int, num_steps: int, num_models: int, seed: int = 0) -> None:
        """Start a batch; ``seed`` makes any randomness of the policy reproducible."""
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.num_models = num_models
        self.generator = torch.Generator().manual_seed(seed)

    @abstractmethod
    def act(self, state: DenoiseState) -> torch.Tensor:
        """(B,) int64 model indices in [0, num_models)."""

    def observe(self, state: DenoiseState, action: torch.Tensor, output: StepOutput) -> None:
        """Learn from the step's outcome; static policies ignore it."""


def check_budget(budget: float) -> None:
    """A budget is the fraction of executed FLOPs to save against all-heavy: strictly between 0 and 1."""
    if not 0.0 < budget < 1.0:
        raise ConfigError(f"budget={budget} is invalid; it must lie in (0, 1) (the fraction of FLOPs to save)")


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


def synthetic_states(batch_size: int, num_steps: int, num_models: int, seed: int) -> list[DenoiseState]:
    """A plausible trajectory of states (masks drain linearly with noise), for checking policies offline."""
    generator = torch.Generator().manual_seed(seed)
    remaining = torch.ones(batch_size)
    states = []
    for step in range(num_steps):
        t, s = 1 - step / num_steps, 1 - (step + 1) / num_steps
        reveal = (remaining * (t - s) / t + 0.05 * torch.randn(batch_size, generator=generator)).clamp(0, 1)
        reveal = torch.minimum(reveal, remaining)
        states.append(
            DenoiseState(
                step=step, num_steps=num_steps, t=t, s=s, mask_fraction=remaining.clone(),
                reveal_count=(reveal * 128).round().long(), flops=torch.zeros(batch_size, dtype=torch.float64),
                model_flops=tuple(float(12 - 8 * m / max(num_models - 1, 1)) for m in range(num_models)),
                budget=None, last_action=torch.full((batch_size,), -1), last_entropy=torch.rand(batch_size, generator=generator) * 5,
                seeds=torch.arange(batch_size),
                extras={PROBE_ENTROPY: torch.rand(batch_size, generator=generator, dtype=torch.float64) * 5},
            )
        )
        remaining = remaining - reveal
    return states


def check_policy(policy: Policy, num_models: int = 2, batch_size: int = 8, num_steps: int = 40, seed: int = 0) -> None:
    """Like gymnasium's ``check_env``: actions well-formed and in range, seeded determinism, budget kept.

    Raises AssertionError naming the first violation.
    """
    runs = []
    for _ in range(2):
        policy.reset(batch_size, num_steps, num_models, seed)
        actions = []
        for state in synthetic_states(batch_size, num_steps, num_models, seed):
            action = policy.act(state)
            assert isinstance(action, torch.Tensor), f"{policy.name}: act returned {type(action).__name__}, not a tensor"
            assert action.shape == (batch_size,), f"{policy.name}: action shape {tuple(action.shape)} != ({batch_size},)"
            assert action.dtype == torch.int64, f"{policy.name}: action dtype {action.dtype} != torch.int64"
            assert 0 <= int(action.min()) and int(action.max()) < num_models, f"{policy.name}: action out of [0, {num_models})"
            policy.observe(state, action, StepOutput(revealed=state.reveal_count, entropy=torch.rand(batch_size, dtype=torch.float64)))
            actions.append(action)
        runs.append(torch.stack(actions))
    assert torch.equal(runs[0], runs[1]), f"{policy.name}: two runs with seed {seed} chose different models"
    if policy.budget is not None:
        flops = torch.tensor(synthetic_states(1, 1, num_models, seed)[0].model_flops, dtype=torch.float64)
        saved = 1 - flops[runs[0]].mean() / flops[0]
        assert saved >= policy.budget - 0.05, f"{policy.name}: saved {saved:.3f} of FLOPs, budget {policy.budget}"
