"""Data-parallel sampling and scoring through Lightning's ``Trainer.predict``: one process per device.

Each process takes every ``world``-th sample. A sample keeps its seed and prompt whichever process draws it,
and the sampler's randomness is per (sample, step, position), so N devices give exactly the tokens and
scores of one, about N times faster. At the end of ``predict`` the processes exchange their shares, so every
process holds the whole run (and only rank zero writes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from adasched.analysis.evaluation import SampleScores, sample_nll
from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.generation import Generation, generate
from adasched.sampling.policy import Policy
from adasched.sampling.spec import SamplingSpec


def predict_trainer(accelerator: str, devices: int, num_nodes: int) -> L.Trainer:
    """A Trainer for ``predict`` only: DDP over ``devices`` x ``num_nodes`` processes (gloo on CPU, nccl on GPU)."""
    for field, value in {"devices": devices, "num_nodes": num_nodes}.items():
        if value < 1:
            raise ConfigError(f"parallel.{field}={value} is invalid; it must be a positive integer")
    return L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp" if devices * num_nodes > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
    )


class _ShardedPredict(L.LightningModule):
    """Runs ``predict_share`` (defined by subclasses) on this process's share of ``num_items`` indices and
    gathers all shares.

    The shares are strided (rank r takes r, r + world, ...) and built after the processes start, so no index
    is padded in or drawn twice; once ``predict`` returns, ``gathered`` holds (rank, indices, output) of every
    batch of every process.
    """

    def __init__(self, num_items: int, batch_size: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is invalid; it must be a positive integer")
        self.num_items, self.batch_size = num_items, batch_size
        self.outputs: list[Any] = []
        self.gathered: list[Any] = []

    def predict_dataloader(self) -> DataLoader:
        share = list(range(self.global_rank, self.num_items, self.trainer.world_size))
        return DataLoader(share, batch_size=self.batch_size, collate_fn=torch.tensor)

    def predict_share(self, indices: torch.Tensor) -> Any:
        """The output for a batch of this process's indices (CPU tensors in, CPU tensors out)."""
        raise NotImplementedError

    def predict_step(self, indices: torch.Tensor, batch_idx: int) -> None:
        indices = indices.cpu()  # Lightning moved the batch to the device; seeds and prompts index on the CPU
        self.outputs.append((self.global_rank, indices, self.predict_share(indices)))

    def on_predict_epoch_end(self) -> None:
        shares: list[list[Any]] = [self.outputs]
        if self.trainer.world_size > 1:
            shares = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(shares, self.outputs)
        self.gathered = [output for share in shares for output in share]
        if sorted(i for _, indices, _ in self.gathered for i in indices.tolist()) != list(range(self.num_items)):
            raise RuntimeError(f"data-parallel predict returned another set of indices than 0..{self.num_items - 1}")

    def in_index_order(self) -> torch.Tensor:
        """Where each index's row is in the concatenated gathered outputs (batches of shares interleave)."""
        return torch.cat([indices for _, indices, _ in self.gathered]).argsort()


class _Sampling(_ShardedPredict):
    def __init__(
        self, models: Sequence[MDLMDenoiser], names: list[str], policy: Policy, seeds: torch.Tensor, prompts: torch.Tensor | None, spec: SamplingSpec,
    ) -> None:
        super().__init__(len(seeds), spec.batch_size)
        self.models, self.names = nn.ModuleList(models), names
        self.policy, self.seeds, self.prompts, self.spec = policy, seeds, prompts, spec

    def predict_share(self, indices: torch.Tensor) -> tuple[Generation, CostMeter]:
        meter = CostMeter(self.names, [m.config.n_blocks for m in self.models])
        prompts = None if self.prompts is None else self.prompts[indices]
        generation = generate(list(self.models), self.policy, self.seeds[indices], self.spec, meter, prompts=prompts, progress=False)
        return generation, meter


class _Scoring(_ShardedPredict):
    def __init__(self, texts: list[str], evaluator: nn.Module, tokenizer: Any, batch_size: int, contexts: list[str] | None) -> None:
        super().__init__(len(texts), batch_size)
        self.texts, self.evaluator, self.tokenizer, self.contexts = texts, evaluator, tokenizer, contexts

    def predict_share(self, indices: torch.Tensor) -> SampleScores:
        share = indices.tolist()
        contexts = None if self.contexts is None else [self.contexts[i] for i in share]
        return sample_nll([self.texts[i] for i in share], self.evaluator, self.tokenizer, len(share), None, self.device, contexts)


def generate_data_parallel(
    trainer: L.Trainer, models: Sequence[MDLMDenoiser], policy: Policy, seeds: torch.Tensor, spec: SamplingSpec, meter: CostMeter,
    prompts: torch.Tensor | None = None,
) -> Generation:
    """``generate`` spread over the trainer's processes; ``meter`` gets every process's costs, and ``wall_s`` is
    the slowest process's sampling time (what the run waited for)."""
    module = _Sampling(models, meter.names, policy, seeds, prompts, spec)
    trainer.predict(module, return_predictions=False)
    wall_per_rank = [0.0] * trainer.world_size
    for rank, _, (generation, share_meter) in module.gathered:
        meter.merge(share_meter)
        wall_per_rank[rank] += generation.wall_s
    position = module.in_index_order()
    tokens = torch.cat([generation.tokens for _, _, (generation, _) in module.gathered])[position]
    reveal_step = torch.cat([generation.reveal_step for _, _, (generation, _) in module.gathered])[position]
    actions = torch.cat([generation.actions for _, _, (generation, _) in module.gathered], dim=1)[:, position]
    prefix_len = 0 if prompts is None else prompts.shape[1]
    return Generation(seeds, tokens, reveal_step, actions, prefix_len, max(wall_per_rank))


def score_data_parallel(
    trainer: L.Trainer, texts: list[str], evaluator: nn.Module, tokenizer: Any, batch_size: int, contexts: list[str] | None = None
) -> SampleScores:
    """``sample_nll`` of ``texts`` (continuing ``contexts``, if given) under the evaluator, spread over the
    trainer's processes, in text order."""
    module = _Scoring(texts, evaluator, tokenizer, batch_size, contexts)
    trainer.predict(module, return_predictions=False)
    position = module.in_index_order()
    scores = [output for _, _, output in module.gathered]
    return SampleScores(nll=torch.cat([s.nll for s in scores])[position], tokens=torch.cat([s.tokens for s in scores])[position])
