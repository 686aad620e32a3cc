"""adasched's sampler: MDLM's ancestral sampler (no remasking), exact in distribution and much cheaper.

At step t -> s every still-masked position reveals with probability (t - s) / t, and a revealed position takes
a token from the denoiser's p(x0 | z_t). Which positions reveal does not depend on any model, so the sampler
draws that first; then it runs a model only on rows that reveal something, projects to the vocabulary only
at the revealed positions, and skips steps where nothing reveals. Rows of one batch may use different models
(one grouped forward per model). All randomness comes from ``adasched.random_streams``, so the reference
sampler (``adasched.reference_sampler``) produces the same tokens from the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adasched.costs import CostMeter
from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.random_streams import REVEAL, TOKEN, uniforms
from policies.base import ENTROPY, DenoiseState, Policy, StepOutput


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, L) generated sequences (prefix included)
    reveal_step: torch.Tensor  # (B, L) step at which each position revealed; -1 for prefix positions
    actions: torch.Tensor  # (num_steps, B) model chosen for each row at each step


def check_sampling_args(models: Sequence[MDLMDenoiser], num_steps: int, seq_len: int, top_p: float, prefix: torch.Tensor | None) -> None:
    """One-line errors for values the loop would otherwise trip over."""
    if num_steps <= 0:
        raise ConfigError(f"sampling.num_steps={num_steps} is invalid; it must be a positive integer")
    if not 0 < seq_len <= models[0].config.seq_len:
        raise ConfigError(f"sampling.seq_len={seq_len} must lie in [1, {models[0].config.seq_len}] (the models' length)")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"sampling.top_p={top_p} is invalid; it must lie in (0, 1]")
    if prefix is not None and prefix.shape[1] >= seq_len:
        raise ConfigError(f"prefix length {prefix.shape[1]} leaves nothing to generate at seq_len={seq_len}")


def sample_categorical(logits: torch.Tensor, u: torch.Tensor, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws in float64 from softmax(logits) (N, V) with uniforms ``u`` (N,); also returns probs.

    Float64 matters: float32 Gumbel-max sampling truncates the tail and lowers perplexity and diversity.
    With ``top_p < 1`` only the smallest set of tokens holding ``top_p`` of the mass is kept (nucleus).
    """
    probs = torch.softmax(logits.double(), dim=-1)
    kept = probs
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already enough
        kept = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cdf = kept.cumsum(dim=-1)
    draws = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return draws.clamp_(max=logits.shape[-1] - 1), probs


