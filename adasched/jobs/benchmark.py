"""``benchmark(cfg)``: time adasched's samplers against the reference sampler, in one process, and write JSON.

The event-driven sampler, the step sampler (adasched's first) and MDLM's reference sampler run the same
models, seeds and schedules, so they do the same denoising and reveal the same positions; only the work
per step differs. For every size the job reports the samplers' throughput under
``static_heavy`` and, for each other policy, the wall-clock saving against ``static_heavy`` next to the
saving the FLOPs count predicts for the same run, because the gap between the two is what a schedule
really buys on a given machine.

A size either times whole trajectories or a slice: steps [k0, k0 + k) of a ``num_steps`` trajectory
(``slice_start`` = k0, ``steps_timed`` = k), for models too large to sample 1000 steps of on a CPU. The
slice starts from a state with round(L * k0 / num_steps) positions revealed, held as a random prefix, and
runs ``num_steps - k0`` steps, stopped after k (``SamplingSpec.stop_step``). A masked position then reveals with probability
1 / (num_steps - k0 - j) at step j, exactly as at step k0 + j of the full trajectory, so each timed step
does the work of the step it stands for (the revealed tokens' values and places change neither sampler's
work). The policy lays its schedule over the k timed steps as if they were its whole run, so
``static_sandwich`` still gives a quarter of the timed steps to the light model.

Every size is timed at each of ``precisions``. Against the machine's limit, every cell reports the FLOP/s
its model forwards achieved (the FLOPs ``CostMeter`` counts over the timed wall) next to a bare matmul of the
trunk's own shapes (a full batch's rows) in the same dtype, timed in the same process. Policies with a
``budget`` (the dynamic routers) are calibrated first, on seeds apart from the timed ones, and only on sizes
that time whole trajectories: a budget is a saving over a whole run.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from adasched.compute import compute_dtype, resolve_device, resolve_precision
from adasched.errors import ConfigError
from adasched.io import write_json_atomic
from adasched.jobs.run import BASELINE_POLICY
from adasched.models.dit import DenoiserConfig, MDLMDenoiser
from adasched.models.export import DTYPES
from adasched.models.family import load_family
from adasched.sampling.calibration import Calibratable, calibrate
from adasched.sampling.costs import CostMeter
from adasched.sampling.generation import Sampler
from adasched.sampling.policy import DenoiseState, Policy, StepOutput
from adasched.sampling.reference import reference_sample, step_sample
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import sample
from policies import make_policy

SAMPLERS: dict[str, Sampler] = {"event": sample, "step": step_sample, "reference": reference_sample}


@dataclasses.dataclass
class Size:
    """One benchmark setting: a family on a device and what of its trajectories is timed."""

    name: str
    names: list[str]
    models: list[MDLMDenoiser]
    num_steps: int
    seq_len: int
    batch_size: int
    num_samples: int
    slice_start: int
    steps_timed: int
    warmup_steps: int

    @property
    def whole(self) -> bool:
        return self.slice_start == 0 and self.steps_timed == self.num_steps

    @property
    def prefix_len(self) -> int:
        """Positions revealed before step ``slice_start``, in expectation."""
        return round(self.seq_len * self.slice_start / self.num_steps)

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)


class OverSlice(Policy):
    """Gives ``inner`` the timed steps as its whole run; without it a schedule would be laid over the
    ``num_steps - slice_start`` steps the sampler is started for, and ``static_sandwich`` would time only
    its light head."""

    def __init__(self, inner: Policy, span: int) -> None:
        self.inner, self.span = inner, span
        self.name, self.features, self.budget, self.probe_model = inner.name, inner.features, inner.budget, inner.probe_model

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(self.span, num_models)
        self.inner.reset(self.span, num_models)

    def act(self, state: DenoiseState) -> torch.Tensor:
        return self.inner.act(dataclasses.replace(state, num_steps=self.span))

    def observe(self, state: DenoiseState, action: torch.Tensor, output: StepOutput) -> None:
        self.inner.observe(dataclasses.replace(state, num_steps=self.span), action, output)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is unknown; choose auto or one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def build_models(spec: DictConfig, seq_len: int, seed: int) -> tuple[list[str], list[MDLMDenoiser]]:
    """A shipped family (``family``) or random weights of the given shapes (``random_family``); model 0 heavy."""
    if ("family" in spec) == ("random_family" in spec):
        raise ConfigError("a benchmark size needs exactly one of `family` (a folder) or `random_family` (shapes)")
    if "family" in spec:
        members = list(spec.family.members)
        family = load_family({name: Path(spec.family.dir) / name for name in members})
        return members, list(family.values())
    shape = spec.random_family
    members = list(shape.members)
    if len(members) != len(shape.n_blocks):
        raise ConfigError(f"random_family names {len(members)} members but gives {len(shape.n_blocks)} depths (n_blocks)")
    torch.manual_seed(seed)
    common = {"vocab_size": shape.vocab_size, "mask_token_id": shape.mask_token_id, "seq_len": seq_len, "d_model": shape.d_model, "n_heads": shape.n_heads}
    return members, [MDLMDenoiser(DenoiserConfig(n_blocks=depth, **common)).eval() for depth in shape.n_blocks]


def check_size(name: str, spec: DictConfig) -> None:
    """One-line errors for counts the timing loop would otherwise trip over late, after loading models."""
    for field in ("num_steps", "seq_len", "batch_size", "num_samples"):
        if not isinstance(spec[field], int) or spec[field] <= 0:
            raise ConfigError(f"size.{name}.{field}={spec[field]!r} is invalid; it must be a positive integer")
    if not 0 <= spec.slice_start < spec.num_steps:
        raise ConfigError(f"size.{name}.slice_start={spec.slice_start} must lie in [0, {spec.num_steps})")
    remaining = spec.num_steps - spec.slice_start
    if spec.steps_timed is not None and not 0 < spec.steps_timed <= remaining:
        raise ConfigError(f"size.{name}.steps_timed={spec.steps_timed} must lie in [1, {remaining}] (or null: to the end)")
    if spec.warmup_steps < 0:
        raise ConfigError(f"size.{name}.warmup_steps={spec.warmup_steps} must be >= 0")
    if round(spec.seq_len * spec.slice_start / spec.num_steps) >= spec.seq_len:
        raise ConfigError(f"size.{name}.slice_start={spec.slice_start} leaves no masked position at seq_len={spec.seq_len}")


def check_budgets_whole(name: str, spec: DictConfig, policies: list[TimedPolicy]) -> None:
    """A budget is a saving over a whole run: a size that times a slice cannot calibrate one."""
    whole = spec.slice_start == 0 and spec.steps_timed in (None, spec.num_steps)
    budgeted = [policy.label for policy in policies if policy.budget is not None]
    if budgeted and not whole:
        raise ConfigError(f"size {name} times a slice, but policy {budgeted[0]} has a budget: time budgets on whole trajectories")


def load_size(name: str, spec: DictConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Size:
    """Models on ``device`` in ``dtype``; ``spec`` already passed ``check_size``."""
    names, models = build_models(spec, spec.seq_len, seed)
    steps_timed = spec.num_steps - spec.slice_start if spec.steps_timed is None else spec.steps_timed
    return Size(
        name, names, [model.to(device=device, dtype=dtype) for model in models], spec.num_steps, spec.seq_len,
        spec.batch_size, spec.num_samples, spec.slice_start, steps_timed, spec.warmup_steps,
    )


def slice_prefix(size: Size, seed: int) -> torch.Tensor | None:
    """Random non-mask tokens for the positions revealed before the slice (None for a slice from step 0)."""
    if size.prefix_len == 0:
        return None
    config = size.models[0].config
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size - 1, (size.num_samples, size.prefix_len), generator=generator)
    return tokens + (tokens >= config.mask_token_id)  # skip the mask id


def work(size: Size, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(seeds, prefix) of the size's samples on the models' device: sample i has seed ``seed + i`` in every cell."""
    device = next(size.models[0].parameters()).device
    prefix = slice_prefix(size, seed)
    return (seed + torch.arange(size.num_samples)).to(device), None if prefix is None else prefix.to(device)


