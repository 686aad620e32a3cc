"""adasched's sampler: MDLM's ancestral sampler (no remasking), exact in distribution and much cheaper.

At step t -> s every still-masked position reveals with probability (t - s) / t, and a revealed position takes
a token from the denoiser's p(x0 | z_t). Which positions reveal does not depend on any model, so the sampler
draws that first; then it runs a model only on rows that reveal something, projects to the vocabulary only
at the revealed positions, and skips steps where nothing reveals. Rows of one batch may use different models
(one grouped forward per model). All randomness comes from ``adasched.random_streams``, so the reference
sampler (``adasched.reference_sampler``) produces the same tokens from the same seeds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adasched.costs import CostMeter
from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.random_streams import REVEAL, TOKEN, uniforms
from policies.base import ENTROPY, PROBE_ENTROPY, DenoiseState, Policy, StepOutput


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


class Trajectory(ABC):
    """One batch being denoised, one step at a time: ``begin_step`` -> policy decides -> ``advance``.

    The state, the random numbers, the costs and the policy's features are shared; how the chosen models
    produce the revealed tokens is the subclass's (fast here, MDLM's way in ``adasched.reference_sampler``).
    Stepping from outside the loop is what lets a gymnasium environment drive the same sampler.
    """

    def __init__(
        self,
        models: Sequence[MDLMDenoiser],
        seeds: torch.Tensor,
        num_steps: int,
        seq_len: int,
        meter: CostMeter,
        prefix: torch.Tensor | None = None,
        top_p: float = 1.0,
        budget: float | None = None,
        features: frozenset[str] = frozenset(),
        probe_model: int | None = None,
    ) -> None:
        check_sampling_args(models, num_steps, seq_len, top_p, prefix)
        if PROBE_ENTROPY in features and not (probe_model is not None and 0 <= probe_model < len(models)):
            raise ConfigError(f"probe_model={probe_model!r} must name a family member in [0, {len(models)})")
        self.models, self.seeds, self.num_steps, self.meter = models, seeds, num_steps, meter
        self.top_p, self.budget, self.features, self.probe_model = top_p, budget, features, probe_model
        self.device = next(models[0].parameters()).device
        batch = len(seeds)
        self.mask_id = models[0].config.mask_token_id
        self.tokens = torch.full((batch, seq_len), self.mask_id, dtype=torch.long, device=self.device)
        self.reveal_step = torch.full((batch, seq_len), -1, dtype=torch.long, device=self.device)
        self.prefix_len = 0 if prefix is None else prefix.shape[1]
        if prefix is not None:
            self.tokens[:, : self.prefix_len] = prefix.to(self.device)
        self.positions = torch.arange(seq_len, device=self.device)
        self.row_flops = torch.zeros(batch, dtype=torch.float64, device=self.device)
        self.last_action = torch.full((batch,), -1, dtype=torch.long, device=self.device)
        self.last_entropy = torch.full((batch,), float("nan"), dtype=torch.float64, device=self.device)
        self.full_forward_flops = tuple(float(m.flops_per_forward(seq_len, seq_len)) for m in models)
        trunk = [m.flops_per_forward(seq_len, 0) for m in models]
        self._trunk_flops = torch.tensor(trunk, dtype=torch.float64, device=self.device)
        self._flops_per_projection = torch.tensor([m.flops_per_forward(seq_len, 1) - f for m, f in zip(models, trunk)], dtype=torch.float64, device=self.device)
        self.actions: list[torch.Tensor] = []
        self.step = 0
        self._reveal: torch.Tensor | None = None
        self._state: DenoiseState | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @property
    def done(self) -> bool:
        return self.step == self.num_steps

    @property
    def masked(self) -> torch.Tensor:
        return self.tokens == self.mask_id

    def times(self, step: int) -> tuple[float, float]:
        return 1.0 - step / self.num_steps, 1.0 - (step + 1) / self.num_steps

    def reveals(self, step: int) -> torch.Tensor:
        """(B, L) positions that reveal at ``step``: masked and u < (t - s) / t = 1 / (num_steps - step)."""
        u = uniforms(self.seeds, step, self.positions, REVEAL)
        return self.masked & (u < 1.0 / (self.num_steps - step))

    def row_times(self, t: float) -> torch.Tensor:
        return torch.full((self.batch_size,), t, device=self.device)

    def begin_step(self) -> DenoiseState:
        """Draw which positions reveal now, compute the features the policy asked for, and return the state."""
        if self.done:
            raise RuntimeError(f"the trajectory has finished all {self.num_steps} steps")
        t, s = self.times(self.step)
        reveal = self.reveals(self.step)
        generated = self.tokens.shape[1] - self.prefix_len
        extras = {PROBE_ENTROPY: self.probe(reveal, t)} if PROBE_ENTROPY in self.features else {}
        self._reveal = reveal
        self._state = DenoiseState(
            step=self.step, num_steps=self.num_steps, t=t, s=s,
            mask_fraction=self.masked.sum(1).double() / generated, reveal_count=reveal.sum(1),
            flops=self.row_flops.clone(), model_flops=self.full_forward_flops, budget=self.budget,
            last_action=self.last_action.clone(), last_entropy=self.last_entropy.clone(), seeds=self.seeds,
            extras=extras,
        )
        return self._state

    def advance(self, action: torch.Tensor) -> StepOutput:
        """Run the chosen model of every row (``action``, (B,) indices) for the step ``begin_step`` opened."""
        if self._state is None or self._reveal is None:
            raise RuntimeError("advance() needs begin_step() first")
        action = action.to(self.device)
        if action.shape != (self.batch_size,) or int(action.min()) < 0 or int(action.max()) >= len(self.models):
            raise ValueError(f"action must hold {self.batch_size} model indices in [0, {len(self.models)}), got {action.tolist()}")
        self.meter.record_decisions(action)
        self.actions.append(action)
        reveal = self._reveal
        entropy = self.denoise(reveal, action, self._state.t)
        ran = reveal.any(1)
        self.last_action = torch.where(ran, action, self.last_action)
        self.last_entropy = torch.where(ran, entropy, self.last_entropy)
        self.step += 1
        self._state = self._reveal = None
        return StepOutput(revealed=reveal.sum(1), entropy=entropy)

    @abstractmethod
    def probe(self, reveal: torch.Tensor, t: float) -> torch.Tensor:
        """(B,) mean entropy of the probe model's prediction at the positions revealing now (NaN where none)."""

    @abstractmethod
    def denoise(self, reveal: torch.Tensor, action: torch.Tensor, t: float) -> torch.Tensor:
        """Write the revealed tokens; returns (B,) mean entropy of the draws (NaN where none or not wanted)."""

    def forward(self, model_index: int, rows: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, probe: bool = False) -> torch.Tensor:
        """Logits of model ``model_index`` for ``rows`` at the (len(rows), L) ``positions``, timed and charged.

        A ``probe`` forward is charged to the model but not to the all-heavy baseline: all-heavy would not
        have probed, so the probe's cost shows up as FLOPs not saved.
        """
        model = self.models[model_index]
        with self.meter.timed(model_index, self.device):
            logits = model.project(model.hidden_states(self.tokens[rows], t[rows])[positions])
        projected = positions.sum(1)
        flops = self._trunk_flops[model_index] + self._flops_per_projection[model_index] * projected
        self.row_flops[rows] += flops
        self.meter.add_forward(model_index, len(rows), float(flops.sum()))
        if not probe:
            self.charge_baseline(projected)
        return logits

    def charge_baseline(self, projected: torch.Tensor) -> None:
        """What model 0 would have cost for rows that produced their tokens, each projecting ``projected``."""
        self.meter.add_baseline(float((self._trunk_flops[0] + self._flops_per_projection[0] * projected).sum()))

    def write(self, reveal: torch.Tensor, drawn: torch.Tensor) -> None:
        """Put the tokens ``drawn`` (in row-major order of ``reveal``) at the revealed positions."""
        self.tokens[reveal] = drawn
        self.reveal_step[reveal] = self.step

    def nan_per_row(self) -> torch.Tensor:
        return torch.full((self.batch_size,), float("nan"), dtype=torch.float64, device=self.device)

    def output(self) -> SampleOutput:
        return SampleOutput(self.tokens, self.reveal_step, torch.stack(self.actions))


