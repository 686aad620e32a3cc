"""The routers' inputs, computed from a ``DenoiseState`` alone: the one place they are defined.

The supervised KL router, the PPO router and its training environment all read these columns, so a
router sees at sampling time exactly what it was fitted or trained on.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces

from adasched.sampling.policy import DenoiseState


def feature_names(num_models: int) -> list[str]:
    """The columns of ``router_features``, in order (written next to every fitted or trained router)."""
    return [
        "t",  # noise level at the start of the row's step, 1 -> 0
        "mask_fraction",  # generated positions still masked
        "mask_fraction_drop",  # fraction the row revealed at its previous forward (0 before any)
        "log1p_reveal_count",  # log(1 + positions revealing now)
        "saved_so_far",  # 1 - the row's executed FLOPs / all-heavy's for the same forwards (0 before any)
        "last_entropy",  # mean predictive entropy (nats) of the row's previous forward; 0 when unknown
        "has_entropy",  # 1 where last_entropy is known
        *(f"last_model_{m}" for m in range(num_models)),  # one-hot model of the row's previous forward
    ]


def select_features(features: torch.Tensor, num_models: int, names: list[str]) -> torch.Tensor:
    """The ``names`` columns of ``router_features`` output, in that order (a router fitted on a subset)."""
    everything = feature_names(num_models)
    return features[:, [everything.index(name) for name in names]]


def router_features(state: DenoiseState, num_models: int) -> torch.Tensor:
    """(B, F) float32 features of ``state`` on the CPU, in ``feature_names`` order."""
    mask = state.mask_fraction.detach().double().cpu()
    entropy = state.last_entropy.detach().double().cpu()
    known = ~entropy.isnan()
    spent, heavy = state.flops.detach().double().cpu(), state.all_heavy_flops.detach().double().cpu()
    saved = torch.where(heavy > 0, 1 - spent / heavy.clamp_min(1e-30), 0.0)
    last = state.last_action.detach().cpu()
    columns = [
        state.t.detach().double().cpu(),
        mask,
        state.previous_mask_fraction.detach().double().cpu() - mask,
        torch.log1p(state.reveal_count.detach().double().cpu()),
        saved,
        torch.where(known, entropy, 0.0),
        known.double(),
        (last[:, None] == torch.arange(num_models)).double(),
    ]
    return torch.column_stack(columns).float()


def feature_space(num_models: int) -> spaces.Box:
    """Bounds of the ``feature_names`` columns (the environments' observation space)."""
    low = np.array([0, 0, 0, 0, -np.inf, 0, 0, *[0] * num_models], dtype=np.float32)
    high = np.array([1, 1, 1, np.inf, 1, np.inf, 1, *[1] * num_models], dtype=np.float32)
    return spaces.Box(low, high, dtype=np.float32)