def sample_cell(sampler: Sampler, size: Size, policy: Policy, samples: tuple[torch.Tensor, torch.Tensor | None], steps: int, meter: CostMeter, bar: tqdm) -> float:
    """Seconds the sampler takes for the first ``steps`` steps of the size's run (slices: of its slice)."""
    if not size.whole:
        policy = OverSlice(policy, size.steps_timed)
    seeds, prefix = samples
    spec = SamplingSpec(size.num_steps - size.slice_start, size.seq_len, size.batch_size, stop_step=steps)
    device = seeds.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sampler(size.models, policy, seeds, spec, meter, prompts=prefix, on_step=bar.update)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def depths(size: Size) -> list[int]:
    return [model.config.n_blocks for model in size.models]


@dataclasses.dataclass
class TimedPolicy:
    """A policy as the benchmark times it: its label in the tables, its name and settings, its budget, and the
    knob that budget calibrated to (None: none to calibrate)."""

    label: str
    name: str
    kwargs: dict[str, Any]
    budget: float | None = None
    knob: float | None = None

    def make(self) -> Policy:
        policy = make_policy(self.name, **self.kwargs)
        if self.knob is not None:
            policy.set_knob(self.knob)
        return policy


def timed_policies(config: dict[str, dict[str, Any]]) -> list[TimedPolicy]:
    """``label: {policy: name, **kwargs}`` entries (``policy`` defaults to the label), static_heavy first; each
    built once here, so a bad setting, or an analysis-only policy (its wall clock times its own evaluation forwards),
    fails before any model loads."""
    entries = {BASELINE_POLICY: {}} | config
    policies = []
    for label, settings in entries.items():
        kwargs = dict(settings)
        policy = TimedPolicy(label, kwargs.pop("policy", label), kwargs)
        instance = policy.make()
        if instance.analysis_only:
            raise ConfigError(f"policies.{label}: {policy.name} is analysis only, not a sampler to time; run it with experiments/run.py")
        policy.budget = instance.budget
        policies.append(policy)
    return policies