class FastTrajectory(Trajectory):
    """adasched's sampler: a model runs only on rows that reveal, and projects only the revealed positions."""

    _probe_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # (owner row per position, logits)

    def probe(self, reveal: torch.Tensor, t: float) -> torch.Tensor:
        entropy = self.nan_per_row()
        self._probe_logits = None
        rows = torch.nonzero(reveal.any(1)).squeeze(1)
        if len(rows):
            logits = self.forward(self.probe_model, rows, self.row_times(t), reveal[rows], probe=True)
            owner = rows.repeat_interleave(reveal[rows].sum(1))
            entropy[rows] = mean_entropy_per_row(torch.softmax(logits.double(), -1), owner, self.batch_size)[rows]
            self._probe_logits = (owner, logits)
        return entropy

    def denoise(self, reveal: torch.Tensor, action: torch.Tensor, t: float) -> torch.Tensor:
        entropy = self.nan_per_row()
        active = reveal.any(1)
        if not active.any():
            return entropy
        u = uniforms(self.seeds, self.step, self.positions, TOKEN)
        times = self.row_times(t)
        for model_index in action[active].unique().tolist():
            rows = torch.nonzero(active & (action == model_index)).squeeze(1)
            group = torch.zeros_like(active).index_fill_(0, rows, True)
            group_reveal = reveal & group[:, None]  # row-major order of its True entries = order of `drawn`
            if self._probe_logits is not None and model_index == self.probe_model:
                owner, probe_logits = self._probe_logits
                logits = probe_logits[group[owner]]  # the probe already ran this model here: reuse it
                self.charge_baseline(reveal[rows].sum(1))
            else:
                logits = self.forward(model_index, rows, times, reveal[rows])
            drawn, probs = sample_categorical(logits, u[group_reveal], self.top_p)
            self.write(group_reveal, drawn)
            if ENTROPY in self.features:
                counts = reveal[rows].sum(1)
                owner = torch.repeat_interleave(torch.arange(len(rows), device=self.device), counts)
                entropy[rows] = mean_entropy_per_row(probs, owner, len(rows))
        self._probe_logits = None
        return entropy


def run_policy(path: Trajectory, policy: Policy, on_step: Callable[[int], None] | None = None) -> SampleOutput:
    """The sampling loop: the trajectory owns the math and the costs, the policy only decides."""
    policy.reset(path.batch_size, path.num_steps, len(path.models), seed=int(path.seeds[0]))
    while not path.done:
        state = path.begin_step()
        action = policy.act(state)
        policy.observe(state, action, path.advance(action))
        if on_step is not None:
            on_step(1)  # progress: the caller's bar advances one step
    return path.output()


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
    trajectory_type: type[Trajectory] = FastTrajectory,
) -> SampleOutput:
    """Generate one batch (one row per seed) with ``policy`` choosing among ``models`` (0 = heavy).

    ``trajectory_type`` picks how the models run; ``adasched.reference_sampler`` passes MDLM's way.
    """
    path = trajectory_type(models, seeds, num_steps, seq_len, meter, prefix, top_p, budget, policy.features, policy.probe_model)
    return run_policy(path, policy, on_step)
