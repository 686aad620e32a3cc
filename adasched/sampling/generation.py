"""Generate many samples in batches with one policy: seeds, prompts, progress, timing.

Sample i of a run always has seed ``base_seed + i`` (and, in prefix mode, the same prompt), whatever the
policy and the batch size: policies are compared on common random numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.policy import Policy
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import SampleOutput, sample

Sampler = Callable[..., SampleOutput]


@dataclass
class Generation:
    seeds: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N, L)
    reveal_step: torch.Tensor  # (N, L) step at which each position revealed; -1 for the prompt
    actions: torch.Tensor  # (num_steps, N) model per step; -1 where the sample revealed nothing
    prefix_len: int
    wall_s: float  # sampling only (no evaluation)


def validation_prompts(blocks: torch.Tensor, seeds: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """The first ``prefix_len`` tokens of a validation block chosen by each sample's seed."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(blocks), generator=generator)
    return blocks[order[seeds % len(blocks)], :prefix_len]


def generate(
    models: Sequence[MDLMDenoiser],
    policy: Policy,
    seeds: torch.Tensor,
    spec: SamplingSpec,
    meter: CostMeter,
    prompts: torch.Tensor | None = None,
    sampler: Sampler = sample,
    progress: bool = True,
) -> Generation:
    """One sequence per seed (N,), ``spec.batch_size`` rows at a time; ``prompts`` (N, k) fix each sample's first k tokens."""
    if len(seeds) == 0:
        raise ConfigError("sampling.num_samples=0 is invalid; it must be a positive integer")
    device = next(models[0].parameters()).device
    prompts = None if prompts is None else prompts.to(device)
    with tqdm(desc=f"sampling [{policy.name}]", unit="step", disable=not progress) as bar:
        clock = time.perf_counter()
        out = sampler(models, policy, seeds.to(device), spec, meter, prompts=prompts, on_step=bar.update, on_start=lambda total: bar.reset(total))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - clock
    prefix_len = 0 if prompts is None else prompts.shape[1]
    return Generation(seeds, out.tokens.cpu(), out.reveal_step.cpu(), out.actions.cpu(), prefix_len, wall)
