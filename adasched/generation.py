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

from adasched.costs import CostMeter
from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling import SampleOutput, sample
from policies.base import Policy

Sampler = Callable[..., SampleOutput]


@dataclass
class Generation:
    seeds: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N, L)
    actions: torch.Tensor  # (num_steps, N)
    prefix_len: int
    wall_s: float  # sampling only (no evaluation), summed over batches


def validation_prompts(blocks: torch.Tensor, seeds: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """The first ``prefix_len`` tokens of a validation block chosen by each sample's seed."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(blocks), generator=generator)
    return blocks[order[seeds % len(blocks)], :prefix_len]


def generate(
    models: Sequence[MDLMDenoiser],
    policy: Policy,
    seeds: torch.Tensor,
    batch_size: int,
    num_steps: int,
    seq_len: int,
    meter: CostMeter,
    prompts: torch.Tensor | None = None,
    top_p: float = 1.0,
    budget: float | None = None,
    sampler: Sampler = sample,
    progress: bool = True,
) -> Generation:
    """One sequence per seed (N,) in batches of ``batch_size``; ``prompts`` (N, k) fix each sample's first k tokens."""
    num_samples = len(seeds)
    for field, value in {"num_samples": num_samples, "batch_size": batch_size}.items():
        if value <= 0:
            raise ConfigError(f"{field}={value} is invalid; it must be a positive integer")
    tokens, actions, wall = [], [], 0.0
    device = next(models[0].parameters()).device
    bar = tqdm(total=-(-num_samples // batch_size) * num_steps, desc=f"sampling [{policy.name}]", unit="step", disable=not progress)
    for start in range(0, num_samples, batch_size):
        batch_seeds = seeds[start : start + batch_size].to(device)
        prefix = None if prompts is None else prompts[start : start + batch_size].to(device)
        clock = time.perf_counter()
        out = sampler(models, policy, batch_seeds, num_steps, seq_len, meter, prefix=prefix, top_p=top_p, budget=budget, on_step=bar.update)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - clock
        tokens.append(out.tokens.cpu())
        actions.append(out.actions.cpu())
    bar.close()
    prefix_len = 0 if prompts is None else prompts.shape[1]
    return Generation(seeds, torch.cat(tokens), torch.cat(actions, dim=1), prefix_len, wall)
