"""Costs of a sampling run: executed FLOPs, forwards and wall-clock per model, and the paper's nominal saving.

Executed FLOPs count what actually ran (rows that revealed something, projections only where revealed);
the all-heavy baseline of the same run is what the same forwards would have cost on model 0, so the
executed saving compares like with like on the same seeds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from adasched.errors import ConfigError


@dataclass
class CostMeter:
    """Accumulates per-model costs; ``blocks`` are the members' depths (for the nominal saving)."""

    names: list[str]
    blocks: list[int]
    flops: list[float] = field(default_factory=list)
    baseline_flops: float = 0.0  # the same forwards on model 0
    forwards: list[int] = field(default_factory=list)  # row-forwards: one per sample that ran the model
    batched_forwards: list[int] = field(default_factory=list)  # model calls
    wall_s: list[float] = field(default_factory=list)
    nominal_saving_sum: float = 0.0  # sum over (row, step) decisions of (B_0 - B_model) / B_0
    decisions: int = 0  # (row, step) decisions seen

    def __post_init__(self) -> None:
        n = len(self.names)
        self.flops, self.forwards, self.batched_forwards, self.wall_s = [0.0] * n, [0] * n, [0] * n, [0.0] * n

    def add_forward(self, model: int, rows: int, flops: float) -> None:
        self.flops[model] += flops
        self.forwards[model] += rows
        self.batched_forwards[model] += 1

    def merge(self, other: CostMeter) -> None:
        """Add the costs ``other`` counted for the same family (another process's share of a run)."""
        if (other.names, other.blocks) != (self.names, self.blocks):
            raise ConfigError(f"cannot merge costs of family {other.names} {other.blocks} into {self.names} {self.blocks}")
        for name in ("flops", "forwards", "batched_forwards", "wall_s"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name))])
        self.baseline_flops += other.baseline_flops
        self.nominal_saving_sum += other.nominal_saving_sum
        self.decisions += other.decisions

    def add_baseline(self, flops: float) -> None:
        """What all-heavy would have executed for the same rows and projections (probes excluded)."""
        self.baseline_flops += flops

    @contextmanager
    def timed(self, model: int, device: torch.device) -> Iterator[None]:
        """Wall-clock of a model's forward (synchronized on GPU, so the time is the kernel's)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.wall_s[model] += time.perf_counter() - start

    def record_decisions(self, action: torch.Tensor) -> None:
        """Count one step's choices, executed or not: the nominal saving counts every step, as the paper."""
        depth = torch.tensor(self.blocks, dtype=torch.float64)
        self.nominal_saving_sum += float((1 - depth[action.cpu()] / depth[0]).sum())
        self.decisions += len(action)

    def saved_nominal(self) -> float:
        """The paper's eq. 3, generalized: mean over rows and all steps of (B_0 - B_model) / B_0."""
        return self.nominal_saving_sum / self.decisions if self.decisions else 0.0

    def saved_executed(self) -> float:
        """1 - executed FLOPs / the same forwards' FLOPs on model 0."""
        return 1.0 - sum(self.flops) / self.baseline_flops if self.baseline_flops else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "flops": {
                "executed": sum(self.flops),
                "executed_per_model": dict(zip(self.names, self.flops)),
                "all_heavy_same_forwards": self.baseline_flops,
                "saved_executed": self.saved_executed(),
                "saved_nominal": self.saved_nominal(),
            },
            "forwards": dict(zip(self.names, self.forwards)),
            "batched_forwards": dict(zip(self.names, self.batched_forwards)),
            "wall_s_per_model": dict(zip(self.names, self.wall_s)),
        }
