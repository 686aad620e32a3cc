"""The routers' inputs, computed from a ``DenoiseState`` alone: the one place they are defined.

The supervised KL router, the PPO router and its training environment all read these columns, so a
router sees at sampling time exactly what it was fitted or trained on.

``router_features`` has fixed columns: the shipped routers were fitted and trained on exactly those. Further
features (``EXTRA_FEATURES``) are computed only on request, by name, from what the state's ``extras`` hold; each
names the policy feature the sampler must compute for it, and so what it costs (``NEED_COSTS``). A router fitted
on named features (``named_features``) declares those needs and reads the same values at sampling time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from gymnasium import spaces

from adasched.errors import ConfigError
from adasched.sampling.policy import (
    ENTROPY,
    MASKED,
    PROBE_ENTROPY,
    PROBE_MARGIN,
    PROBE_MAX_PROB,
    REVEALING,
    DenoiseState,
)
from adasched.sampling.prices import PRICE_FEATURE, PriceRange


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


def feature_space(num_models: int, extras: Sequence[str] = (), prices: PriceRange | None = None) -> spaces.Box:
    """Bounds of the ``router_input_names`` columns (the environments' observation space); every extra feature is
    non-negative."""
    low = [0, 0, 0, 0, -np.inf, 0, 0, *[0] * num_models, *[0] * len(extras), *([-1] if prices else [])]
    high = [1, 1, 1, np.inf, 1, np.inf, 1, *[1] * num_models, *[np.inf] * len(extras), *([1] if prices else [])]
    return spaces.Box(np.array(low, dtype=np.float32), np.array(high, dtype=np.float32), dtype=np.float32)


# What each policy feature costs a deployed router that asks the sampler for it.
NEED_COSTS = {
    ENTROPY: "free: the entropy of the row's own draws at its previous forward",
    PROBE_ENTROPY: "one forward of the probe (light) model projecting the revealing positions, charged; rows that then run it reuse it",
    REVEALING: "free: z_t and the reveal plan, which the sampler holds",
}


@dataclass(frozen=True)
class ExtraFeature:
    """A feature beyond ``router_features``' columns: the policy feature it needs and how it reads the state."""

    needs: str  # what the sampler must compute for it (``adasched.sampling.policy``); its cost is in NEED_COSTS
    compute: Callable[[DenoiseState], torch.Tensor]  # (B,) float64 on the host, finite


def probe_value(key: str, state: DenoiseState) -> torch.Tensor:
    """A probe statistic; 0 where a row reveals nothing (no probe ran there: the reference sampler's rows)."""
    return state.extras[key].detach().double().cpu().nan_to_num(0.0)


def last_heavy_entropy(state: DenoiseState) -> torch.Tensor:
    """``last_entropy`` is the entropy of whichever model ran the row's previous forward (``last_action``): the
    heavy's only where that was model 0, else 0."""
    entropy = state.last_entropy.detach().double().cpu()
    return torch.where((state.last_action.cpu() == 0) & ~entropy.isnan(), entropy, 0.0)


def reveal_layout(state: DenoiseState) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L) host masks of the positions revealing now and of those already revealed in z_t (prompts included)."""
    return state.extras[REVEALING].cpu(), ~state.extras[MASKED].cpu()


def over_revealing(values: torch.Tensor, revealing: torch.Tensor) -> torch.Tensor:
    """(R,) mean of per-position ``values`` (R, L) over each row's revealing positions; 0 for a row revealing none."""
    return (values.double() * revealing).sum(1) / revealing.sum(1).clamp(min=1)


def neighbour_revealed(offset: int, state: DenoiseState) -> torch.Tensor:
    """Fraction of the revealing positions whose neighbour at ``offset`` (-1 left, +1 right) is revealed; the
    sequence's ends have no neighbour there and count as unrevealed."""
    revealing, revealed = reveal_layout(state)
    neighbour = revealed.roll(-offset, 1)  # neighbour[:, i] = revealed[:, i + offset]
    neighbour[:, 0 if offset < 0 else -1] = False  # what the roll wrapped around
    return over_revealing(neighbour, revealing)


def nearest_revealed_distance(state: DenoiseState) -> torch.Tensor:
    """Mean over the revealing positions of the distance to the nearest revealed token, as a fraction of the
    sequence length (1 where nothing is revealed yet)."""
    revealing, revealed = reveal_layout(state)
    length = revealed.shape[1]
    index = torch.arange(length).expand_as(revealed)
    before = torch.where(revealed, index, -2 * length).cummax(1).values  # the last revealed position at or before i
    after = torch.where(revealed, index, 3 * length).flip(1).cummin(1).values.flip(1)  # the first at or after i
    distance = torch.minimum(index - before, after - index).clamp(max=length)
    return over_revealing(distance / length, revealing)


