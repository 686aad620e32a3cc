"""Per-step statistics of sampling trajectories: how much the light model departs from the heavy one, when.

``rollout_records`` drives a ``FastTrajectory`` with a behaviour policy (all-heavy by default) and, at every
``record_every``-th step, runs the heavy and the light model on the same z_t and records per row the mean
KL(heavy || light) over the row's masked positions, with the router's state features. The KL router is fitted
on these records; the step-importance experiment reads the same records (t, mask fraction, KL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from adasched import sampling  # a module import: sampling -> policies -> the KL router -> this module
from adasched.costs import CostMeter
from adasched.models.dit import MDLMDenoiser
from policies.base import ENTROPY, DenoiseState, Policy
from policies.static import StaticHeavy

# The router's inputs, in column order; ``state_features`` is the one place that computes them.
FEATURE_NAMES = (
    "t",  # noise level at the start of the step
    "mask_fraction",  # fraction of generated positions still masked
    "mask_fraction_drop",  # mask fraction revealed by the previous step (0 at the first step)
    "log1p_reveal_count",  # log(1 + positions revealing now), in tokens of this family's sequence length
    "last_entropy",  # mean entropy (nats) of the row's last forward; 0 when unknown
    "has_entropy",  # 1 where last_entropy is known
)


def state_features(state: DenoiseState, previous_mask_fraction: torch.Tensor | None = None) -> torch.Tensor:
    """(B, F) float32 features of ``state`` in ``FEATURE_NAMES`` order, on the CPU.

    ``previous_mask_fraction`` is the mask fraction of the row's previous state (None at the first step):
    the state itself holds no history, so training rollouts and the policy both carry it.
    """
    mask_fraction = state.mask_fraction.detach().double().cpu()
    drop = torch.zeros_like(mask_fraction) if previous_mask_fraction is None else previous_mask_fraction.double().cpu() - mask_fraction
    entropy = state.last_entropy.detach().double().cpu()
    known = ~entropy.isnan()
    columns = [
        torch.full_like(mask_fraction, state.t),
        mask_fraction,
        drop,
        torch.log1p(state.reveal_count.detach().double().cpu()),
        torch.where(known, entropy, 0.0),
        known.double(),
    ]
    return torch.stack(columns, dim=1).float()


@dataclass
class StepRecords:
    """One entry per recorded (row, step); rows with nothing left masked are not recorded (no KL there)."""

    seed: torch.Tensor  # (N,) int64 sample seed of the row
    step: torch.Tensor  # (N,) int64
    t: torch.Tensor  # (N,) float64
    mask_fraction: torch.Tensor  # (N,) float64
    kl: torch.Tensor  # (N,) float64 mean KL(heavy || light) over the row's masked positions, nats
    features: torch.Tensor  # (N, F) float32, see FEATURE_NAMES

    def __len__(self) -> int:
        return len(self.seed)

    @classmethod
    def concatenate(cls, parts: Sequence[StepRecords]) -> StepRecords:
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def select(self, index: torch.Tensor) -> StepRecords:
        return StepRecords(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


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
    num_steps: int,
    seq_len: int,
    behaviour: Policy | None = None,
    record_every: int = 1,
    heavy: int = 0,
    light: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> StepRecords:
    """Sample one batch (a row per seed) with ``behaviour`` and record every ``record_every``-th step."""
    policy = behaviour or StaticHeavy()
    meter = CostMeter([str(i) for i in range(len(models))], [m.config.n_blocks for m in models])
    path = sampling.FastTrajectory(models, seeds, num_steps, seq_len, meter, features=policy.features | {ENTROPY}, probe_model=policy.probe_model)
    policy.reset(path.batch_size, num_steps, len(models), seed=int(seeds[0]))
    parts, previous = [], None
    while not path.done:
        state = path.begin_step()
        features = state_features(state, previous)
        previous = state.mask_fraction
        if state.step % record_every == 0:
            kl = masked_kl(models[heavy], models[light], path.tokens, path.row_times(state.t)).cpu()
            rows = (state.mask_fraction > 0).cpu()
            parts.append(
                StepRecords(
                    seed=seeds.cpu()[rows], step=torch.full((int(rows.sum()),), state.step), t=torch.full((int(rows.sum()),), state.t, dtype=torch.float64),
                    mask_fraction=state.mask_fraction.double().cpu()[rows], kl=kl[rows], features=features[rows],
                )
            )
        action = policy.act(state)
        policy.observe(state, action, path.advance(action))
        if on_step is not None:
            on_step(1)
    return StepRecords.concatenate(parts)
