"""What a policy decided on, decision by decision: the state a router could read and the choice it should learn.

``record_decisions`` samples with a policy on the event-driven sampler and keeps, at every decision (row, step),
the router features (``router_features``), named extra features (``adasched.sampling.features.EXTRA_FEATURES``),
the member chosen and the per-member increments the policy measured to choose (the analysis oracle's): the
material of ``adasched.analysis.oracle_features``. The sampler computes what the extra features need; a probe of
``probe_model`` is charged as a deployed router's would be, so the FLOPs the states show (``saved_so_far``) count
it, while the oracle's choices never read them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from adasched.io import atomic_path
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.features import (
    extra_features,
    feature_names,
    needed_features,
    router_features,
)
from adasched.sampling.policy import ENTROPY, PROBE_ENTROPY, DenoiseState, Policy
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import EventTrajectory


@dataclass
class DecisionRecords:
    """One entry per decision (row, step), in the order the sampler made them (each trajectory's steps ascending)."""

    seed: torch.Tensor  # (N,) int64 sample seed: which trajectory
    step: torch.Tensor  # (N,) int64
    choice: torch.Tensor  # (N,) int64 the member the policy chose (0 = heavy)
    increments: torch.Tensor  # (N, num_models) float64 each member's increment as the policy measured it (the heavy's 0)
    features: torch.Tensor  # (N, F) float32 ``router_features``
    extras: torch.Tensor  # (N, E) float32 the extra features, in the order they were asked for

    def __len__(self) -> int:
        return len(self.seed)

    @classmethod
    def concatenate(cls, parts: Sequence[DecisionRecords]) -> DecisionRecords:
        return cls(**{f.name: torch.cat([getattr(part, f.name) for part in parts]) for f in fields(cls)})

    def save(self, path: Path, extra_names: Sequence[str]) -> None:
        """As safetensors, the columns' names in its metadata (rerun an analysis without sampling again)."""
        num_models = self.increments.shape[1]
        metadata = {"feature_names": ",".join(feature_names(num_models)), "extra_names": ",".join(extra_names)}
        with atomic_path(path) as partial:
            save_file({f.name: getattr(self, f.name).contiguous() for f in fields(self)}, partial, metadata=metadata)


@torch.inference_mode()
def record_decisions(
    models: Sequence[MDLMDenoiser],
    policy: Policy,
    seeds: torch.Tensor,
    spec: SamplingSpec,
    extra_names: Sequence[str],
    increments: Callable[[DenoiseState], torch.Tensor],
    probe_model: int | None = None,
    prompts: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> DecisionRecords:
    """Sample a row per seed (continuing its prompt, if given) with ``policy`` and record every decision.

    ``increments(state)`` gives (num_models, R) per-member increments of the state's rows (the oracle's own, which it
    remembers from deciding); ``probe_model`` is the member probed for extra features that need a probe.
    """
    needs = policy.features | needed_features(extra_names) | {ENTROPY}
    probe = policy.probe_model if policy.probe_model is not None else probe_model
    if probe_model is not None and probe != probe_model:
        raise ValueError(f"policy {policy.name} probes model {probe}, the extra features ask for model {probe_model}")
    meter = CostMeter([str(i) for i in range(len(models))], [m.config.n_blocks for m in models])
    path = EventTrajectory(models, seeds, spec, meter, prompts, needs, probe if PROBE_ENTROPY in needs else None)
    policy.reset(spec.num_steps, len(models))
    parts = []
    while not path.done:
        state = path.begin_step()
        action = policy.act(state)
        parts.append(
            DecisionRecords(
                seed=state.seeds.cpu(), step=state.step.cpu(), choice=action.cpu(), increments=increments(state).double().cpu().T,
                features=router_features(state, len(models)), extras=extra_features(state, extra_names),
            )
        )
        policy.observe(state, action, path.advance(action))
        if on_step is not None:
            on_step(1)
    return DecisionRecords.concatenate(parts)
