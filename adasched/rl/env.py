"""Gymnasium environments in which an agent picks the denoiser (any family member) of every sampling step.

The environments drive adasched's own sampler (``EventTrajectory``) one step at a time, so what an agent
learns is exactly what ``adasched.sampling.trajectory.sample`` will execute. A row is asked only at the
steps where it reveals positions (elsewhere no model runs and nothing changes), so an episode has at most
``seq_len`` decisions. The observation is ``adasched.sampling.features.router_inputs`` of the row's
``DenoiseState`` and price, the same code the ``learned_router`` policy runs at sampling time.

Every episode (row) draws its own price of compute from ``prices`` (``adasched.sampling.prices``: nats per full
heavy forward's FLOPs, uniform on an asinh scale) and sees it as its last input, so one PPO run learns a policy
for every price in the range and ``budget=`` later calibrates the price; no dual update or controller is needed.
The reward of a row's step is minus the chosen member's quality increment plus its price times the FLOPs the
step saved against the heavy at the same step, per full heavy forward (each member charged its own FLOPs, a
probe's included): dense, exact, and summing over an episode to minus the sample's quality loss plus its priced
saving. The heavy earns exactly 0. Charging the price on all executed FLOPs instead would have the same best
policy (the heavy's FLOPs at a step do not depend on the choice, nor does the number of steps), but returns of
about the price times a whole sample's compute, which the critic must predict and PPO must see through.

The quality increment is, with a ``seed_baseline`` (a heavy from another seed: the ``excess`` objective), the
chosen member's path-KL increment (``adasched.analysis.path_kl``: the KL of its prediction from the heavy's at the
positions revealed) less the seed baseline's at the same positions, and 0 where the heavy ran: path KL charges
for being another good network, the excess only for being a worse one. Without one (``raw``) it is the path-KL
increment itself. The reward takes it in expectation over which of the row's masked positions reveal
(``increment="expected"``, ``step_kl``'s Rao-Blackwell form averaged over ``expected_positions`` of them drawn
uniformly: the same mean with little of the reveal draw's noise, which no decision can see) or at the positions
that did (``"revealed"``). Episodes report the revealed sums, the measure
itself (``path_kl``, ``excess``). The evaluator's NLL of a finished sample can
be added at the episode's end (``quality_weight``, off by default). The sampler draws a step's tokens from the
logits the chosen member computed for its increment (``Trajectory.reuse_logits``), so it runs once per step.
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
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from adasched.analysis.evaluation import sample_nll
from adasched.analysis.path_kl import masked_sample, step_kl
from adasched.errors import ConfigError
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.features import feature_space, needed_features, router_inputs
from adasched.sampling.policy import ENTROPY
from adasched.sampling.prices import PriceRange
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import EventTrajectory

INCREMENTS = ("expected", "revealed")  # the reward's quality term: over the reveal draw, or at it
SEED_RANGE = (2_000_000, 2**31 - 1)  # training samples: disjoint from run's (0, ...) and calibration's (1_000_000, ...) seeds
Scorer = Callable[[torch.Tensor], torch.Tensor]  # generated tokens (B, L) -> (B,) float64 mean NLL per token


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
    """What every episode shares: the family, the sampler's settings, the prices, the quality terms and the inputs."""

    models: Sequence[MDLMDenoiser]  # the actions, in family order (0 = the heavy reference)
    spec: SamplingSpec  # its batch_size is ignored: the environment's number of rows is the batch
    prices: PriceRange  # each episode's price of a full heavy forward's FLOPs, in nats
    seed_baseline: MDLMDenoiser | None = None  # the excess objective's floor (never a choice); None: the raw path KL
    score: Scorer | None = None  # the evaluator's NLL of finished samples; needed when quality_weight > 0
    quality_weight: float = 0.0  # terminal reward -quality_weight * NLL (nats/token)
    extra_features: tuple[str, ...] = ()  # named extra features the agent reads (``adasched.sampling.features``)
    probe_model: int | None = None  # the member whose probe forward the probe features need (charged to the row)
    increment: str = "expected"  # the reward's quality term: "expected" over the reveal draw | "revealed" at it
    expected_positions: int | None = 32  # masked positions per row (a uniform sample) the expected increment averages; None: all


