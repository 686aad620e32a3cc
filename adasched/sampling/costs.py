"""Costs of a sampling run: executed FLOPs, forwards and (optionally) wall-clock per model, and the nominal saving.

Executed FLOPs count what actually ran (rows that revealed something, projections only where revealed);
the all-heavy baseline of the same run is what the same forwards would have cost on model 0, so the
executed saving compares like with like on the same seeds. Counters stay on the models' device and are
read once, by ``summary``: a sampler never waits for the device to learn what a forward cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from adasched.errors import ConfigError


class CostMeter:
    """Accumulates per-model costs; ``blocks`` are the members' depths (for the nominal saving).

    With ``time_models`` every forward is timed per model (CUDA events on a GPU, so timing does not
    synchronize the loop either); without it only the caller's wall clock of the whole run counts.
    """

    def __init__(self, names: list[str], blocks: list[int], time_models: bool = False) -> None:
        self.names, self.blocks, self.time_models = list(names), list(blocks), time_models
        self.batched_forwards = [0] * len(names)  # model calls, counted on the host as they are launched
        self._device: torch.device | None = None
        self._totals: dict[str, torch.Tensor] = {}
        self._wall_s = [0.0] * len(names)
        self._events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def _add(self, name: str, value: torch.Tensor | float, index: int | None = None, device: torch.device | None = None) -> None:
        """Add ``value`` (a device scalar, or a host number added on ``device``) to counter ``name`` (per model
        when ``index`` is given). A host number goes to the device as a kernel argument, not a copy."""
        if self._device is None:
            self._device = value.device if isinstance(value, torch.Tensor) else device
        if name not in self._totals:
            shape = (len(self.names),) if name in ("flops", "forwards") else ()
            self._totals[name] = torch.zeros(shape, dtype=torch.float64, device=self._device)
        target = self._totals[name]
        if isinstance(value, torch.Tensor):
            value = value.to(torch.float64)
        if index is None:
            target += value
        else:
            target[index] += value

    def add_forward(self, model: int, rows: int, flops: float, device: torch.device) -> None:
        """One call of ``model`` on ``rows`` rows, on ``device``, that executed ``flops``."""
        self._add("flops", flops, model, device)
        self._add("forwards", float(rows), model, device)
        self.batched_forwards[model] += 1

    def add_baseline(self, flops: float, device: torch.device) -> None:
        """What all-heavy would have executed for the same rows and projections (probes excluded)."""
        self._add("baseline", flops, device=device)

    def record_decisions(self, nominal: float, decisions: int, device: torch.device) -> None:
        """Count ``decisions`` model choices (rows that reveal) whose (B_0 - B_model) / B_0 sum to ``nominal``:
        the nominal saving averages over these."""
        self._add("nominal", nominal, device=device)
        self._add("decisions", float(decisions), device=device)

    @contextmanager
    def timed(self, model: int, device: torch.device) -> Iterator[None]:
        """Wall clock of a model's forward, when ``time_models`` is on."""
        if not self.time_models:
            yield
        elif device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((model, start, end))
        else:
            clock = time.perf_counter()
            yield
            self._wall_s[model] += time.perf_counter() - clock

    def merge(self, other: CostMeter) -> None:
        """Add the costs ``other`` counted for the same family (another process's share of a run)."""
        if (other.names, other.blocks) != (self.names, self.blocks):
            raise ConfigError(f"cannot merge costs of family {other.names} {other.blocks} into {self.names} {self.blocks}")
        for name, value in other._totals.items():
            for index in range(len(self.names)) if value.dim() else [None]:
                self._add(name, (value if index is None else value[index]).to(self._device or value.device), index)
        self.batched_forwards = [a + b for a, b in zip(self.batched_forwards, other.batched_forwards)]
        self._wall_s = [a + b for a, b in zip(self.wall_s, other.wall_s)]

    def _total(self, name: str) -> list[float] | float:
        value = self._totals.get(name)
        if value is None:
            return [0.0] * len(self.names) if name in ("flops", "forwards") else 0.0
        return value.tolist()

    @property
    def flops(self) -> list[float]:
        return self._total("flops")

    @property
    def forwards(self) -> list[int]:
        return [round(count) for count in self._total("forwards")]

    @property
    def baseline_flops(self) -> float:
        return self._total("baseline")

    @property
    def wall_s(self) -> list[float]:
        if self._events:
            torch.cuda.synchronize()
            for model, start, end in self._events:
                self._wall_s[model] += start.elapsed_time(end) / 1000
            self._events.clear()
        return list(self._wall_s)

    def saved_nominal(self) -> float:
        """The paper's eq. 3 over decisions: mean over (row, step with a reveal) of (B_0 - B_model) / B_0.

        A static schedule decides every step alike, and every step is equally likely to hold a row's
        reveal, so this is the paper's per-step figure in expectation.
        """
        decisions = self._total("decisions")
        return self._total("nominal") / decisions if decisions else 0.0

    def saved_executed(self) -> float:
        """1 - executed FLOPs / the same forwards' FLOPs on model 0."""
        baseline = self.baseline_flops
        return 1.0 - sum(self.flops) / baseline if baseline else 0.0

    def summary(self) -> dict[str, object]:
        flops = self.flops
        summary: dict[str, object] = {
            "flops": {
                "executed": sum(flops),
                "executed_per_model": dict(zip(self.names, flops)),
                "all_heavy_same_forwards": self.baseline_flops,
                "saved_executed": self.saved_executed(),
                "saved_nominal": self.saved_nominal(),
            },
            "forwards": dict(zip(self.names, self.forwards)),
            "batched_forwards": dict(zip(self.names, self.batched_forwards)),
        }
        if self.time_models:
            summary["wall_s_per_model"] = dict(zip(self.names, self.wall_s))
        return summary
