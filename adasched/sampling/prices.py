"""The price of compute as an input of a router: one router for every budget.

A price-conditioned router reads, beside the state's features, the price (nats of quality per full heavy forward's
FLOPs) that its choices are charged; trained on prices drawn per episode from a range, it learns a policy for every
price in it, and ``budget=`` then calibrates the price as a 1-D knob (``policies.learned``).

Prices live on an ``asinh`` scale: ``code = asinh(price / scale)`` is about ``log(2 price / scale)`` above ``scale``,
about ``-log(-2 price / scale)`` below ``-scale`` and linear in between. Under the excess objective a member as good
as a heavy seed costs about nothing, so a positive price however small sends rows to it and the lowest budgets need
a price at or below zero (as the oracle's do); a log scale cannot reach zero, the asinh scale runs through it. The
code is what training draws uniformly and what calibration searches; the router reads its position in the range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adasched.errors import ConfigError

PRICE_FEATURE = "price_position"  # a price-conditioned router's last column: where its price lies in the range (``position``)


@dataclass(frozen=True)
class PriceRange:
    """Prices in [``low``, ``high``] nats per heavy forward, uniform on the asinh scale of ``scale``."""

    low: float
    high: float
    scale: float

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"prices.scale={self.scale} is invalid; it must be positive (nats per heavy forward)")
        if not self.low < self.high:
            raise ConfigError(f"prices.low={self.low} must lie below prices.high={self.high}")

    def encode(self, price: float) -> float:
        return math.asinh(price / self.scale)

    def decode(self, code: float) -> float:
        return self.scale * math.sinh(code)

    @property
    def codes(self) -> tuple[float, float]:
        """The range's ends on the asinh scale: a calibration knob's range."""
        return self.encode(self.low), self.encode(self.high)

    def position(self, codes: torch.Tensor) -> torch.Tensor:
        """Where each code lies in the range, -1 at its low end and 1 at its high end: what the router reads (an
        input of the other features' size, not the code's several units, keeps its tanh units from saturating)."""
        low, high = self.codes
        return 2 * (codes - low) / (high - low) - 1

    def decode_all(self, codes: torch.Tensor) -> torch.Tensor:
        """``decode`` of every code of a tensor."""
        return self.scale * torch.sinh(codes)

    def draw_codes(self, rng: np.random.Generator, count: int) -> torch.Tensor:
        """(count,) float64 price codes, uniform on the asinh scale: what training draws per episode."""
        return torch.as_tensor(rng.uniform(*self.codes, size=count), dtype=torch.float64)

    def check(self, price: float, key: str = "policy.price") -> None:
        """A one-line ConfigError for a price outside the range the router was trained on."""
        if not self.low <= price <= self.high:
            raise ConfigError(f"{key}={price:g} lies outside the prices the router was trained on, [{self.low:g}, {self.high:g}] nats per heavy forward")

    def buckets(self, count: int) -> list[tuple[float, float]]:
        """``count`` equal spans of the range on the asinh scale (where training draws uniformly), as prices."""
        edges = np.linspace(*self.codes, count + 1)
        return [(self.decode(a), self.decode(b)) for a, b in zip(edges[:-1], edges[1:])]

    def as_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high, "scale": self.scale}


def bucket_of(price: float, buckets: Sequence[tuple[float, float]]) -> int:
    """The index of the bucket (consecutive spans, as ``PriceRange.buckets``) holding ``price``; the ends take the rest."""
    return next((i for i, (_, high) in enumerate(buckets) if price <= high), len(buckets) - 1)


def bucket_label(bucket: tuple[float, float]) -> str:
    return f"price {bucket[0]:.3g}..{bucket[1]:.3g}"
