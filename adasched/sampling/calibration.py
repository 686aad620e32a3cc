"""Fit a policy's one knob to a FLOPs budget on calibration seeds, kept apart from the evaluation seeds.

Policies are compared at equal *executed* FLOPs, so a budget means "save this fraction of the FLOPs that
all-heavy would have executed on the same forwards" (``CostMeter.saved_executed``). A policy opts in by
exposing a knob whose value moves that saving up monotonically; ``calibrate`` searches it by sampling with
the real models, because for a dynamic policy the saving depends on what the models predict.

Every try samples all calibration seeds, so the search spends as few tries as it can, and each as cheaply:

* the first try is at the policy's own guess (``KnobGuess``), not at the ends of the knob's range;
* a try keeps the states its policy decided on. A policy is a pure function of each row's state, so
  replaying those states at another knob gives the saving that knob would have had on the same
  trajectories without running a model (``Replay``): exactly for policies whose states do not depend on
  earlier choices (the static and the mask-fraction sandwich), closely for those whose states feed back
  (entropies, FLOPs so far). The next try goes where the replay of the try closest to the target meets it,
  the move rescaled by what the tries so far show of the feedback (``replay_step``);
* once tries bracket the target, a replayed knob outside the bracket gives way to regula falsi (Illinois);
* a range end is sampled only where the replay puts the target at or beyond it: to bracket the target or
  to show it out of reach;
* a policy that reads no model output is tried without running the models (``CostsOnly``): its decisions,
  and so its saving, do not depend on what they predict.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, runtime_checkable

import torch

from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.generation import generate
from adasched.sampling.policy import PROBE_ENTROPY, DenoiseState, Policy, StepOutput, check_budget
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import EventTrajectory, StepCounts, StepRows, sample

REPLAY_BISECTIONS = 40  # halvings of the bracket when solving a replay: to ~1e-12 of it
KNOB_RESOLUTION = 1e-9  # knobs closer than this fraction of the range are the same try


@runtime_checkable
class Calibratable(Protocol):
    """A policy with a scalar knob; raising it within ``knob_range`` never lowers the FLOPs saved.

    It may also guess where its knob meets a budget (``KnobGuess``); the search starts there.
    """

    budget: float | None
    knob_range: tuple[float, float]

    def set_knob(self, value: float) -> None: ...


@runtime_checkable
class KnobGuess(Protocol):
    """A calibratable policy's guess of the knob that saves ``budget``: the first try, so a good guess saves tries."""

    def initial_knob(self, budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> float: ...


@runtime_checkable
class KnobNames(Protocol):
    """A calibratable policy that says in its own units where an end of its knob's range lies (e.g. a router's
    price, whose knob is on another scale): what an out-of-reach budget's error names."""

    def describe_knob_end(self, knob: float) -> str: ...


@dataclass(frozen=True)
class Try:
    """One try: the knob, the executed saving it gave on the calibration seeds, and its sampling's wall clock."""

    knob: float
    saved: float
    seconds: float


@dataclass
class Calibration:
    """What calibration found: the knob, the saving it gave on the calibration seeds, and every try."""

    knob: float
    saved_executed: float
    target: float
    history: list[Try] = field(default_factory=list)


def expected_saving(models: Sequence[MDLMDenoiser], spec: SamplingSpec, model: int) -> float:
    """The executed saving of running ``model`` at every decision, in expectation over the reveal plan.

    Each position reveals at a uniformly distributed step, so a sample has T (1 - (1 - 1/T)^L) reveal steps in
    expectation and reveals L positions; a forward costs its trunk plus one projection per revealed position.
    A schedule that runs ``model`` on a fraction f of the steps (or of the progress) saves f times this.
    """
    steps, length = spec.num_steps, spec.seq_len
    events = steps * (1 - (1 - 1 / steps) ** length)

    def cost(member: MDLMDenoiser) -> float:
        trunk = member.flops_per_forward(length, 0)
        return events * trunk + length * (member.flops_per_forward(length, 1) - trunk)

    return 1 - cost(models[model]) / cost(models[0])


class Recording(Policy):
    """``policy`` deciding as usual while keeping every state it decides on: the material of a ``Replay``."""

    name = "calibration"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.states: list[DenoiseState] = []
        self.features, self.probe_model = policy.features, policy.probe_model  # what the sampler must compute

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(num_steps, num_models)
        self.policy.reset(num_steps, num_models)

    def act(self, state: DenoiseState) -> torch.Tensor:
        self.states.append(state)
        return self.policy.act(state)

    def observe(self, state: DenoiseState, action: torch.Tensor, output: StepOutput) -> None:
        self.policy.observe(state, action, output)


def concatenated(states: Sequence[DenoiseState]) -> DenoiseState:
    """One state holding the rows of all ``states``: a policy decides each row alone, so it decides them the same."""
    first = states[0]
    per_row = {name: torch.cat([vars(state)[name] for state in states]) for name, value in vars(first).items() if isinstance(value, torch.Tensor)}
    extras = {key: torch.cat([state.extras[key] for state in states]) for key in first.extras}
    return DenoiseState(num_steps=first.num_steps, model_flops=first.model_flops, extras=extras, **per_row)


class Replay:
    """The executed saving a policy would have had at another knob on the states one try decided on.

    Decisions are replayed row by row and priced as the event-driven sampler prices them: a row that reveals
    pays its model's trunk plus a projection per revealed position, a probe (charged to every such row)
    stands in for its model, and all-heavy pays model 0 for the same rows.
    """

    def __init__(self, policy: Policy, states: Sequence[DenoiseState], models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> None:
        self.policy, self.num_steps, self.num_models = policy, spec.num_steps, len(models)
        self.state = concatenated(states)
        revealed = self.state.reveal_count.double()
        pays = revealed > 0
        trunk = [float(m.flops_per_forward(spec.seq_len, 0)) for m in models]
        projection = [float(m.flops_per_forward(spec.seq_len, 1)) - t for m, t in zip(models, trunk)]
        self.prices = torch.stack([torch.where(pays, t + p * revealed, 0.0) for t, p in zip(trunk, projection)])  # (models, rows)
        self.baseline = float(self.prices[0].sum())
        self.probe = policy.probe_model if PROBE_ENTROPY in policy.features else None

    def saving(self, knob: float) -> float:
        """Sets ``knob`` on the policy (the search sets the one it tries next anyway)."""
        self.policy.set_knob(knob)
        self.policy.reset(self.num_steps, self.num_models)  # a static plan follows its knob at reset
        action = self.policy.act(self.state).cpu()
        executed = self.prices.gather(0, action[None]).squeeze(0)
        if self.probe is not None:  # the probe ran for every row; rows that kept its prediction paid nothing more
            executed = torch.where(action == self.probe, 0.0, executed) + self.prices[self.probe]
        return 1.0 - float(executed.sum()) / self.baseline if self.baseline else 0.0


class CostsOnly(EventTrajectory):
    """The event-driven sampler's loop, decisions and costs without its forwards.

    A policy that reads no model output (no ``features``) sees states made of the reveal plan and its own
    choices only, the same whatever the models predict; so it decides, and saves, exactly as with them.
    """

    def denoise(self, rows: StepRows, action: torch.Tensor, counts: StepCounts) -> torch.Tensor:
        for model, (count, projected) in enumerate(zip(counts.rows, counts.positions)):
            if count:  # what ``forward`` charges for the same rows and positions
                self.meter.add_forward(model, count, self.trunk[model] * count + self.projection[model] * projected, self.device)
                self.charge_baseline(count, projected)
        return torch.full((len(rows.slots),), float("nan"), dtype=torch.float64, device=self.device)


def executed_saving(
    policy: Policy, models: Sequence[MDLMDenoiser], seeds: torch.Tensor, spec: SamplingSpec, prompts: torch.Tensor | None = None
) -> float:
    """The executed FLOPs saving of ``policy`` on one sample per seed (each continuing its prompt, if given);
    without forwards where the policy reads no model output."""
    meter = CostMeter([str(i) for i in range(len(models))], [m.config.n_blocks for m in models])
    sampler = sample if policy.features else partial(sample, trajectory_type=CostsOnly)
    generate(models, policy, seeds, spec, meter, prompts=prompts, sampler=sampler, progress=False)
    return meter.saved_executed()


def run_try(
    policy: Policy, models: Sequence[MDLMDenoiser], seeds: torch.Tensor, spec: SamplingSpec, prompts: torch.Tensor | None = None
) -> tuple[float, Replay | None]:
    """The executed saving of ``policy`` at its current knob on the calibration seeds, and the replay of its states."""
    recording = Recording(policy)
    saved = executed_saving(recording, models, seeds, spec, prompts)
    return saved, Replay(policy, recording.states, models, spec) if recording.states else None


def replayed_knob(replay: Callable[[float], float], goal: float, low: float, high: float) -> float:
    """The knob in [low, high] whose replayed saving lies nearest ``goal`` (a replay never drops as the knob rises)."""
    below, above = replay(low), replay(high)
    if below >= goal:
        return low
    if above <= goal:
        return high
    for _ in range(REPLAY_BISECTIONS):
        middle = (low + high) / 2
        saved = replay(middle)
        if saved < goal:
            low, below = middle, saved
        else:
            high, above = middle, saved
    return low if goal - below < above - goal else high


def replay_step(replay: Callable[[float], float], closest: Try, other: Try | None, target: float, low: float, high: float) -> tuple[float, float]:
    """The next knob in [low, high] from the replay of the ``closest`` try's states, and the saving expected there.

    Feedback makes a real saving move more or less than a replay of fixed states says. Where another try
    is known, the secant through the two in the replay's terms (the replayed saving at each knob against the
    measured one) rescales the move: exact replays keep the scale 1, feedback changes it.
    """
    scale = 1.0
    if other is not None:
        replayed_move, measured_move = replay(other.knob) - closest.saved, other.saved - closest.saved
        if replayed_move * measured_move > 0:
            scale = measured_move / replayed_move
    knob = replayed_knob(replay, closest.saved + (target - closest.saved) / scale, low, high)
    return knob, closest.saved + scale * (replay(knob) - closest.saved)


def calibrate(
    policy: Calibratable,
    models: Sequence[MDLMDenoiser],
    seeds: torch.Tensor,
    spec: SamplingSpec,
    tolerance: float = 0.005,
    max_tries: int = 12,
    prompts: torch.Tensor | None = None,
) -> Calibration:
    """Search ``policy``'s knob until its executed saving is within ``tolerance`` of ``policy.budget``.

    ``prompts`` (one per seed) make the tries continue them, as evaluation does in prefix mode: a prompt's
    positions are revealed from the start, so fewer steps decide and the same knob saves a different share.
    Leaves the policy set to the best knob found; refuses a budget outside what the knob's range can reach.
    """
    if policy.budget is None:
        raise ConfigError(f"policy {getattr(policy, 'name', policy)!r} has no budget to calibrate to")
    target = policy.budget
    check_budget(target)
    if not tolerance > 0:
        raise ConfigError(f"calibration.tolerance={tolerance} is invalid; it must be positive (a fraction of FLOPs)")
    low_end, high_end = policy.knob_range
    resolution = KNOB_RESOLUTION * (high_end - low_end)
    history: list[Try] = []
    replays: list[Replay | None] = []
    scale = {-1: 1.0, 1: 1.0}  # Illinois: a bracket end kept while the other end moved twice counts half
    last_side = 0  # the side of the target (-1 under, +1 over) the last try landed on

    def attempt(knob: float) -> None:
        nonlocal last_side
        policy.set_knob(knob)
        clock = time.perf_counter()
        saved, replay = run_try(policy, models, seeds, spec, prompts)
        history.append(Try(knob, saved, time.perf_counter() - clock))
        replays.append(replay)
        print(f"  calibration try {len(history)}: knob {knob:.4g} saves {saved:.2%} (target {target:.2%})", flush=True)
        side = 1 if saved > target else -1
        scale[side] = 1.0
        if side == last_side:
            scale[-side] /= 2
        last_side = side

    def untried(knob: float) -> bool:
        return all(abs(knob - t.knob) > resolution for t in history)

    guess = policy.initial_knob(target, models, spec) if isinstance(policy, KnobGuess) else (low_end + high_end) / 2
    attempt(min(max(guess, low_end), high_end))
    while len(history) < max_tries:
        ranked = sorted(range(len(history)), key=lambda i: abs(history[i].saved - target))
        closest = history[ranked[0]]
        if abs(closest.saved - target) <= tolerance:
            break
        under = max((t for t in history if t.saved < target), key=lambda t: t.knob, default=None)
        over = min((t for t in history if t.saved > target), key=lambda t: t.knob, default=None)
        if over is None and under is not None and under.knob == high_end or under is None and over is not None and over.knob == low_end:
            end = under or over
            where = policy.describe_knob_end(end.knob) if isinstance(policy, KnobNames) else f"at {end.knob:g}, an end of [{low_end:g}, {high_end:g}]"
            raise ConfigError(
                f"budget={target} is out of reach for policy {getattr(policy, 'name', '?')}: its knob saves at "
                f"{'most' if over is None else 'least'} {end.saved:.3f} of the executed FLOPs ({where})"
            )
        low = under.knob if under is not None else low_end
        high = over.knob if over is not None else high_end
        if high - low <= resolution:  # a jump in the saving that no knob splits (or savings not monotone in the knob)
            break
        knob: float | None = None
        replay = replays[ranked[0]]
        if replay is not None:
            knob, expected = replay_step(replay.saving, closest, history[ranked[1]] if len(ranked) > 1 else None, target, low, high)
            if abs(expected - target) >= abs(closest.saved - target):  # the replay sees no knob nearer the target
                if under is not None and over is not None:
                    break  # the target lies in a jump of the saving
                knob = None
        if knob is None or not untried(knob):
            if under is None or over is None:
                knob = high if over is None else low  # a range end: to bracket the target or show it out of reach
            else:
                miss_under, miss_over = (under.saved - target) * scale[-1], (over.saved - target) * scale[1]
                knob = low - miss_under * (high - low) / (miss_over - miss_under)
        if not untried(knob):
            break
        attempt(knob)
    best = min(history, key=lambda t: abs(t.saved - target))
    policy.set_knob(best.knob)
    return Calibration(knob=best.knob, saved_executed=best.saved, target=target, history=history)


def check_disjoint_seeds(evaluation_seed: int, evaluation_samples: int, calibration_seed: int, calibration_samples: int) -> None:
    """Refuse calibration seeds that overlap the evaluation seeds: a budget met on them would be fitted, not held."""
    evaluation = range(evaluation_seed, evaluation_seed + evaluation_samples)
    calibration = range(calibration_seed, calibration_seed + calibration_samples)
    if evaluation.start < calibration.stop and calibration.start < evaluation.stop:
        raise ConfigError(
            f"calibration.seed={calibration_seed} (x{calibration_samples}) overlaps the evaluation seeds "
            f"{evaluation.start}..{evaluation.stop - 1}; pick seeds outside them"
        )
