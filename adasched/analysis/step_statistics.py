"""Per-step statistics of sampling trajectories: how much the light model departs from the heavy one, when.

``rollout_records`` drives an ``EventTrajectory`` with a behaviour policy (all-heavy, typically) and, at every
``record_every``-th step of the loop, records per row the path-KL increment the light model would add there
(``adasched.analysis.path_kl.step_kl``: KL(light || heavy) summed over the positions revealing now), with
the router's features of its state: what the KL router is fitted to predict. With a ``seed_baseline`` each
record also holds that model's increment at the same step and positions (the floor), so a router can be fitted
to the excess over it: what the light model loses beyond being another good network. ``masked_kl`` is the
step-importance experiment's measure: the mean KL(heavy || light) over all of a z_t's masked positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from adasched.analysis.path_kl import step_kl
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.features import router_features
from adasched.sampling.policy import ENTROPY, Policy
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import EventTrajectory


@dataclass
class StepRecords:
    """One entry per recorded (row, step); every recorded row still has masked positions (it reveals now)."""

    seed: torch.Tensor  # (N,) int64 sample seed of the row
    step: torch.Tensor  # (N,) int64
    t: torch.Tensor  # (N,) float64
    mask_fraction: torch.Tensor  # (N,) float64
    kl: torch.Tensor  # (N,) float64 path-KL increment of the light model at this step, nats
    features: torch.Tensor  # (N, F) float32, see ``adasched.sampling.features.feature_names``
    floor: torch.Tensor | None = None  # (N,) float64 the seed baseline's increment at the same step and positions; None without one

    def __len__(self) -> int:
        return len(self.seed)

    @classmethod
    def concatenate(cls, parts: Sequence[StepRecords]) -> StepRecords:
        return cls(**{f.name: None if getattr(parts[0], f.name) is None else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def select(self, index: torch.Tensor) -> StepRecords:
        return StepRecords(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in fields(self)})


def masked_kl(heavy: MDLMDenoiser, light: MDLMDenoiser, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B,) mean KL(heavy || light) in float64 over each row's masked positions (NaN where none is masked).

    Both models see the same z_t; the mask token's column (probability 0 under both, "subs") is dropped.
    """
    mask_id = heavy.config.mask_token_id
    masked = tokens == mask_id
    keep = torch.arange(heavy.config.vocab_size, device=tokens.device) != mask_id
    log_p = torch.log_softmax(heavy.project(heavy.hidden_states(tokens, t)[masked]).double()[:, keep], -1)
    log_q = torch.log_softmax(light.project(light.hidden_states(tokens, t)[masked]).double()[:, keep], -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rows = masked.nonzero()[:, 0]
    total = torch.zeros(len(tokens), dtype=torch.float64, device=tokens.device).index_add_(0, rows, kl)
    return total / masked.sum(1).double()


@torch.inference_mode()
def rollout_records(
    models: Sequence[MDLMDenoiser],
    seeds: torch.Tensor,
    spec: SamplingSpec,
    behaviour: Policy,
    record_every: int = 1,
    heavy: int = 0,
    light: int = 1,
    on_step: Callable[[int], None] | None = None,
    seed_baseline: MDLMDenoiser | None = None,
) -> StepRecords:
    """Sample a row per seed with ``behaviour`` and record every ``record_every``-th step of the loop (with the
    ``seed_baseline``'s floor: one more forward per recorded step)."""
    meter = CostMeter([str(i) for i in range(len(models))], [m.config.n_blocks for m in models])
    path = EventTrajectory(models, seeds, spec, meter, features=behaviour.features | {ENTROPY}, probe_model=behaviour.probe_model)
    behaviour.reset(spec.num_steps, len(models))
    parts, index = [], 0
    while not path.done:
        state = path.begin_step()
        if index % record_every == 0:
            tokens, reveal = path.open_step()
            light_everywhere = torch.ones(len(tokens), dtype=torch.int64, device=tokens.device)
            measured = step_kl([models[heavy], models[light]], tokens, state.t, reveal, light_everywhere, seed_baseline=seed_baseline)
            parts.append(
                StepRecords(
                    seed=state.seeds.cpu(), step=state.step.cpu(), t=state.t.cpu(), mask_fraction=state.mask_fraction.double().cpu(),
                    kl=measured.kl.cpu(), features=router_features(state, len(models)),
                    floor=None if measured.floor is None else measured.floor.cpu(),
                )
            )
        action = behaviour.act(state)
        behaviour.observe(state, action, path.advance(action))
        index += 1
        if on_step is not None:
            on_step(1)
    return StepRecords.concatenate(parts)