def run_cell(size: Size, sampler: str, policy: TimedPolicy, samples: tuple[torch.Tensor, torch.Tensor | None], steps: int, bar: tqdm) -> tuple[float, CostMeter]:
    """Seconds to run ``steps`` steps of ``samples`` with one sampler and policy, and the run's costs."""
    meter = CostMeter(size.names, depths(size))
    return sample_cell(SAMPLERS[sampler], size, policy.make(), samples, steps, meter, bar), meter


def calibrate_policies(size: Size, policies: list[TimedPolicy], calibration: DictConfig) -> dict[str, dict[str, Any]]:
    """Fit the knob of every policy with a budget on the calibration seeds, at the size's shape and precision."""
    found: dict[str, dict[str, Any]] = {}
    for policy in policies:
        if policy.budget is None or policy.knob is not None:
            continue
        instance = policy.make()
        if not isinstance(instance, Calibratable):
            continue
        print(f"calibrating {policy.label} to save {instance.budget:.1%} of executed FLOPs on {calibration.num_samples} calibration samples")
        seeds = calibration.seed + torch.arange(calibration.num_samples, device=next(size.models[0].parameters()).device)
        spec = SamplingSpec(size.num_steps, size.seq_len, size.batch_size)
        result = calibrate(instance, size.models, seeds, spec, calibration.tolerance)
        policy.knob = result.knob
        found[policy.label] = {"knob": result.knob, "saved_executed": result.saved_executed, "tries": len(result.history)}
    return found


