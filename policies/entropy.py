"""Entropy routing: a row runs the heavy model where the prediction is uncertain, the light one elsewhere.

Two ways to measure the uncertainty of a row at a step:

* ``probe``: the sampler runs the light model first on every row that reveals something (charged) and
  reports its mean entropy at the positions revealing now; rows above ``threshold`` escalate to the heavy
  model, the others keep the probe's prediction at no further cost. Rows revealing nothing run no model
  and report NaN; they stay light.
* ``lagged``: no extra forward; the row's entropy at its previous forward (whichever model ran it) stands in
  for the current one. Before a row's first forward there is none (NaN); it runs heavy, since the first
  reveals from the fully masked sequence shape everything after them.

The threshold is the calibration knob: raising it sends more rows to the light model, so the saving rises
(up to the feedback of earlier choices on later entropies, which calibration's search tolerates). Its
range is [0, ``max_threshold``]: the policy does not know the vocabulary V and the entropy is at most log V,
so the default 12 nats covers vocabularies up to ~160k tokens (GPT-2's 50k: 10.8; the shipped 4096: 8.3).
The default threshold, 6 nats, sends about a quarter of the shipped family's probed rows to the light model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.policy import (
    ENTROPY,
    PROBE_ENTROPY,
    DenoiseState,
    Policy,
    check_budget,
    check_model_index,
    register_policy,
)
from adasched.sampling.spec import SamplingSpec

MODES = ("probe", "lagged")


@register_policy("entropy_router")
class EntropyRouter(Policy):
    """Per row and step: heavy where the (probe or lagged) mean entropy exceeds ``threshold`` nats, else light."""

    def __init__(
        self,
        mode: str = "probe",
        threshold: float = 6.0,
        max_threshold: float = 12.0,
        light: int = 1,
        heavy: int = 0,
        budget: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"policy.mode={mode!r} is invalid; choose one of {', '.join(MODES)}")
        if max_threshold <= 0:
            raise ConfigError(f"policy.max_threshold={max_threshold} is invalid; it must be positive (nats)")
        if not 0.0 <= threshold <= max_threshold:
            raise ConfigError(f"policy.threshold={threshold} is invalid; it must lie in [0, {max_threshold}] (nats)")
        if budget is not None:
            check_budget(budget)
        self.mode, self.threshold, self.light, self.heavy, self.budget = mode, threshold, light, heavy, budget
        self.knob_range = (0.0, float(max_threshold))
        # the sampler reads these from the instance: they depend on the mode
        self.features = frozenset({PROBE_ENTROPY}) if mode == "probe" else frozenset({ENTROPY})
        self.probe_model = light if mode == "probe" else None

    def set_knob(self, value: float) -> None:
        self.threshold = value

    def initial_knob(self, budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> float:
        """The configured threshold: what entropies the models show is known only once they have run."""
        return self.threshold

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(num_steps, num_models)
        check_model_index(self, max(self.light, self.heavy), num_models)

    def act(self, state: DenoiseState) -> torch.Tensor:
        if self.mode == "probe":
            heavy = state.extras[PROBE_ENTROPY] > self.threshold  # NaN (nothing reveals) compares False: light
        else:
            entropy = state.last_entropy
            heavy = (entropy > self.threshold) | entropy.isnan()
        return torch.where(heavy, self.heavy, self.light).to(torch.int64)
