"""Gymnasium environments in which an agent picks the denoiser (heavy or light) of every sampling step.

The environments drive adasched's own sampler (``EventTrajectory``) one step at a time, so what an agent
learns is exactly what ``adasched.sampling.trajectory.sample`` will execute. A row is asked only at the
steps where it reveals positions (elsewhere no model runs and nothing changes), so an episode has at most
``seq_len`` decisions. The observation is ``adasched.sampling.features.router_features`` of the row's
``DenoiseState``, the same code the ``learned_router`` policy runs at sampling time.

The reward of a row's step is minus its path-KL increment (``adasched.analysis.path_kl``: the KL of the
chosen model's prediction from the heavy one's at the positions revealed, 0 for the heavy model) minus
``lambda`` times the step's executed FLOPs per full heavy forward: dense, exact, and summing over an
episode to minus the sample's path KL minus its priced compute. The budget is kept by that multiplier:
``lambda`` moves with the executed saving of every ``num_rows`` finished episodes, up while the saving is
below the target and down while above. At ``lambda = 0`` the cheapest policy is all-heavy (zero KL), whose
saving is below any budget, so ``lambda`` cannot settle there; it settles where the saving meets the target.
Where the path KL grows about linearly with the saving, one price makes a wide range of savings equally good
and the policy swings across it as lambda moves; ``budget_penalty`` (the augmented Lagrangian's quadratic
term) then ends each episode with ``-budget_penalty / 2 * (saving - budget)**2``, a penalty on both sides of
the target that makes the target itself the best of that range. It is charged at the end, not on the running
saving: PPO's advantages look only ~20 steps ahead, so a running penalty taught it flat schedules.
The evaluator's NLL of a finished sample can be added at the episode's end (``quality_weight``, off by default).

Path KL charges for being another network, not only a worse one. With a ``seed_baseline`` (a heavy from another
seed: the ``excess`` objective) the quality term of a step is instead minus the chosen model's increment less the
seed baseline's at the same positions (its floor), so the agent is no longer taught to avoid steps where any
other good network departs from the heavy. The episodes' reported path KL stays the raw one.
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
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from adasched.analysis.evaluation import sample_nll
from adasched.analysis.path_kl import step_kl
from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.features import feature_space, router_features
from adasched.sampling.policy import ENTROPY, check_budget
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import EventTrajectory

SEED_RANGE = (2_000_000, 2**31 - 1)  # training samples: disjoint from run's (0, ...) and calibration's (1_000_000, ...) seeds
Scorer = Callable[[torch.Tensor], torch.Tensor]  # generated tokens (B, L) -> (B,) float64 mean NLL per token


@dataclass
class LagrangeMultiplier:
    """The price of a heavy forward's FLOPs: a PI controller on the budget's error ``target - saving``, never below 0
    (the "PID Lagrangian" of Stooke et al. 2020, without the derivative term).

    The integral term is projected dual ascent whose k-th step is ``lr / k**decay``. The saving it follows is
    measured on a few noisy episodes, so a constant step (``decay = 0``) leaves lambda wandering as a random walk
    around its target; a decaying one (``0.5 < decay <= 1``, the Robbins-Monro condition) lets it settle while it
    can still travel any distance. The policy follows the price with a lag (PPO needs many rollouts to move), so
    an integral alone overshoots and swings; the proportional term ``kp * error`` answers the error at once and
    damps the swing.
    """

    value: float  # the price in force: integral + kp * the last error
    lr: float
    target: float
    decay: float = 0.0
    kp: float = 0.0
    updates: int = 0  # steps taken so far, kept in checkpoints so a resumed run continues the decay
    integral: float | None = None  # the integral term; starts at ``value``

    def __post_init__(self) -> None:
        if self.integral is None:
            self.integral = self.value

    def update(self, saving: float) -> float:
        self.updates += 1
        error = self.target - saving
        self.integral = max(0.0, self.integral + self.lr / self.updates**self.decay * error)
        self.value = max(0.0, self.integral + self.kp * error)
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
    spec: SamplingSpec  # its batch_size is ignored: the environment's number of rows is the batch
    budget: float
    multiplier: LagrangeMultiplier
    score: Scorer | None = None  # the evaluator's NLL of finished samples; needed when quality_weight > 0
    quality_weight: float = 0.0  # terminal reward -quality_weight * NLL (nats/token)
    budget_penalty: float = 0.0  # terminal reward -budget_penalty / 2 * (the row's saving - budget)**2, in nats
    seed_baseline: MDLMDenoiser | None = None  # the excess objective's floor (never a choice); None: the raw path KL


class RowBatch:
    """``num_rows`` rows of one ``EventTrajectory``, each an episode of its own; the engine behind both environments.

    A row whose sample finishes starts a new one (a fresh seed from ``rng``) in the same step, so every
    call decides for all rows and the models always run on the whole batch.
    """

    def __init__(self, config: EpisodeConfig, num_rows: int, rng: np.random.Generator) -> None:
        check_budget(config.budget)
        if config.quality_weight and config.score is None:
            raise ConfigError(f"env.quality_weight={config.quality_weight} needs an evaluator to score samples")
        self.config, self.num_rows, self.rng = config, num_rows, rng
        self.spec = SamplingSpec(config.spec.num_steps, config.spec.seq_len, num_rows, config.spec.top_p)
        self.heavy_full = float(config.models[0].flops_per_forward(self.spec.seq_len, self.spec.seq_len))
        self.finished: list[dict[str, float]] = []  # summaries of the episodes since lambda last moved

    @property
    def num_models(self) -> int:
        return len(self.config.models)

    def new_seeds(self, count: int) -> torch.Tensor:
        return torch.as_tensor(self.rng.integers(*SEED_RANGE, size=count), dtype=torch.int64)

    def start(self) -> np.ndarray:
        """Begin an episode in every row; returns the first decision's observations."""
        meter = CostMeter([str(m) for m in range(self.num_models)], [m.config.n_blocks for m in self.config.models])
        self.path = EventTrajectory(self.config.models, self.new_seeds(self.num_rows), self.spec, meter, features=frozenset({ENTROPY}))
        self.episode_kl = torch.zeros(self.num_rows, dtype=torch.float64)
        return self._observe()

    def _observe(self) -> np.ndarray:
        self.state = self.path.begin_step()
        self.observation = router_features(self.state, self.num_models).numpy()
        return self.observation

    def step(self, action: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, float]]]:
        """Apply one decision per row; returns observations, (B,) rewards, which rows ended, and their summaries."""
        path, config = self.path, self.config
        ending = [slot for slot in range(self.num_rows) if path.events_left[slot] == 1]
        samples = path.sample_of[ending].tolist()
        totals = (path.row_flops[ending], path.row_all_heavy[ending])
        if ending:
            path.enqueue(self.new_seeds(len(ending)))  # starts in the ending rows' slots as they free
        with torch.inference_mode():
            tokens, reveal = path.open_step()
            measured = step_kl(config.models, tokens, self.state.t, reveal, action.to(tokens.device), self.spec.top_p, config.seed_baseline)
            kl = measured.kl.cpu()
            loss = kl if measured.floor is None else kl - measured.floor.cpu()
            output = path.advance(action)
            self.episode_kl += kl
            rewards = -loss - config.multiplier.value * output.flops.cpu() / self.heavy_full
            infos: list[dict[str, float]] = [{} for _ in range(self.num_rows)]
            if ending:
                nll = config.score(path.tokens_out[samples, path.prefix_len :]).cpu() if config.score is not None else None
                executed = (totals[0] + output.flops[ending]).cpu()
                all_heavy = (totals[1] + output.all_heavy_flops[ending]).cpu()
                for i, slot in enumerate(ending):
                    saved = 1.0 - float(executed[i] / all_heavy[i])
                    rewards[slot] -= config.budget_penalty / 2 * (saved - config.budget) ** 2
                    summary = {
                        "saved_executed": saved, "path_kl": float(self.episode_kl[slot]),
                        "executed_flops": float(executed[i]), "all_heavy_flops": float(all_heavy[i]), "lambda": config.multiplier.value,
                    }
                    if nll is not None:
                        summary["nll"] = float(nll[i])
                        rewards[slot] -= config.quality_weight * nll[i]
                    infos[slot] = {"terminal_observation": self.observation[slot], **summary}
                    self.finished.append(summary)
                    self.episode_kl[slot] = 0.0
                self._update_multiplier()
            observation = self._observe()
        dones = np.zeros(self.num_rows, dtype=bool)
        dones[ending] = True
        return observation, rewards.numpy(), dones, infos

    def _update_multiplier(self) -> None:
        """Move lambda once ``num_rows`` episodes have finished, with their pooled executed saving."""
        if len(self.finished) < self.num_rows:
            return
        executed = sum(episode["executed_flops"] for episode in self.finished)
        all_heavy = sum(episode["all_heavy_flops"] for episode in self.finished)
        saving = 1.0 - executed / all_heavy
        self.config.multiplier.update(saving)
        self.finished = []


