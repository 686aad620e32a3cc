"""adasched's sampler: MDLM's ancestral sampler (no remasking), exact in distribution, driven by reveal events.

At step t -> s every still-masked position reveals with probability (t - s) / t = 1 / (num_steps - step),
and a revealed position takes a token from the denoiser's p(x0 | z_t). Which positions reveal does not
depend on any model, so the step at which every position of a sample reveals is drawn before any model
runs (``reveal_steps``). A sample's tokens change only at those steps: between them z_t is constant and no
model needs to run. The event-driven sampler therefore moves every row straight to its own next reveal
step, asks the policy about all of them at once, and runs each chosen model on all its rows in one forward,
projecting only the revealed positions. A row that finishes hands its slot to the next sample (continuous
batching), so every forward covers ``batch_size`` rows while samples remain.

The plan also fixes, on the host, everything a policy sees but the entropies (each row's step, mask fraction,
positions revealing, FLOPs so far), so policies decide on the host and every forward's shape is known there:
on a GPU the event-driven loop queues its work without waiting for the device, unless its policy reads an
entropy. Tokens, plans and the math stay on the device.

All randomness comes from ``adasched.sampling.random_streams``, keyed by (sample seed, step, position), so the
reference sampler (``adasched.sampling.reference``), which steps all rows through every step as MDLM does,
produces the same tokens from the same seeds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.policy import (
    ENTROPY,
    MASKED,
    PROBE_ENTROPY,
    PROBE_MARGIN,
    PROBE_MAX_PROB,
    REVEALING,
    Z_T,
    DenoiseState,
    Policy,
    StepOutput,
)
from adasched.sampling.random_streams import REVEAL, TOKEN, uniform_grid, uniforms_at
from adasched.sampling.spec import SamplingSpec

GRID_ELEMENTS = 1 << 22  # uniforms drawn at once by ``reveal_steps``: bounds its memory (32 MiB)
# Tokens per model call on a CPU: a forward of 64 rows x 128 tokens runs ~15% slower per row than 16 rows at a
# time (its activations leave the cache); a GPU takes every row in one call.
CPU_FORWARD_TOKENS = 2048


@dataclass
class SampleOutput:
    seeds: torch.Tensor  # (N,) the samples' seeds, in the order they were given
    tokens: torch.Tensor  # (N, L) generated sequences (prompt included)
    reveal_step: torch.Tensor  # (N, L) step at which each position revealed; -1 for prompt positions
    actions: torch.Tensor  # (num_steps, N) model chosen for each sample at each step; -1 where it revealed nothing


def reveal_steps(seeds: torch.Tensor, num_steps: int, seq_len: int, prefix_len: int = 0) -> torch.Tensor:
    """(N, L) the step at which each position of each sample reveals (-1 for the prompt's positions).

    A masked position reveals at step k when its REVEAL uniform for k is below 1 / (num_steps - k), the
    same test the reference sampler makes step by step; the last step's threshold is 1, so all reveal.
    """
    device = seeds.device
    generated = torch.arange(prefix_len, seq_len, device=device)
    thresholds = 1.0 / (num_steps - torch.arange(num_steps, device=device, dtype=torch.float64))
    first = torch.full((len(seeds), len(generated)), num_steps - 1, dtype=torch.int64, device=device)
    found = torch.zeros_like(first, dtype=torch.bool)
    chunk = max(1, GRID_ELEMENTS // max(1, len(seeds) * len(generated)))
    for start in range(0, num_steps, chunk):
        steps = torch.arange(start, min(start + chunk, num_steps), device=device)
        hit = uniform_grid(seeds, steps, generated, REVEAL) < thresholds[steps][None, :, None]
        new = hit.any(1) & ~found
        first = torch.where(new, start + hit.int().argmax(1), first)
        found |= new
    plan = torch.full((len(seeds), seq_len), -1, dtype=torch.int64, device=device)
    plan[:, prefix_len:] = first
    return plan


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (N, V) with all but the smallest set of tokens holding ``top_p`` of the mass zeroed (not renormalized)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already enough
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def sample_categorical(logits: torch.Tensor, u: torch.Tensor, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws in float64 from softmax(logits) (N, V) with uniforms ``u`` (N,); also returns probs.

    Float64 matters: float32 Gumbel-max sampling truncates the tail and lowers perplexity and diversity.
    With ``top_p < 1`` only the smallest set of tokens holding ``top_p`` of the mass is kept (nucleus).
    """
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = nucleus(probs, top_p).cumsum(dim=-1)
    draws = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return draws.clamp_(max=logits.shape[-1] - 1), probs


def row_means(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows, ...) float64 means of per-position ``values`` (N, ...) by the row ``rows`` (N,) names for each."""
    total = torch.zeros(num_rows, *values.shape[1:], dtype=torch.float64, device=values.device).index_add_(0, rows, values.double())
    count = torch.zeros(num_rows, dtype=torch.float64, device=values.device).index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64, device=values.device))
    return total / count.view(-1, *[1] * (values.dim() - 1))  # NaN where a row had no positions


def mean_entropy_per_row(probs: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Mean predictive entropy of each row's positions; ``rows`` (N,) names the row of each of the N positions."""
    return row_means(torch.special.entr(probs).sum(-1), rows, num_rows)


PROBE_STATISTICS = (PROBE_ENTROPY, PROBE_MAX_PROB, PROBE_MARGIN)  # the columns of ``probe_statistics``, as extras keys


def probe_statistics(probs: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows, 3) each row's mean entropy, top probability and margin (top minus second probability) of
    ``probs`` (N, V) over its positions (``rows`` as in ``mean_entropy_per_row``): what the probe tells a policy."""
    top = probs.topk(2, dim=-1).values
    return row_means(torch.stack([torch.special.entr(probs).sum(-1), top[:, 0], top[:, 0] - top[:, 1]], 1), rows, num_rows)


@dataclass
class StepCounts:
    """Per model, the rows of a step that reveal and the positions they reveal: the step's forward shapes."""

    rows: list[int]
    positions: list[int]


@dataclass
class StepRows:
    """The rows of one step on both sides: on the host what the policy sees and what sizes the forwards, on the
    models' device what indexes the tokens and draws the random numbers."""

    slots: torch.Tensor  # (R,) host
    steps: torch.Tensor  # (R,) host
    reveal_count: torch.Tensor  # (R,) host: positions each row reveals now
    device_slots: torch.Tensor  # (R,) the same slots, on the device
    device_steps: torch.Tensor  # (R,)
    reveal: torch.Tensor  # (R, L) on the device: the positions revealing now


class Trajectory(ABC):
    """Samples being denoised, stepped from outside: ``begin_step`` -> the policy decides -> ``advance``.

    ``batch_size`` slots each hold one sample's tokens (on the models' device) and, on the host, the history its
    policy may read (last model, last entropy, mask fraction at its previous forward, FLOPs so far at the
    event-driven sampler's prices and all-heavy's for the same forwards). That history is a few numbers per row
    and depends only on the reveal plan and the actions, so the policy decides on the host and the step's
    forward shapes are known there: the loop need not wait for the device, except for what a policy asks to
    read from it (entropies). The history is updated only where a row reveals, identically in every subclass,
    so every sampler shows the policy the same states. How the chosen models produce the tokens, and which
    rows a step covers, is the subclass's. Stepping from outside the loop is what lets a gymnasium environment
    drive the same sampler.
    """

    def __init__(
        self,
        models: Sequence[MDLMDenoiser],
        seeds: torch.Tensor,
        spec: SamplingSpec,
        meter: CostMeter,
        prompts: torch.Tensor | None = None,
        features: frozenset[str] = frozenset(),
        probe_model: int | None = None,
    ) -> None:
        spec.check(models, prompts)
        if PROBE_ENTROPY in features and not (probe_model is not None and 0 <= probe_model < len(models)):
            raise ConfigError(f"probe_model={probe_model!r} must name a family member in [0, {len(models)})")
        self.models, self.spec, self.meter, self.features, self.probe_model = models, spec, meter, features, probe_model
        self.device = next(models[0].parameters()).device
        self.mask_id = models[0].config.mask_token_id
        self.prefix_len = 0 if prompts is None else prompts.shape[1]
        self.generated = spec.seq_len - self.prefix_len
        self.positions = torch.arange(spec.seq_len, device=self.device)
        self.model_flops = tuple(float(m.flops_per_forward(spec.seq_len, spec.seq_len)) for m in models)
        # per model: a forward's trunk and one projected position (host numbers, and per row on the host)
        self.trunk = [float(m.flops_per_forward(spec.seq_len, 0)) for m in models]
        self.projection = [float(m.flops_per_forward(spec.seq_len, 1)) - f for m, f in zip(models, self.trunk)]
        self.trunk_flops = torch.tensor(self.trunk, dtype=torch.float64)
        self.projection_flops = torch.tensor(self.projection, dtype=torch.float64)
        self.depth_saving = torch.tensor([1 - m.config.n_blocks / models[0].config.n_blocks for m in models], dtype=torch.float64)
        # the samples, given up front or enqueued later (an environment's next episodes): seeds on the host, the
        # rest on the device
        self.seeds = torch.zeros(0, dtype=torch.int64)
        self.device_seeds = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.prompts = None if prompts is None else torch.zeros(0, self.prefix_len, dtype=torch.int64, device=self.device)
        self.tokens_out = torch.zeros(0, spec.seq_len, dtype=torch.int64, device=self.device)
        self.plan = torch.zeros(0, spec.seq_len, dtype=torch.int64, device=self.device)
        self.actions_out = torch.zeros(spec.num_steps, 0, dtype=torch.int64, device=self.device)
        self.num_finished = 0
        # the slots, one row each: tokens, plans and seeds on the device ...
        slots = spec.batch_size
        self.tokens = torch.full((slots, spec.seq_len), self.mask_id, dtype=torch.int64, device=self.device)
        self.row_plan = torch.zeros(slots, spec.seq_len, dtype=torch.int64, device=self.device)
        self.row_seeds = torch.zeros(slots, dtype=torch.int64, device=self.device)
        # ... and on the host what the policy sees
        self.sample_of = torch.full((slots,), -1, dtype=torch.int64)  # -1: empty
        self.slot_seeds = torch.zeros(slots, dtype=torch.int64)
        self.masked = torch.zeros(slots, dtype=torch.int64)  # generated positions still masked
        self.last_action = torch.full((slots,), -1, dtype=torch.int64)
        self.last_entropy = torch.full((slots,), float("nan"), dtype=torch.float64)
        self.previous_mask = torch.ones(slots, dtype=torch.float64)
        self.row_flops = torch.zeros(slots, dtype=torch.float64)
        self.row_all_heavy = torch.zeros(slots, dtype=torch.float64)
        self._decision: tuple[StepRows, DenoiseState, torch.Tensor] | None = None
        self._reused: dict[int, torch.Tensor] = {}  # see ``reuse_logits``
        self.enqueue(seeds, prompts)

    # -- samples -------------------------------------------------------------------------------------

    def enqueue(self, seeds: torch.Tensor, prompts: torch.Tensor | None = None) -> None:
        """Add samples (one per seed) to be denoised after those already given."""
        if (prompts is None) != (self.prompts is None):
            raise ConfigError("either every sample of a trajectory has a prompt or none has")
        seeds = seeds.to(torch.int64)
        device_seeds = seeds.to(self.device)
        self.seeds = torch.cat([self.seeds, seeds.cpu()])
        self.device_seeds = torch.cat([self.device_seeds, device_seeds])
        if prompts is not None:
            self.prompts = torch.cat([self.prompts, prompts.to(self.device, torch.int64)])
        self.plan = torch.cat([self.plan, reveal_steps(device_seeds, self.spec.num_steps, self.spec.seq_len, self.prefix_len)])
        self.tokens_out = torch.cat([self.tokens_out, torch.full((len(seeds), self.spec.seq_len), self.mask_id, device=self.device)])
        self.actions_out = torch.cat([self.actions_out, torch.full((self.spec.num_steps, len(seeds)), -1, device=self.device)], dim=1)

    @property
    def num_samples(self) -> int:
        return len(self.seeds)

    def load(self, slots: torch.Tensor, samples: torch.Tensor) -> None:
        """Start ``samples`` (host indices) in ``slots`` (host indices): fully masked after their prompt, no history."""
        device_slots, device_samples = self.to_device(slots), self.to_device(samples)
        self.row_seeds[device_slots] = self.device_seeds[device_samples]
        self.row_plan[device_slots] = self.plan[device_samples]
        tokens = torch.full((len(slots), self.spec.seq_len), self.mask_id, dtype=torch.int64, device=self.device)
        if self.prompts is not None:
            tokens[:, : self.prefix_len] = self.prompts[device_samples]
        self.tokens[device_slots] = tokens
        self.sample_of[slots] = samples
        self.slot_seeds[slots] = self.seeds[samples]
        self.masked[slots] = self.generated
        self.last_action[slots] = -1
        self.last_entropy[slots] = float("nan")
        self.previous_mask[slots] = 1.0
        self.row_flops[slots] = 0.0
        self.row_all_heavy[slots] = 0.0

    def to_device(self, values: torch.Tensor | list[int]) -> torch.Tensor:
        """Host values on the models' device; to a GPU through pinned memory, asynchronously (a copy from pageable
        memory would wait for the device to finish its queue). On a CPU the result may share memory with ``values``."""
        host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def unload(self, slots: torch.Tensor) -> None:
        """Keep the finished samples of ``slots`` (host indices) and empty the slots."""
        self.tokens_out[self.to_device(self.sample_of[slots])] = self.tokens[self.to_device(slots)]
        self.sample_of[slots] = -1

    # -- one step ------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def done(self) -> bool:
        """No row is left to denoise."""

    @property
    @abstractmethod
    def total_steps(self) -> int:
        """How many ``begin_step``/``advance`` rounds the samples given so far take (for progress bars)."""

    def open_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, L) z_t of the rows of the step ``begin_step`` opened, and the (R, L) positions they reveal (device)."""
        if self._decision is None:
            raise RuntimeError("open_step() needs begin_step() first")
        return self.z_t(self._decision[0])

    def z_t(self, rows: StepRows) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, L) z_t of ``rows`` and the (R, L) positions they reveal now (device; rows revealing nothing reveal none)."""
        return self.tokens[rows.device_slots], rows.reveal

    @abstractmethod
    def next_rows(self) -> StepRows:
        """The rows of the next step."""

    def noise_level(self, steps: torch.Tensor) -> torch.Tensor:
        """Float64 t at the start of each of ``steps`` (on the host for the policy, on the device for the models)."""
        return 1.0 - steps.double() / self.spec.num_steps

    def begin_step(self) -> DenoiseState:
        """Pick the next step's rows, compute the features the policy asked for, and return their (host) state."""
        if self.done:
            raise RuntimeError("the trajectory has no rows left to denoise")
        rows = self.next_rows()
        slots = rows.slots
        state = DenoiseState(
            num_steps=self.spec.num_steps, step=rows.steps, t=self.noise_level(rows.steps),
            mask_fraction=self.masked[slots].double() / self.generated, previous_mask_fraction=self.previous_mask[slots],
            reveal_count=rows.reveal_count, flops=self.row_flops[slots], all_heavy_flops=self.row_all_heavy[slots],
            model_flops=self.model_flops, last_action=self.last_action[slots], last_entropy=self.last_entropy[slots],
            seeds=self.slot_seeds[slots],
        )
        probe_flops = torch.zeros(len(slots), dtype=torch.float64)
        if PROBE_ENTROPY in self.features:
            probed = self.probe(rows).cpu()  # the policy reads the device: its one wait
            state.extras.update(zip(PROBE_STATISTICS, probed.unbind(1)))
            probe_flops = self.note_forward(slots, self.probe_model, rows.reveal_count, probe=True)[0]
        if REVEALING in self.features:  # already on the device: free to hand over
            tokens, reveal = self.z_t(rows)
            state.extras[Z_T], state.extras[REVEALING], state.extras[MASKED] = tokens, reveal, tokens == self.mask_id
        self._decision = (rows, state, probe_flops)
        return state

    def advance(self, action: torch.Tensor) -> StepOutput:
        """Run every row's chosen model (``action``, one index per row of the state) and write its tokens."""
        if self._decision is None:
            raise RuntimeError("advance() needs begin_step() first")
        rows, state, probe_flops = self._decision
        action = action.to("cpu", torch.int64)
        if action.shape != (len(rows.slots),):
            raise ValueError(f"action must hold {len(rows.slots)} model indices in [0, {len(self.models)}), got {action.tolist()}")
        decided = rows.reveal_count > 0  # rows that reveal: every row of the event sampler, some of the reference's
        counts = self.step_counts(action, decided, rows.reveal_count)
        self.meter.record_decisions(float(self.depth_saving[action][decided].sum()), int(decided.sum()), self.device)
        recorded = torch.where(decided, action, -1)  # -1: the row revealed nothing at this step
        sent = self.to_device(torch.stack([action, recorded, self.sample_of[rows.slots]]))  # one copy for the three
        device_action, device_recorded, device_samples = sent.unbind()
        self.actions_out[rows.device_steps, device_samples] = device_recorded
        entropy = self.denoise(rows, device_action, counts)
        entropy = entropy.cpu() if ENTROPY in self.features else torch.full((len(rows.slots),), float("nan"), dtype=torch.float64)
        flops, all_heavy = self.note_forward(rows.slots, action, rows.reveal_count)
        slots = rows.slots
        self.last_action[slots] = torch.where(decided, action, self.last_action[slots])
        self.last_entropy[slots] = torch.where(decided, entropy, self.last_entropy[slots])
        self.previous_mask[slots] = torch.where(decided, state.mask_fraction, self.previous_mask[slots])
        self.masked[slots] -= rows.reveal_count
        self._decision = None
        self.after_step(rows)
        return StepOutput(rows.reveal_count, entropy, flops + probe_flops, all_heavy)

    def step_counts(self, action: torch.Tensor, decided: torch.Tensor, revealed: torch.Tensor) -> StepCounts:
        """Rows that reveal and positions they reveal, per model: the shapes of the step's forwards, from host
        values. An index outside the family, for any row, is a ValueError."""
        num_models = len(self.models)
        if action.numel() and (int(action.min()) < 0 or int(action.max()) >= num_models):
            raise ValueError(f"action must hold {len(action)} model indices in [0, {num_models}), got {action.tolist()}")
        rows = torch.bincount(action[decided], minlength=num_models)
        positions = torch.bincount(action, weights=revealed.double(), minlength=num_models)
        return StepCounts(rows.tolist(), [round(value) for value in positions.tolist()])

    def note_forward(self, slots: torch.Tensor, model: torch.Tensor | int, revealed: torch.Tensor, probe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the rows' forwards to their policy-visible costs (host), at the event-driven sampler's prices.

        Only rows that reveal pay: the trunk plus a projection per revealed position. The all-heavy
        figure grows with decisions only (a probe is extra work that all-heavy would not have done).
        Returns the (R,) FLOPs added and the all-heavy FLOPs added.
        """
        pays = revealed > 0
        flops = torch.where(pays, self.trunk_flops[model] + self.projection_flops[model] * revealed, 0.0)
        all_heavy = torch.zeros_like(flops) if probe else torch.where(pays, self.trunk_flops[0] + self.projection_flops[0] * revealed, 0.0)
        self.row_flops[slots] += flops
        self.row_all_heavy[slots] += all_heavy
        return flops, all_heavy

    def forward(self, model_index: int, slots: torch.Tensor, t: torch.Tensor, flat: torch.Tensor, probe: bool = False) -> torch.Tensor:
        """Logits of model ``model_index`` for ``slots`` at the positions ``flat`` (row * L + column, row-major), charged.

        ``slots``, ``t`` and ``flat`` are on the device. A ``probe`` forward is charged to the model but not to the
        all-heavy baseline: all-heavy would not have probed, so the probe's cost shows up as FLOPs not saved.
        """
        model = self.models[model_index]
        rows = max(1, len(slots) if self.device.type != "cpu" else CPU_FORWARD_TOKENS // self.spec.seq_len)
        with self.meter.timed(model_index, self.device):
            chunks = [
                model.hidden_states(self.tokens[slots[start : start + rows]], t[start : start + rows])
                for start in range(0, max(1, len(slots)), rows)  # a call with no rows still yields its empty states
            ]
            hidden = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            logits = model.project(hidden.flatten(0, 1)[flat])
        self.charge_forward(model_index, len(slots), len(flat), probe)
        return logits

    def charge_forward(self, model_index: int, rows: int, projected: int, probe: bool = False) -> None:
        """Charge a forward of ``model_index`` over ``rows`` rows projecting ``projected`` positions (a probe's to the
        model only, see ``forward``)."""
        self.meter.add_forward(model_index, rows, self.trunk[model_index] * rows + self.projection[model_index] * projected, self.device)
        if not probe:
            self.charge_baseline(rows, projected)

    def reuse_logits(self, logits: Mapping[int, torch.Tensor]) -> None:
        """Between ``begin_step`` and ``advance``: logits that members chosen at this step have already computed for
        their rows of it (at their revealing positions, row-major, from the same z_t), as path KL's evaluation does.
        ``advance`` draws from them instead of running those members again, and charges the forwards as if it had."""
        self._reused = dict(logits)

    def charge_baseline(self, rows: int, projected: int) -> None:
        """What model 0 would have executed for ``rows`` rows projecting ``projected`` positions in all."""
        self.meter.add_baseline(self.trunk[0] * rows + self.projection[0] * projected, self.device)

    def draw(self, logits: torch.Tensor, slots: torch.Tensor, steps: torch.Tensor, flat: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Sample tokens at the positions ``flat`` (row * L + column, as ``logits``) and write them, or only the
        ``keep`` ones of them (MDLM draws at every masked position and keeps the revealing ones); per-row mean
        entropy. Everything here is on the device."""
        rows, columns = flat // self.spec.seq_len, flat % self.spec.seq_len
        u = uniforms_at(self.row_seeds[slots][rows], steps[rows], columns, TOKEN)
        drawn, probs = sample_categorical(logits, u, self.spec.top_p)
        if keep is not None:
            rows, columns, drawn, probs = rows[keep], columns[keep], drawn[keep], probs[keep]
        self.tokens[slots[rows], columns] = drawn
        if ENTROPY not in self.features:
            return torch.full((len(slots),), float("nan"), dtype=torch.float64, device=self.device)
        return mean_entropy_per_row(probs, rows, len(slots))

    def probe_revealed(self, rows: StepRows) -> torch.Tensor:
        """``probe`` projecting only the revealing positions; keeps the logits for rows that stay on the probe model."""
        flat = torch.nonzero_static(rows.reveal.flatten(), size=int(rows.reveal_count.sum())).squeeze(1)
        logits = self.forward(self.probe_model, rows.device_slots, self.noise_level(rows.device_steps), flat, probe=True)
        owners = flat // self.spec.seq_len
        self._probe_logits, self._probe_rows = logits, owners
        return probe_statistics(torch.softmax(logits.double(), -1), owners, len(rows.slots))

    def denoise_revealed(self, rows: StepRows, action: torch.Tensor, counts: StepCounts) -> torch.Tensor:
        """``denoise`` with one forward per chosen model over its rows, projecting only the revealing positions.

        Every row reveals. The shapes come from ``counts``, so selecting rows and positions waits for nothing.
        """
        entropy = torch.full((len(rows.slots),), float("nan"), dtype=torch.float64, device=self.device)
        t, slots, steps = self.noise_level(rows.device_steps), rows.device_slots, rows.device_steps
        for model_index, (count, projected) in enumerate(zip(counts.rows, counts.positions)):
            if not count:
                continue
            chosen = action == model_index
            mine = torch.nonzero_static(chosen, size=count).squeeze(1)
            flat = torch.nonzero_static(rows.reveal[mine].flatten(), size=projected).squeeze(1)
            if PROBE_ENTROPY in self.features and model_index == self.probe_model:
                reused = torch.nonzero_static(chosen[self._probe_rows], size=projected).squeeze(1)
                logits = self._probe_logits[reused]  # the probe ran this model on these rows: reuse its logits
                self.charge_baseline(count, projected)
            elif model_index in self._reused:
                logits = self._reused[model_index]
                self.charge_forward(model_index, count, projected)
            else:
                logits = self.forward(model_index, slots[mine], t[mine], flat)
            entropy[mine] = self.draw(logits, slots[mine], steps[mine], flat)
        self._probe_logits = self._probe_rows = None
        self._reused = {}
        return entropy

    @abstractmethod
    def probe(self, rows: StepRows) -> torch.Tensor:
        """(R, 3) ``probe_statistics`` (device) of the probe model's prediction at the positions revealing now (NaN where none)."""

    @abstractmethod
    def denoise(self, rows: StepRows, action: torch.Tensor, counts: StepCounts) -> torch.Tensor:
        """Write the revealed tokens (``action`` on the device); returns (R,) mean entropy of the draws on the
        device (NaN where none or not wanted)."""

    def after_step(self, rows: StepRows) -> None:
        """Bookkeeping once a step's tokens are written (finishing rows, moving on)."""

    def output(self) -> SampleOutput:
        return SampleOutput(self.device_seeds, self.tokens_out, self.plan, self.actions_out)


class EventTrajectory(Trajectory):
    """adasched's sampler: every step moves each row to its own next reveal, one forward per chosen model.

    Each sample's reveal steps and how many positions reveal at each are read to the host once, when the
    sample is enqueued. From then on the host knows which rows finish when, what the policy sees and, from
    its actions, the shapes of every forward; costs are host numbers, and indices go to a GPU asynchronously.
    So the loop never waits for the device, unless the policy reads entropies from it.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.events_left: list[int] = []  # per slot: reveal steps still to come (0: empty)
        self.queue: list[int] = []  # samples not started yet
        self.events: list[tuple[list[int], list[int]]] = []  # per sample: its reveal steps and positions revealed at each
        self._busy: list[int] = []  # the slots holding a sample
        super().__init__(*args, **kwargs)
        self.events_left = [0] * self.spec.batch_size
        self.fill()

    def enqueue(self, seeds: torch.Tensor, prompts: torch.Tensor | None = None) -> None:
        first = self.num_samples
        super().enqueue(seeds, prompts)
        for row in self.plan[first:, self.prefix_len :].cpu():  # the one read of these samples' plans
            steps, counts = torch.unique(row[row < self.spec.last_step], return_counts=True)
            self.events.append((steps.tolist(), counts.tolist()))
        self.queue += list(range(first, self.num_samples))
        if self.events_left:
            self.fill()

    def fill(self) -> None:
        """Start queued samples in the empty slots (a sample with nothing to reveal before the stop is done at once)."""
        empty = [slot for slot, left in enumerate(self.events_left) if left == 0]
        slots, samples = [], []
        while empty and self.queue:
            sample = self.queue.pop(0)
            if not self.events[sample][0]:
                if self.prompts is not None:
                    self.tokens_out[sample, : self.prefix_len] = self.prompts[sample]
                continue
            slot = empty.pop(0)
            self.events_left[slot] = len(self.events[sample][0])
            slots.append(slot)
            samples.append(sample)
        if slots:
            self.load(torch.tensor(slots), torch.tensor(samples))
            self._busy = self.busy_slots
            self._device_busy = self.to_device(self._busy)

    @property
    def done(self) -> bool:
        return not any(self.events_left) and not self.queue

    @property
    def total_steps(self) -> int:
        """Rounds until the last sample finishes, from the event counts: slots refill in order as they free."""
        free_at = [0] * self.spec.batch_size
        for steps, _ in self.events:
            if steps:
                slot = min(range(len(free_at)), key=lambda s: (free_at[s], s))
                free_at[slot] += len(steps)
        return max(free_at)

    @property
    def busy_slots(self) -> list[int]:
        return [slot for slot, left in enumerate(self.events_left) if left]

    def next_event(self, slot: int) -> tuple[int, int]:
        """The slot's next reveal step and how many positions reveal at it."""
        steps, counts = self.events[int(self.sample_of[slot])]
        index = len(steps) - self.events_left[slot]
        return steps[index], counts[index]

    def next_rows(self) -> StepRows:
        steps, counts = zip(*(self.next_event(slot) for slot in self._busy))
        device_steps = self.to_device(list(steps))
        reveal = self.row_plan[self._device_busy] == device_steps[:, None]  # a position is masked until its step
        return StepRows(torch.tensor(self._busy), torch.tensor(steps), torch.tensor(counts), self._device_busy, device_steps, reveal)

    def probe(self, rows: StepRows) -> torch.Tensor:
        return self.probe_revealed(rows)

    def denoise(self, rows: StepRows, action: torch.Tensor, counts: StepCounts) -> torch.Tensor:
        return self.denoise_revealed(rows, action, counts)

    def after_step(self, rows: StepRows) -> None:
        finished = []
        for slot in self._busy:
            self.events_left[slot] -= 1
            if not self.events_left[slot]:
                finished.append(slot)
        if finished:
            self.unload(torch.tensor(finished))
            self._busy = self.busy_slots
            self._device_busy = self.to_device(self._busy)
            self.fill()


def run_policy(
    path: Trajectory, policy: Policy, on_step: Callable[[int], None] | None = None, on_start: Callable[[int], None] | None = None
) -> SampleOutput:
    """The sampling loop: the trajectory owns the math and the costs, the policy only decides.

    ``on_start`` hears how many steps the loop will take, ``on_step`` each one (a progress bar's calls).
    """
    policy.reset(path.spec.num_steps, len(path.models))
    if on_start is not None:
        on_start(path.total_steps)
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
    spec: SamplingSpec,
    meter: CostMeter,
    prompts: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    trajectory_type: type[Trajectory] = EventTrajectory,
) -> SampleOutput:
    """Generate one sequence per seed with ``policy`` choosing among ``models`` (0 = heavy).

    ``trajectory_type`` picks how the models run; ``adasched.sampling.reference`` passes MDLM's way.
    """
    path = trajectory_type(models, seeds, spec, meter, prompts, policy.features, policy.probe_model)
    return run_policy(path, policy, on_step, on_start)
