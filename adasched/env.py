"""Gymnasium environments in which an agent picks the denoiser (heavy or light) of every sampling step.

The environments drive adasched's own sampler (``FastTrajectory``) one step at a time, so what an agent
learns is exactly what ``adasched.sampling.sample`` will execute. Steps at which no row reveals a position
run no model and change nothing; they are stepped through without asking the agent, so an episode has one
decision per step at which some row reveals (at most ``seq_len`` per row).

The observation is built by ``policies.learned.RouterFeatures`` from the ``DenoiseState`` alone, the same
code the ``learned_router`` policy runs at sampling time. The budget is kept by a Lagrangian multiplier (no hard
guard): the FLOPs saved earn ``lambda`` per full heavy forward, and ``lambda`` moves between episodes with
the measured executed saving, up while the saving is below the target and down (to 0) while above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from adasched.costs import CostMeter
from adasched.evaluation import sample_nll
from adasched.models.dit import MDLMDenoiser
from adasched.sampling import FastTrajectory
from policies.base import ENTROPY, check_budget
from policies.learned import RouterFeatures

SEED_RANGE = (2_000_000, 2**31 - 1)  # training samples: disjoint from run's (0, ...) and calibration's (1_000_000, ...) seeds
Scorer = Callable[[torch.Tensor], torch.Tensor]  # generated tokens (B, L) -> (B,) float64 mean NLL per token


def observation_space(num_models: int) -> spaces.Box:
    """Bounds of the ``policies.learned.feature_names`` columns; counts and entropies are unbounded above."""
    low = np.array([0, 0, 0, 0, -np.inf, 0, *[0] * num_models, 0], dtype=np.float32)
    high = np.array([1, 1, 1, np.inf, 1, 1, *[1] * num_models, np.inf], dtype=np.float32)
    return spaces.Box(low, high, dtype=np.float32)


@dataclass
class LagrangeMultiplier:
    """The price of a heavy forward's FLOPs: rises while the saving is below ``target``, never below 0."""

    value: float
    lr: float
    target: float

    def update(self, saving: float) -> float:
        self.value = max(0.0, self.value + self.lr * (self.target - saving))
        return self.value


def evaluator_scorer(evaluator: Any, evaluator_tokenizer: Any, tokenizer: Any, batch_size: int, device: torch.device | str) -> Scorer:
    """Per-row mean NLL of the decoded samples under the autoregressive evaluator (the quality term).

    A sample that decodes to no text (only special tokens) scores as a uniform guess over the evaluator's
    vocabulary instead of stopping training.
    """

    def score(tokens: torch.Tensor) -> torch.Tensor:
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in tokens.tolist()]
        nll = torch.full((len(texts),), math.log(len(evaluator_tokenizer)), dtype=torch.float64)
        kept = [i for i, text in enumerate(texts) if text.strip()]
        if kept:
            nll[kept] = sample_nll([texts[i] for i in kept], evaluator, evaluator_tokenizer, batch_size, None, device).nll
        return nll

    return score


@dataclass
class EpisodeConfig:
    """What every episode shares: the family, the sampler's settings, the quality scorer and the budget."""

    models: Sequence[MDLMDenoiser]
    score: Scorer
    num_steps: int
    seq_len: int
    budget: float
    multiplier: LagrangeMultiplier
    quality_weight: float = 1.0


class RowBatch:
    """B rows of one ``FastTrajectory`` stepped in lockstep; the engine behind both environments."""

    def __init__(self, config: EpisodeConfig) -> None:
        check_budget(config.budget)
        self.config = config
        heavy, seq_len = config.models[0], config.seq_len
        self.heavy_trunk = float(heavy.flops_per_forward(seq_len, 0))
        self.heavy_projection = float(heavy.flops_per_forward(seq_len, 1)) - self.heavy_trunk
        self.heavy_full = float(heavy.flops_per_forward(seq_len, seq_len))

    @property
    def num_models(self) -> int:
        return len(self.config.models)

    def start(self, seeds: torch.Tensor) -> np.ndarray:
        """Begin an episode for ``seeds`` (one row each); returns the first decision's observations."""
        config = self.config
        meter = CostMeter([str(m) for m in range(self.num_models)], [m.config.n_blocks for m in config.models])
        self.path = FastTrajectory(config.models, seeds, config.num_steps, config.seq_len, meter, budget=config.budget, features=frozenset({ENTROPY}))
        self.features = RouterFeatures(len(seeds), self.num_models, config.budget)
        self.executed = torch.zeros(len(seeds), dtype=torch.float64)
        self.all_heavy = torch.zeros(len(seeds), dtype=torch.float64)
        return self._next_decision()

    def _next_decision(self) -> np.ndarray:
        """Observe steps until one where some row reveals (steps where none does run no model)."""
        while True:
            self.state = self.path.begin_step()
            self.observation = self.features.observe(self.state)
            if self.state.reveal_count.any():
                return self.observation
            self._advance(torch.zeros(self.path.batch_size, dtype=torch.int64))
            if self.path.done:
                return self.observation

    def _advance(self, action: torch.Tensor) -> torch.Tensor:
        """Run the step with ``action``; returns (B,) FLOPs saved against all-heavy, per full heavy forward."""
        reveal = self.state.reveal_count.cpu().double()
        heavy = torch.where(reveal > 0, self.heavy_trunk + self.heavy_projection * reveal, 0.0)
        before = self.path.row_flops.cpu().clone()
        self.features.record(self.state, action)
        self.path.advance(action)
        executed = self.path.row_flops.cpu() - before
        self.executed += executed
        self.all_heavy += heavy
        return (heavy - executed) / self.heavy_full

    def step(self, action: torch.Tensor) -> tuple[np.ndarray, np.ndarray, bool, dict[str, float]]:
        """Apply one decision; returns observations, (B,) rewards, whether the episode ended, and its summary."""
        with torch.inference_mode():
            rewards = self.config.multiplier.value * self._advance(action)
            observation = self.observation if self.path.done else self._next_decision()  # terminal: the last one seen
            if not self.path.done:
                return observation, rewards.numpy(), False, {}
            nll = self.config.score(self.path.tokens[:, self.path.prefix_len :]).cpu()
        rewards = rewards - self.config.quality_weight * nll
        saving = 1.0 - float(self.executed.sum() / self.all_heavy.sum()) if self.all_heavy.sum() > 0 else 0.0
        summary = {"saved_executed": saving, "nll": float(nll.mean()), "lambda": self.config.multiplier.value}
        self.config.multiplier.update(saving)
        return observation, rewards.numpy(), True, summary