class ModelScheduleEnv(gymnasium.Env):
    """Schedule the denoisers of one sample (a batch of one row) over a whole sampling trajectory.

    ## Action Space
    ``Discrete(n_models)``: the family member that denoises the current step (0 = the heavy reference).

    ## Observation Space
    ``Box(float32)`` with the columns of ``adasched.sampling.features.feature_names``: t, mask fraction, the
    fraction revealed at the row's previous forward, log(1 + positions revealing now), FLOPs saved so far vs
    all-heavy, the previous forward's mean predictive entropy and whether there was one, and the one-hot
    model of the previous forward.

    ## Rewards
    Each step earns ``-KL - lambda * executed FLOPs / FLOPs of a full heavy forward``, where KL is the step's
    path-KL increment (0 for the heavy model), less the seed baseline's at the same positions where the config
    has one (the excess objective). With ``quality_weight > 0`` the last step also earns
    ``-quality_weight * NLL`` of the finished sample under the scorer (the autoregressive evaluator).
    ``lambda`` is a Lagrange multiplier updated from the executed saving of finished episodes.

    ## Starting State
    All generated positions masked at t = 1, with a sample seed drawn from ``self.np_random`` (in
    ``SEED_RANGE``, disjoint from evaluation seeds); the first observation is the first step revealing any.

    ## Episode End
    The episode terminates after the row's last reveal (every position revealed); it is never truncated.
    Only steps where the row reveals are decisions, so it lasts at most ``seq_len`` of them.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EpisodeConfig) -> None:
        self.rows = RowBatch(config, 1, np.random.default_rng())
        self.action_space = spaces.Discrete(self.rows.num_models)
        self.observation_space = feature_space(self.rows.num_models)
        self.last_summary: dict[str, float] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.rows.rng = self.np_random
        observation = self.rows.start()
        return observation[0], {"sample_seed": int(self.rows.path.seeds[-1])}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        observation, rewards, dones, infos = self.rows.step(torch.tensor([int(action)], dtype=torch.int64))
        done = bool(dones[0])
        if done:
            self.last_summary = {key: value for key, value in infos[0].items() if key != "terminal_observation"}
            observation = infos[0]["terminal_observation"][None]
        return observation[0], float(rewards[0]), done, False, self.last_summary if done else {}


class ModelScheduleVecEnv(VecEnv):
    """``ModelScheduleEnv`` for ``num_envs`` rows of one batched trajectory, so the models run batched.

    Rows finish at their own times: a finished row's ``done`` is True, its ``info`` holds its
    ``terminal_observation`` and the episode summary, and it has already started a new sample (SB3's
    auto-reset). ``lambda`` is updated once ``num_envs`` episodes have finished.
    """

    render_mode = None

    def __init__(self, config: EpisodeConfig, num_envs: int, seed: int = 0) -> None:
        self.rows = RowBatch(config, num_envs, np.random.default_rng(seed))
        super().__init__(num_envs, feature_space(self.rows.num_models), spaces.Discrete(self.rows.num_models))
        self.actions = np.zeros(num_envs, dtype=np.int64)

    def reset(self) -> VecEnvObs:
        if self._seeds[0] is not None:
            self.rows.rng = np.random.default_rng(self._seeds[0])
        self._reset_seeds()
        self._reset_options()
        return self.rows.start()

    def step_async(self, actions: np.ndarray) -> None:
        self.actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        observation, rewards, dones, infos = self.rows.step(torch.from_numpy(self.actions))
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