def mean_entropy_per_row(probs: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean predictive entropy of each row's positions; ``rows`` (N,) names the row of each of the N positions."""
    entropy = torch.special.entr(probs).sum(-1)
    total = torch.zeros(batch_size, dtype=torch.float64, device=probs.device).index_add_(0, rows, entropy)
    count = torch.zeros(batch_size, dtype=torch.float64, device=probs.device).index_add_(0, rows, torch.ones_like(entropy))
    return total / count  # NaN where a row had no positions


class Trajectory:
    """The state both samplers share: tokens, masks, per-row costs, what the policy sees each step."""

    def __init__(self, models: Sequence[MDLMDenoiser], seeds: torch.Tensor, num_steps: int, seq_len: int, prefix: torch.Tensor | None, budget: float | None) -> None:
        self.models, self.seeds, self.num_steps, self.budget = models, seeds, num_steps, budget
        device = next(models[0].parameters()).device
        self.device = device
        batch = len(seeds)
        self.mask_id = models[0].config.mask_token_id
        self.tokens = torch.full((batch, seq_len), self.mask_id, dtype=torch.long, device=device)
        self.reveal_step = torch.full((batch, seq_len), -1, dtype=torch.long, device=device)
        self.prefix_len = 0 if prefix is None else prefix.shape[1]
        if prefix is not None:
            self.tokens[:, : self.prefix_len] = prefix.to(device)
        self.positions = torch.arange(seq_len, device=device)
        self.row_flops = torch.zeros(batch, dtype=torch.float64, device=device)
        self.last_action = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.last_entropy = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
        self.full_forward_flops = tuple(float(m.flops_per_forward(seq_len, seq_len)) for m in models)
        trunk = [m.flops_per_forward(seq_len, 0) for m in models]
        self._trunk_flops = torch.tensor(trunk, dtype=torch.float64, device=device)
        self._flops_per_projection = torch.tensor([m.flops_per_forward(seq_len, 1) - f for m, f in zip(models, trunk)], dtype=torch.float64, device=device)
        self.actions: list[torch.Tensor] = []

    @property
    def masked(self) -> torch.Tensor:
        return self.tokens == self.mask_id

    def times(self, step: int) -> tuple[float, float]:
        return 1.0 - step / self.num_steps, 1.0 - (step + 1) / self.num_steps

    def reveals(self, step: int) -> torch.Tensor:
        """(B, L) positions that reveal at ``step``: masked and u < (t - s) / t = 1 / (num_steps - step)."""
        u = uniforms(self.seeds, step, self.positions, REVEAL)
        return self.masked & (u < 1.0 / (self.num_steps - step))

    def state(self, step: int, reveal: torch.Tensor) -> DenoiseState:
        t, s = self.times(step)
        generated = self.tokens.shape[1] - self.prefix_len
        return DenoiseState(
            step=step, num_steps=self.num_steps, t=t, s=s,
            mask_fraction=self.masked.sum(1).double() / generated, reveal_count=reveal.sum(1),
            flops=self.row_flops.clone(), model_flops=self.full_forward_flops, budget=self.budget,
            last_action=self.last_action.clone(), last_entropy=self.last_entropy.clone(), seeds=self.seeds,
        )

    def decide(self, policy: Policy, step: int, reveal: torch.Tensor, meter: CostMeter) -> tuple[DenoiseState, torch.Tensor]:
        state = self.state(step, reveal)
        action = policy.act(state).to(self.device)
        meter.record_decisions(action)
        self.actions.append(action)
        return state, action

    def charge(self, meter: CostMeter, model: int, rows: torch.Tensor, projected: torch.Tensor) -> None:
        """Count one forward of ``model`` over ``rows``, each projecting ``projected`` positions."""
        flops = self._trunk_flops[model] + self._flops_per_projection[model] * projected
        baseline = self._trunk_flops[0] + self._flops_per_projection[0] * projected
        self.row_flops[rows] += flops
        meter.add_forward(model, len(rows), float(flops.sum()), float(baseline.sum()))

    def write(self, step: int, reveal: torch.Tensor, drawn: torch.Tensor) -> None:
        """Put the tokens ``drawn`` (in row-major order of ``reveal``) at the revealed positions."""
        self.tokens[reveal] = drawn
        self.reveal_step[reveal] = step

    def finish(self, policy: Policy, state: DenoiseState, action: torch.Tensor, reveal: torch.Tensor, entropy: torch.Tensor) -> None:
        ran = reveal.any(1)
        self.last_action = torch.where(ran, action, self.last_action)
        self.last_entropy = torch.where(ran, entropy, self.last_entropy)
        policy.observe(state, action, StepOutput(revealed=reveal.sum(1), entropy=entropy))

    def output(self) -> SampleOutput:
        return SampleOutput(self.tokens, self.reveal_step, torch.stack(self.actions))


@torch.inference_mode()
def sample(
    models: Sequence[MDLMDenoiser],
    policy: Policy,
    seeds: torch.Tensor,
    num_steps: int,
    seq_len: int,
    meter: CostMeter,
    prefix: torch.Tensor | None = None,
    top_p: float = 1.0,
    budget: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> SampleOutput:
    """Generate one batch (one row per seed) with ``policy`` choosing among ``models`` (0 = heavy)."""
    check_sampling_args(models, num_steps, seq_len, top_p, prefix)
    path = Trajectory(models, seeds, num_steps, seq_len, prefix, budget)
    policy.reset(len(seeds), num_steps, len(models), seed=int(seeds[0]))
    want_entropy = ENTROPY in policy.features
    for step in range(num_steps):
        reveal = path.reveals(step)
        state, action = path.decide(policy, step, reveal, meter)
        entropy = torch.full((len(seeds),), float("nan"), dtype=torch.float64, device=path.device)
        active = reveal.any(1)
        if active.any():
            u = uniforms(seeds, step, path.positions, TOKEN)
            t = torch.full((len(seeds),), state.t, device=path.device)
            for model_index in action[active].unique().tolist():
                rows = torch.nonzero(active & (action == model_index)).squeeze(1)
                model, group = models[model_index], torch.zeros_like(active).index_fill_(0, rows, True)
                group_reveal = reveal & group[:, None]  # row-major order of its True entries = order of `drawn`
                with meter.timed(model_index, path.device):
                    hidden = model.hidden_states(path.tokens[rows], t[rows])[reveal[rows]]
                    drawn, probs = sample_categorical(model.project(hidden), u[group_reveal], top_p)
                path.write(step, group_reveal, drawn)
                counts = reveal[rows].sum(1)
                path.charge(meter, model_index, rows, counts)
                if want_entropy:
                    owner = torch.repeat_interleave(torch.arange(len(rows), device=path.device), counts)
                    entropy[rows] = mean_entropy_per_row(probs, owner, len(rows))
        path.finish(policy, state, action, reveal, entropy)
        if on_step is not None:
            on_step(1)  # progress: the caller's bar advances one step
    return path.output()