class RowBatch:
    """``num_rows`` rows of one ``EventTrajectory``, each an episode of its own; the engine behind both environments.

    A row whose sample finishes starts a new one (a fresh seed and price from ``rng``) in the same step, so every
    call decides for all rows and the models always run on the whole batch.
    """

    def __init__(self, config: EpisodeConfig, num_rows: int, rng: np.random.Generator) -> None:
        if config.increment not in INCREMENTS:
            raise ConfigError(f"env.increment={config.increment!r} is invalid; it must be one of: {', '.join(INCREMENTS)}")
        if config.quality_weight and config.score is None:
            raise ConfigError(f"env.quality_weight={config.quality_weight} needs an evaluator to score samples")
        self.config, self.num_rows, self.rng = config, num_rows, rng
        self.generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))  # the expected increments' samples
        self.mask_id = config.models[0].config.mask_token_id
        self.spec = SamplingSpec(config.spec.num_steps, config.spec.seq_len, num_rows, config.spec.top_p)
        self.heavy_full = float(config.models[0].flops_per_forward(self.spec.seq_len, self.spec.seq_len))
        self.features = frozenset({ENTROPY}) | needed_features(config.extra_features)

    @property
    def num_models(self) -> int:
        return len(self.config.models)

    def observation_space(self) -> spaces.Box:
        return feature_space(self.num_models, self.config.extra_features, self.config.prices)

    def new_episodes(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample seeds and price codes for ``count`` new episodes."""
        seeds = torch.as_tensor(self.rng.integers(*SEED_RANGE, size=count), dtype=torch.int64)
        return seeds, self.config.prices.draw_codes(self.rng, count)

    def start(self) -> np.ndarray:
        """Begin an episode in every row; returns the first decision's observations."""
        meter = CostMeter([str(m) for m in range(self.num_models)], [m.config.n_blocks for m in self.config.models])
        seeds, self.codes = self.new_episodes(self.num_rows)
        self.path = EventTrajectory(self.config.models, seeds, self.spec, meter, features=self.features, probe_model=self.config.probe_model)
        self.episode_kl = torch.zeros(self.num_rows, dtype=torch.float64)
        self.episode_floor = torch.zeros(self.num_rows, dtype=torch.float64)
        self.decisions = torch.zeros(self.num_rows, self.num_models, dtype=torch.float64)
        return self._observe()

    @property
    def prices(self) -> torch.Tensor:
        """(num_rows,) float64 each row's price, in nats per full heavy forward."""
        return self.config.prices.decode_all(self.codes)

    def _observe(self) -> np.ndarray:
        self.state = self.path.begin_step()
        positions = self.config.prices.position(self.codes)
        self.observation = router_inputs(self.state, self.num_models, self.config.extra_features, positions).numpy()
        return self.observation

    def step(self, action: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, float]]]:
        """Apply one decision per row; returns observations, (B,) rewards, which rows ended, and their summaries."""
        path, config = self.path, self.config
        ending = [slot for slot in range(self.num_rows) if path.events_left[slot] == 1]
        samples = path.sample_of[ending].tolist()
        totals = (path.row_flops[ending], path.row_all_heavy[ending])
        seeds, codes = self.new_episodes(len(ending))
        if ending:
            path.enqueue(seeds)  # starts in the ending rows' slots as they free
        with torch.inference_mode():
            tokens, reveal = path.open_step()
            expected = config.increment == "expected"
            averaged = masked_sample(tokens, self.mask_id, config.expected_positions, self.generator) if expected else None
            measured = step_kl(config.models, tokens, self.state.t, reveal, action.to(tokens.device), self.spec.top_p, config.seed_baseline, averaged)
            kl = measured.kl.cpu()
            floor = torch.zeros_like(kl) if measured.floor is None else measured.floor.cpu()
            reward_kl, reward_floor = (measured.expected_kl.cpu(), measured.expected_floor) if expected else (kl, measured.floor)
            reward_floor = torch.zeros_like(kl) if reward_floor is None else reward_floor.cpu()
            path.reuse_logits(measured.logits)  # the chosen members ran for the increment: draw from those logits
            output = path.advance(action)
            self.episode_kl += kl
            self.episode_floor += floor
            self.decisions[torch.arange(self.num_rows), action.cpu()] += 1
            rewards = -(reward_kl - reward_floor) + self.prices * (output.all_heavy_flops - output.flops).cpu() / self.heavy_full
            infos: list[dict[str, float]] = [{} for _ in range(self.num_rows)]
            if ending:
                nll = config.score(path.tokens_out[samples, path.prefix_len :]).cpu() if config.score is not None else None
                executed = (totals[0] + output.flops[ending]).cpu()
                all_heavy = (totals[1] + output.all_heavy_flops[ending]).cpu()
                for i, slot in enumerate(ending):
                    summary = self.summary(slot, float(executed[i]), float(all_heavy[i]))
                    if nll is not None:
                        summary["nll"] = float(nll[i])
                        rewards[slot] -= config.quality_weight * nll[i]
                    infos[slot] = {"terminal_observation": self.observation[slot], **summary}
                self.codes[ending] = codes
                self.episode_kl[ending] = self.episode_floor[ending] = 0.0
                self.decisions[ending] = 0.0
            observation = self._observe()
        dones = np.zeros(self.num_rows, dtype=bool)
        dones[ending] = True
        return observation, rewards.numpy(), dones, infos

    def summary(self, slot: int, executed: float, all_heavy: float) -> dict[str, float]:
        """A finished episode: its price, executed saving, path KL, excess (where a seed baseline measures the floor)
        and the share of its decisions each member took (``share_<m>``)."""
        shares = self.decisions[slot] / self.decisions[slot].sum()
        return {
            "price": float(self.prices[slot]), "saved_executed": 1.0 - executed / all_heavy, "path_kl": float(self.episode_kl[slot]),
            **({"excess": float(self.episode_kl[slot] - self.episode_floor[slot])} if self.config.seed_baseline is not None else {}),
            "executed_flops": executed, "all_heavy_flops": all_heavy, **{f"share_{m}": float(share) for m, share in enumerate(shares)},
        }