def time_cells(size: Size, policies: list[TimedPolicy], samplers: list[str], repeats: int, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Wall-clock of every (policy, sampler) cell, ``repeats`` times, interleaved so drift hits all cells alike.

    Every cell first runs ``warmup_steps`` steps of one batch untimed.
    """
    samples = work(size, seed)
    first_batch = (samples[0][: size.batch_size], None if samples[1] is None else samples[1][: size.batch_size])
    cells = [(policy, sampler) for policy in policies for sampler in samplers]
    warmup = min(size.warmup_steps, size.steps_timed)
    walls: dict[tuple[str, str], list[float]] = {(policy.label, sampler): [] for policy, sampler in cells}
    meters: dict[tuple[str, str], CostMeter] = {}  # FLOPs are the same every repeat: keep the last
    with tqdm(desc=f"benchmark [{size.name}]", unit="step") as bar:
        if warmup > 0:
            for policy, sampler in cells:
                bar.set_postfix_str(f"warm-up {policy.label} {sampler}")
                run_cell(size, sampler, policy, first_batch, warmup, bar)
        for repeat in range(repeats):
            for policy, sampler in cells:
                bar.set_postfix_str(f"repeat {repeat + 1}/{repeats} {policy.label} {sampler}")
                wall, meters[policy.label, sampler] = run_cell(size, sampler, policy, samples, size.steps_timed, bar)
                walls[policy.label, sampler].append(wall)
    results: dict[str, dict[str, dict[str, Any]]] = {policy.label: {} for policy in policies}
    for (label, sampler), times in walls.items():
        results[label][sampler] = cell_summary(size, times, meters[label, sampler])
    return results


def cell_summary(size: Size, walls: list[float], meter: CostMeter) -> dict[str, Any]:
    """Median wall-clock and the rates derived from it; a slice's samples/s assumes every step costs alike."""
    wall = statistics.median(walls)
    per_step = wall / (size.num_batches * size.steps_timed)  # per step of a batch: comparable across samplers
    rate = {"samples_per_s": size.num_samples / wall} if size.whole else {"samples_per_s_extrapolated": size.batch_size / (per_step * size.num_steps)}
    return {
        "wall_s": wall,
        "wall_s_repeats": walls,
        "s_per_step": per_step,  # one step of one batch of batch_size rows
        **rate,
        "flops_executed": sum(meter.flops),
        "gflops_per_s": sum(meter.flops) / wall / 1e9,  # what the model forwards achieved over the timed wall
        "flops_saved_executed": meter.saved_executed(),
        "flops_saved_nominal": meter.saved_nominal(),
        "batched_forwards": dict(zip(size.names, meter.batched_forwards)),
    }


def bare_matmul_gflops(model: MDLMDenoiser, rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of the trunk's four matmuls (QKV, attention output, MLP in and out) on ``rows`` token rows in
    ``dtype``, alone: the most a forward of this shape could reach on this machine (best of ``repeats``)."""
    d, r = model.config.d_model, model.config.mlp_ratio
    device = next(model.parameters()).device
    shapes = [(d, 3 * d), (d, d), (d, r * d), (r * d, d)]
    operands = [(torch.randn(rows, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)) for k, n in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for x, w in operands:
            x @ w.T
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        once()
        return flops / min(once() for _ in range(repeats)) / 1e9


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def savings(cells: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per policy and sampler: wall-clock saved against static_heavy (same sampler, same seeds) vs predicted."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for policy, by_sampler in cells.items():
        if policy == BASELINE_POLICY:
            continue
        result[policy] = {}
        for sampler, cell in by_sampler.items():
            realized = 1 - cell["wall_s"] / cells[BASELINE_POLICY][sampler]["wall_s"]
            result[policy][sampler] = {
                "wall_saved": realized,
                "flops_saved_executed": cell["flops_saved_executed"],
                "flops_saved_nominal": cell["flops_saved_nominal"],
                "realized_over_predicted": ratio(realized, cell["flops_saved_executed"]),
            }
    return result


def describe_timing(size: Size) -> str:
    if size.whole:
        return f"whole {size.num_steps}-step trajectories of {size.num_samples} samples in batches of {size.batch_size}"
    return (
        f"steps [{size.slice_start}, {size.slice_start + size.steps_timed}) of a {size.num_steps}-step trajectory, from a state "
        f"with {size.prefix_len} of {size.seq_len} positions revealed (a random prefix); each policy's schedule laid "
        f"over the {size.steps_timed} timed steps; samples_per_s_extrapolated = batch_size / (s_per_step * num_steps)"
    )


def speedups(cells: dict[str, dict[str, dict[str, Any]]], faster: str, slower: str) -> dict[str, float | None]:
    """Per policy: how many times ``faster``'s wall clock fits in ``slower``'s (None if either was not timed)."""
    return {policy: ratio(c[slower]["wall_s"], c[faster]["wall_s"]) if faster in c and slower in c else None for policy, c in cells.items()}


def set_precision(size: Size, precision: str) -> torch.dtype:
    """Make the size's models compute in ``precision``; returns the dtype its matmuls run in."""
    trunk = compute_dtype(precision, key="precisions")
    for model in size.models:
        model.compute_dtype = trunk
    return trunk or next(size.models[0].parameters()).dtype


def benchmark_precision(size: Size, precision: str, policies: list[TimedPolicy], cfg: DictConfig) -> dict[str, Any]:
    """One size at one precision: calibrations, timings, savings, and the forwards against a bare matmul."""
    matmul_dtype = set_precision(size, precision)
    for policy in policies:
        policy.knob = None  # a knob calibrated at another precision may miss the budget at this one
    calibrations = calibrate_policies(size, policies, cfg.calibration)
    cells = time_cells(size, policies, list(cfg.samplers), cfg.repeats, cfg.seed)
    bare = bare_matmul_gflops(size.models[0], size.batch_size * size.seq_len, matmul_dtype)
    for by_sampler in cells.values():
        for cell in by_sampler.values():
            cell["of_bare_matmul"] = cell["gflops_per_s"] / bare
    return {
        "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
        "bare_matmul_gflops_per_s": bare,
        "calibrations": calibrations,
        "cells": cells,
        "speedup_event_over_reference": speedups(cells, "event", "reference"),
        "speedup_event_over_step": speedups(cells, "event", "step"),
        "savings_vs_" + BASELINE_POLICY: savings(cells),
    }


def benchmark_size(load: Callable[[], Size], precisions: list[str], policies: list[TimedPolicy], cfg: DictConfig) -> dict[str, Any]:
    """A size's setup (what was timed, so numbers from different runs can be compared) and each precision's
    timings, each on freshly loaded models (bf16 storage rounds the weights for good)."""
    by_precision = {precision: benchmark_precision(load(), precision, policies, cfg) for precision in precisions}
    size = load()
    config = size.models[0].config
    result: dict[str, Any] = {
        "setup": {
            "members": size.names, "depths": depths(size), "d_model": config.d_model, "n_heads": config.n_heads,
            "vocab": config.vocab_size, "seq_len": size.seq_len, "num_steps": size.num_steps, "batch_size": size.batch_size,
            "num_samples": size.num_samples, "slice_start": size.slice_start, "steps_timed": size.steps_timed,
            "warmup_steps": min(size.warmup_steps, size.steps_timed), "timed": describe_timing(size),
        },
        "precisions": by_precision,
    }
    if {"bf16", "float32"} <= by_precision.keys():
        bf16, float32 = by_precision["bf16"]["cells"], by_precision["float32"]["cells"]
        result["speedup_bf16_over_float32"] = {
            policy: {sampler: ratio(float32[policy][sampler]["wall_s"], cell["wall_s"]) for sampler, cell in by_sampler.items()} for policy, by_sampler in bf16.items()
        }
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    cpus = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    return cpus[0] if cpus else platform.processor() or platform.machine()


def selected_sizes(cfg: DictConfig) -> list[str]:
    choices = ", ".join(cfg.size)
    if not cfg.sizes:
        raise ConfigError(f"sizes=[] selects nothing to time; choose from: {choices}")
    for name in cfg.sizes:
        if name not in cfg.size:
            raise ConfigError(f"unknown size {name!r}; choose from: {choices}")
    return list(cfg.sizes)


def resolved_precisions(names: list[str], device: torch.device) -> list[str]:
    """Each of ``precisions`` with ``auto`` resolved for ``device``, once each, in order."""
    if not names:
        raise ConfigError("precisions=[] selects nothing to time; choose one or more of: auto, float32, bf16")
    return list(dict.fromkeys(resolve_precision(name, device, key="precisions") for name in names))


def size_policies(cfg: DictConfig, name: str) -> list[TimedPolicy]:
    """The size's own ``policies`` where it names them, else the shared ones."""
    chosen = cfg.size[name].get("policies") or cfg.policies
    return timed_policies(OmegaConf.to_container(chosen, resolve=True))


def benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Time every selected size and write ``run_dir/benchmark.json``."""
    names = selected_sizes(cfg)  # first: bad values fail before any model loads
    unknown = [sampler for sampler in cfg.samplers if sampler not in SAMPLERS]
    if unknown or not cfg.samplers:
        raise ConfigError(f"samplers={list(cfg.samplers)} is invalid; choose one or more of: {', '.join(SAMPLERS)}")
    if cfg.repeats <= 0:
        raise ConfigError(f"repeats={cfg.repeats} is invalid; it must be a positive integer")
    policies = {name: size_policies(cfg, name) for name in names}
    for name in names:
        check_size(name, cfg.size[name])
        check_budgets_whole(name, cfg.size[name], policies[name])
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    precisions = resolved_precisions(list(cfg.precisions), device)
    with torch_threads(cfg.threads):
        results = benchmark_sizes(cfg, names, policies, precisions, device, dtype)
    print(format_table(results))
    return results


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` CPU threads (None: torch's default), then restore the count, so a caller's is kept."""
    if count is not None and count <= 0:
        raise ConfigError(f"threads={count} is invalid; it must be a positive integer or null")
    before = torch.get_num_threads()
    torch.set_num_threads(count or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def benchmark_sizes(
    cfg: DictConfig, names: list[str], policies: dict[str, list[TimedPolicy]], precisions: list[str], device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Time the sizes one after another, rewriting the JSON after each, so a late failure keeps the rest."""
    results: dict[str, Any] = {
        "metadata": {
            "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."), "precisions": precisions,
            "repeats": cfg.repeats, "statistic": "median over repeats", "seed": cfg.seed, "baseline": BASELINE_POLICY,
            "policies": {name: {p.label: {"policy": p.name, **p.kwargs} for p in chosen} for name, chosen in policies.items()},
        },
        "sizes": {},
    }
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        load = functools.partial(load_size, name, cfg.size[name], device, dtype, cfg.seed)
        results["sizes"][name] = benchmark_size(load, precisions, policies[name], cfg)
        write_json_atomic(run_dir / "benchmark.json", results)
    return results


def format_table(results: dict[str, Any]) -> str:
    """One row per size, precision, policy and sampler; '~' marks a slice's samples/s, extrapolated from its steps.

    GFLOP/s is what the model forwards achieved; '/bare' divides it by a bare matmul of the trunk's shapes.
    """
    meta = results["metadata"]
    lines = [
        f"device {meta['device_name']} ({meta['device']}, {meta['dtype']} weights, {meta['threads']} threads), torch {meta['torch']}, median of {meta['repeats']}",
        f"{'size':10} {'precision':9} {'policy':18} {'sampler':9} {'s/step':>9} {'samples/s':>10} {'GFLOP/s':>8} {'/bare':>6} {'/ref':>7} {'/step':>7} "
        f"{'bf16/f32':>8} {'wall saved':>10} {'FLOPs saved':>11} {'real/pred':>9}",
    ]
    for name, size in results["sizes"].items():
        for precision, timed in size["precisions"].items():
            saved = timed["savings_vs_" + meta["baseline"]]
            lines.append(f"{name:10} {precision:9} bare {timed['matmul_dtype']} matmul of the trunk's shapes: {timed['bare_matmul_gflops_per_s']:.1f} GFLOP/s")
            for policy, by_sampler in timed["cells"].items():
                for sampler, cell in by_sampler.items():
                    rate = f"{cell['samples_per_s']:.3g}" if "samples_per_s" in cell else f"~{cell['samples_per_s_extrapolated']:.3g}"
                    over_reference = timed["speedup_event_over_reference"][policy] if sampler == "event" else None
                    over_step = timed["speedup_event_over_step"][policy] if sampler == "event" else None
                    bf16_speedup = size.get("speedup_bf16_over_float32", {}).get(policy, {}).get(sampler) if precision == "bf16" else None
                    row = saved.get(policy, {}).get(sampler, {})  # the baseline has no saving
                    lines.append(
                        f"{name:10} {precision:9} {policy:18} {sampler:9} {cell['s_per_step']:9.4f} {rate:>10} {cell['gflops_per_s']:8.1f} "
                        f"{cell['of_bare_matmul']:6.0%} {fmt(over_reference, '.2f', 'x'):>7} {fmt(over_step, '.2f', 'x'):>7} "
                        f"{fmt(bf16_speedup, '.2f', 'x'):>8} {fmt(row.get('wall_saved'), '.1%'):>10} "
                        f"{fmt(row.get('flops_saved_executed'), '.1%'):>11} {fmt(row.get('realized_over_predicted'), '.2f'):>9}"
                    )
    return "\n".join(lines)


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"