def relative_position(state: DenoiseState) -> torch.Tensor:
    """Mean position of the revealing positions, 0 at the sequence's start and 1 at its end."""
    revealing = state.extras[REVEALING].cpu()
    length = revealing.shape[1]
    return over_revealing(torch.arange(length).expand_as(revealing) / max(length - 1, 1), revealing)


EXTRA_FEATURES: dict[str, ExtraFeature] = {
    "probe_entropy": ExtraFeature(PROBE_ENTROPY, partial(probe_value, PROBE_ENTROPY)),  # nats, mean over the revealing positions
    "probe_max_prob": ExtraFeature(PROBE_ENTROPY, partial(probe_value, PROBE_MAX_PROB)),  # the probe's top probability there
    "probe_margin": ExtraFeature(PROBE_ENTROPY, partial(probe_value, PROBE_MARGIN)),  # its top minus its second probability
    "last_heavy_entropy": ExtraFeature(ENTROPY, last_heavy_entropy),
    "left_revealed": ExtraFeature(REVEALING, partial(neighbour_revealed, -1)),
    "right_revealed": ExtraFeature(REVEALING, partial(neighbour_revealed, 1)),
    "nearest_revealed_distance": ExtraFeature(REVEALING, nearest_revealed_distance),
    "relative_position": ExtraFeature(REVEALING, relative_position),
}
# Where each need leaves its values in ``state.extras`` (ENTROPY's are the state's ``last_entropy``)
NEED_EXTRAS = {PROBE_ENTROPY: (PROBE_ENTROPY, PROBE_MAX_PROB, PROBE_MARGIN), REVEALING: (REVEALING, MASKED)}


def check_feature_names(names: Sequence[str], num_models: int) -> None:
    """A ConfigError naming the first of ``names`` that is neither a ``router_features`` column nor an extra feature."""
    known = [*feature_names(num_models), *EXTRA_FEATURES]
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown router feature {name!r}; known: {', '.join(known)}")


def needed_features(names: Sequence[str]) -> frozenset[str]:
    """The policy features the sampler must compute for the extra features among ``names``."""
    return frozenset(EXTRA_FEATURES[name].needs for name in names if name in EXTRA_FEATURES)


def extra_features(state: DenoiseState, names: Sequence[str]) -> torch.Tensor:
    """(B, len(names)) float32 extra features of ``state`` on the CPU, in ``names`` order; each needs its policy
    feature computed by the sampler (``needed_features``)."""
    columns = []
    for name in names:
        feature = EXTRA_FEATURES[name]
        missing = [key for key in NEED_EXTRAS.get(feature.needs, ()) if key not in state.extras]
        if missing:
            raise ValueError(f"feature {name!r} needs the sampler to compute {feature.needs!r}: the state holds no {missing[0]!r}")
        columns.append(feature.compute(state))
    return torch.column_stack(columns).float() if columns else torch.zeros(state.batch_size, 0)


def named_features(state: DenoiseState, num_models: int, names: Sequence[str]) -> torch.Tensor:
    """(B, len(names)) float32: each of ``names`` a ``router_features`` column or an extra feature, in that order."""
    columns = feature_names(num_models)
    base = router_features(state, num_models)
    extras = [name for name in names if name not in columns]
    computed = extra_features(state, extras)
    picked = [base[:, columns.index(name)] if name in columns else computed[:, extras.index(name)] for name in names]
    return torch.stack(picked, 1) if picked else torch.zeros(state.batch_size, 0)


def router_input_names(num_models: int, extras: Sequence[str], priced: bool) -> list[str]:
    """The columns of ``router_inputs``: ``router_features``' own, then ``extras``, then the price's position if ``priced``."""
    return [*feature_names(num_models), *extras, *([PRICE_FEATURE] if priced else [])]


def router_inputs(state: DenoiseState, num_models: int, extras: Sequence[str], price_positions: torch.Tensor | None) -> torch.Tensor:
    """(B, F) float32 inputs of the PPO router and its environment, in ``router_input_names`` order: the same code at
    training and at sampling time. ``price_positions`` (B,) are where the rows' prices lie in the trained range
    (``adasched.sampling.prices.PriceRange.position``); None for a router trained at one price."""
    columns = [router_features(state, num_models), extra_features(state, extras)]
    if price_positions is not None:
        columns.append(price_positions.detach().cpu().float()[:, None])
    return torch.cat(columns, 1)