class ModelScheduleEnv(gymnasium.Env):
    """Schedule the denoisers of one sample (a batch of one row) over a whole sampling trajectory.

    ## Action Space
    ``Discrete(n_models)``: the family member that denoises the current step (0 = the heavy reference).

    ## Observation Space
    ``Box(float32)`` with the columns of ``policies.learned.feature_names``: t, mask fraction, its change since the previous
    step, log(1 + positions revealing now), FLOPs saved so far vs all-heavy, the target budget, the one-hot
    model of the row's last forward, and that forward's mean predictive entropy (0 before the first).

    ## Rewards
    Each step earns ``lambda * (all-heavy FLOPs - executed FLOPs) / FLOPs of a full heavy forward``: 0 for
    the heavy model, positive for a lighter one. The last step also earns
    ``-quality_weight * NLL`` of the finished sample under the scorer (the autoregressive evaluator).
    ``lambda`` is a Lagrange multiplier updated after every episode from the episode's executed saving.

    ## Starting State
    All generated positions masked at t = 1, with a sample seed drawn from ``self.np_random`` (in
    ``SEED_RANGE``, disjoint from evaluation seeds); the first observation is the first step revealing any.

    ## Episode End
    The episode terminates when all ``num_steps`` sampling steps are done (every position revealed); it is
    never truncated. Steps revealing nothing are skipped, so it lasts at most ``seq_len`` decisions.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EpisodeConfig) -> None:
        self.rows = RowBatch(config)
        self.action_space = spaces.Discrete(self.rows.num_models)
        self.observation_space = observation_space(self.rows.num_models)
        self.last_summary: dict[str, float] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        sample_seed = int(self.np_random.integers(*SEED_RANGE))
        observation = self.rows.start(torch.tensor([sample_seed]))
        return observation[0], {"sample_seed": sample_seed}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        observation, rewards, done, summary = self.rows.step(torch.tensor([int(action)], dtype=torch.int64))
        if done:
            self.last_summary = summary
        return observation[0], float(rewards[0]), done, False, summary


class ModelScheduleVecEnv(VecEnv):
    """``ModelScheduleEnv`` for ``num_envs`` rows of one batched trajectory, so the models run batched.

    All rows share the sampling steps, so they finish together: on the last step every ``done`` is True,
    each ``info`` holds its row's ``terminal_observation`` and the episode summary, and the batch restarts
    with fresh sample seeds (SB3's auto-reset). ``lambda`` is updated once per batch episode.
    """

    render_mode = None

    def __init__(self, config: EpisodeConfig, num_envs: int, seed: int = 0) -> None:
        self.rows = RowBatch(config)
        super().__init__(num_envs, observation_space(self.rows.num_models), spaces.Discrete(self.rows.num_models))
        self.rng = np.random.default_rng(seed)
        self.actions = np.zeros(num_envs, dtype=np.int64)
        self.last_summary: dict[str, float] = {}

    def reset(self) -> VecEnvObs:
        if self._seeds[0] is not None:
            self.rng = np.random.default_rng(self._seeds[0])
        self._reset_seeds()
        self._reset_options()
        seeds = torch.as_tensor(self.rng.integers(*SEED_RANGE, size=self.num_envs))
        return self.rows.start(seeds)

    def step_async(self, actions: np.ndarray) -> None:
        self.actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        observation, rewards, done, summary = self.rows.step(torch.from_numpy(self.actions))
        dones = np.full(self.num_envs, done)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if done:
            self.last_summary = summary
            infos = [{"terminal_observation": observation[i], **summary} for i in range(self.num_envs)]
            observation = self.reset()
        return observation, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        """Nothing to release: the models belong to the caller."""

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any) -> list[Any]:
        return [getattr(self, method_name)(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gymnasium.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]