class ModelScheduleEnv(gymnasium.Env):
    """Schedule the denoisers of one sample (a batch of one row) over a whole sampling trajectory.

    ## Action Space
    ``Discrete(n_models)``: the family member that denoises the current step (0 = the heavy reference).

    ## Observation Space
    ``Box(float32)`` with the columns of ``adasched.sampling.features.router_input_names``: t, mask fraction, the
    fraction revealed at the row's previous forward, log(1 + positions revealing now), FLOPs saved so far vs
    all-heavy, the previous forward's mean predictive entropy and whether there was one, the one-hot model of the
    previous forward, the configured extra features, and where the episode's price lies in the range (-1 to 1 on
    the asinh scale).

    ## Rewards
    Each step earns ``-increment + price * FLOPs saved against the heavy / FLOPs of a full heavy forward``, where the increment
    is the step's path-KL increment (0 for the heavy model), less the seed baseline's at the same positions where
    the config has one (the excess objective). With ``quality_weight > 0`` the last step also earns
    ``-quality_weight * NLL`` of the finished sample under the scorer (the autoregressive evaluator).

    ## Starting State
    All generated positions masked at t = 1, with a sample seed drawn from ``self.np_random`` (in
    ``SEED_RANGE``, disjoint from evaluation seeds) and a price from the config's range; the first observation is
    the first step revealing any.

    ## Episode End
    The episode terminates after the row's last reveal (every position revealed); it is never truncated.
    Only steps where the row reveals are decisions, so it lasts at most ``seq_len`` of them.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EpisodeConfig) -> None:
        self.rows = RowBatch(config, 1, np.random.default_rng())
        self.action_space = spaces.Discrete(self.rows.num_models)
        self.observation_space = self.rows.observation_space()
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
    ``terminal_observation`` and the episode summary, and it has already started a new sample at a new price
    (SB3's auto-reset).
    """

    render_mode = None

    def __init__(self, config: EpisodeConfig, num_envs: int, seed: int = 0) -> None:
        self.rows = RowBatch(config, num_envs, np.random.default_rng(seed))
        super().__init__(num_envs, self.rows.observation_space(), spaces.Discrete(self.rows.num_models))
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


class PriceScaledRewards(VecEnvWrapper):
    """Rewards divided by the running scale of the discounted returns of their episode's price bucket.

    An episode's return is about its price times the compute it saved less its quality loss, so across a range of
    prices it spans orders of magnitude; one scale for all (SB3's ``VecNormalize``) is set by the priciest
    episodes, and PPO's updates then ignore what the cheap ones could learn. Each bucket (``buckets`` equal spans
    of the price's position in its range, the observation's last column) keeps its own scale instead. Dividing an episode's rewards by
    a positive constant leaves its best policy unchanged; the critic reads the price, so it can follow each scale.
    """

    def __init__(self, venv: VecEnv, buckets: int, gamma: float, epsilon: float = 1e-8) -> None:
        super().__init__(venv)
        self.edges = np.linspace(-1.0, 1.0, buckets + 1)[1:-1]
        self.scales = [RunningMeanStd(shape=()) for _ in range(buckets)]
        self.gamma, self.epsilon = gamma, epsilon
        self.returns = np.zeros(self.num_envs)

    def reset(self) -> VecEnvObs:
        observation = self.venv.reset()
        self.positions = observation[:, -1].copy()
        self.returns[:] = 0.0
        return observation

    def step_wait(self) -> VecEnvStepReturn:
        observation, rewards, dones, infos = self.venv.step_wait()
        bucket = np.searchsorted(self.edges, self.positions)
        self.returns = self.returns * self.gamma + rewards
        for index in np.unique(bucket):
            self.scales[index].update(self.returns[bucket == index])
        scale = np.sqrt(np.array([self.scales[index].var for index in bucket]) + self.epsilon)
        self.returns[dones] = 0.0
        self.positions = observation[:, -1].copy()  # a finished row's observation is already its next episode's
        return observation, (rewards / scale).astype(np.float32), dones, infos

    def state(self) -> list[dict[str, float]]:
        """Every bucket's running moments: what a checkpoint keeps so a resumed run scales as before."""
        return [{"mean": float(s.mean), "var": float(s.var), "count": float(s.count)} for s in self.scales]

    def load_state(self, state: list[dict[str, float]]) -> None:
        if len(state) != len(self.scales):
            raise ConfigError(f"the checkpoint keeps {len(state)} return scales but env.reward_buckets={len(self.scales)}; resume with the same setting")
        for scale, moments in zip(self.scales, state):
            scale.mean, scale.var, scale.count = np.float64(moments["mean"]), np.float64(moments["var"]), float(moments["count"])
