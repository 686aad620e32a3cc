"""The router's environments, training job and policy on a tiny family: checkers, rewards, PPO, round trip."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from omegaconf import open_dict
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import VecNormalize

from adasched.analysis.evaluation import load_evaluator
from adasched.analysis.path_kl import path_kl
from adasched.data.tokenizer import load_tokenizer
from adasched.errors import ConfigError
from adasched.jobs.train_router import restore_return_scale, train_router, training_state
from adasched.models.family import load_family
from adasched.rl.env import (
    EpisodeConfig,
    LagrangeMultiplier,
    ModelScheduleEnv,
    ModelScheduleVecEnv,
    evaluator_scorer,
)
from adasched.sampling.features import feature_names, router_features
from adasched.sampling.policy_check import check_policy, synthetic_states
from adasched.sampling.reference import reference_sample
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import sample
from policies import learned, make_policy
from tests.helpers import compose_config, meter

STEPS, SEQ_LEN = 10, 16


def episode_config(root: Path, budget: float = 0.25, lam: float = 1.0, quality_weight: float = 0.0, budget_penalty: float = 0.0) -> EpisodeConfig:
    models = list(load_family({name: root / name for name in ("heavy", "light")}).values())
    evaluator, evaluator_tokenizer = load_evaluator(str(root / "ar_evaluator"), "cpu", str(root / "tokenizer"))
    score = evaluator_scorer(evaluator, evaluator_tokenizer, load_tokenizer(root / "tokenizer"), 8, "cpu")
    return EpisodeConfig(models, SamplingSpec(STEPS, SEQ_LEN), budget, LagrangeMultiplier(lam, 0.0, budget), score, quality_weight, budget_penalty)


def router_config(root: Path, run_dir: Path, *overrides: str):
    cfg = compose_config(
        "train_router",
        [
            f"family.dir={root}", f"sampling.num_steps={STEPS}", f"sampling.seq_len={SEQ_LEN}", "env.num_envs=4",
            "ppo.total_timesteps=256", "ppo.n_steps=16", "ppo.batch_size=32", "ppo.n_epochs=2", "ppo.net_arch=[8]",
            "checkpoint_every_n_timesteps=64", "progress_bar=false", "logger.mode=disabled", "eval.batch_size=8", *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(run_dir / "run")
        cfg.export_dir = str(run_dir / "router")
    return cfg


def test_both_env_checkers_pass(tiny_family: Path) -> None:
    gymnasium_check_env(ModelScheduleEnv(episode_config(tiny_family)), skip_render_check=True)
    sb3_check_env(ModelScheduleEnv(episode_config(tiny_family)))


def episode(config: EpisodeConfig, model: int, seed: int = 3) -> tuple[list[float], dict[str, float], ModelScheduleEnv]:
    """Rewards of one episode choosing ``model`` always, and its summary."""
    env = ModelScheduleEnv(config)
    env.reset(seed=seed)
    rewards, done, summary = [], False, {}
    while not done:
        _, reward, done, _, summary = env.step(model)
        rewards.append(reward)
    return rewards, summary, env


def test_the_reward_is_minus_the_path_kl_and_the_priced_compute(tiny_family: Path) -> None:
    config = episode_config(tiny_family, lam=2.0)
    heavy, heavy_summary, _ = episode(config, 0)
    light, light_summary, env = episode(config, 1)
    assert len(light) == len(heavy) <= STEPS  # same seed: same reveal steps, whatever the models
    full = config.models[0].flops_per_forward(SEQ_LEN, SEQ_LEN)
    assert heavy_summary["path_kl"] == 0.0 and heavy_summary["saved_executed"] == 0.0
    assert sum(heavy) == pytest.approx(-2.0 * heavy_summary["executed_flops"] / full)
    assert light_summary["path_kl"] > 0 and light_summary["saved_executed"] > 0
    assert sum(light) == pytest.approx(-light_summary["path_kl"] - 2.0 * light_summary["executed_flops"] / full)
    # the environment's path KL is the replay's of the same finished sample
    path = env.rows.path
    replayed = path_kl(config.models, path.tokens_out[:1], path.plan[:1], path.actions_out[:, :1])
    assert light_summary["path_kl"] == pytest.approx(replayed.per_sample[0].item())


def test_the_excess_objective_charges_only_what_the_chosen_model_loses_beyond_the_seed_baseline(tiny_family: Path) -> None:
    raw = episode_config(tiny_family, lam=0.0)
    raw_rewards, raw_summary, _ = episode(raw, 1)
    assert raw_summary["path_kl"] > 0 and sum(raw_rewards) == pytest.approx(-raw_summary["path_kl"])  # raw: minus the path KL, as before
    rewards, summary, _ = episode(dataclasses.replace(raw, seed_baseline=raw.models[1]), 1)  # the light model as its own floor
    assert rewards == [0.0] * len(raw_rewards) and summary["path_kl"] == raw_summary["path_kl"]  # no quality term; the reported path KL stays raw
    seed = load_family({name: tiny_family / name for name in ("heavy", "heavy_seed3")})["heavy_seed3"]
    rewards, summary, env = episode(dataclasses.replace(raw, seed_baseline=seed), 1)
    path = env.rows.path
    replayed = path_kl(raw.models, path.tokens_out[:1], path.plan[:1], path.actions_out[:, :1], seed_baseline=seed)
    assert sum(rewards) == pytest.approx((replayed.floor_per_sample[0] - replayed.per_sample[0]).item()) and sum(rewards) != sum(raw_rewards)


def test_the_optional_terminal_reward_is_the_evaluator_nll(tiny_family: Path) -> None:
    rewards, summary, _ = episode(episode_config(tiny_family, lam=0.0, quality_weight=0.5), 0)
    assert rewards[:-1] == [0.0] * (len(rewards) - 1) and rewards[-1] == pytest.approx(-0.5 * summary["nll"])


def test_the_budget_penalty_ends_an_episode_with_its_squared_distance_from_the_target(tiny_family: Path) -> None:
    for model in (0, 1):  # all-heavy saves nothing, below the target; all-light saves more than it
        plain, _, _ = episode(episode_config(tiny_family, budget=0.25), model)
        penalized, summary, _ = episode(episode_config(tiny_family, budget=0.25, budget_penalty=300.0), model)
        assert penalized[:-1] == pytest.approx(plain[:-1])
        assert penalized[-1] - plain[-1] == pytest.approx(-150.0 * (summary["saved_executed"] - 0.25) ** 2)
        assert summary["saved_executed"] != 0.25


def test_the_multiplier_rises_below_the_budget_and_stops_at_zero() -> None:
    multiplier = LagrangeMultiplier(0.1, 1.0, target=0.25)
    assert multiplier.update(0.0) == pytest.approx(0.35)
    assert multiplier.update(1.0) == 0.0


def test_a_decaying_dual_step_settles_lambda_where_a_constant_one_wanders() -> None:
    """Savings that respond to lambda with noise: the decaying step ends near the balancing price, and steadier."""

    def run(decay: float, seed: int) -> list[float]:
        rng = np.random.default_rng(seed)
        multiplier = LagrangeMultiplier(0.3, 1.0, target=0.25, decay=decay)
        return [multiplier.update(0.25 + 0.2 * (multiplier.value - 1.0) + rng.normal(0, 0.05)) for _ in range(400)]

    for seed in range(5):
        settled, wandering = np.array(run(0.6, seed)), np.array(run(0.0, seed))
        assert abs(settled[-100:].mean() - 1.0) < 0.05 and settled[-100:].std() < wandering[-100:].std() / 2
    multiplier = LagrangeMultiplier(1.0, 0.5, target=0.25, decay=1.0, updates=3)  # a resumed run continues its decay
    assert multiplier.update(0.05) == pytest.approx(1.0 + 0.5 / 4 * 0.2)


def test_a_proportional_term_damps_the_swing_of_a_policy_that_follows_the_price_with_a_lag() -> None:
    """The saving moves 1% of the way to a steep response of lambda per update, as a slowly learning policy's does."""

    def distance_from_budget(kp: float, seed: int) -> float:
        rng = np.random.default_rng(seed)
        multiplier, saving, distances = LagrangeMultiplier(1.2, 1.0, target=0.25, decay=0.6, kp=kp), 0.3, []
        for _ in range(200):
            saving += 0.01 * (0.6 / (1 + np.exp(-(multiplier.value - 1) / 0.05)) - saving)
            multiplier.update(saving + rng.normal(0, 0.03))
            distances.append(abs(saving - 0.25))
        return float(np.mean(distances[100:]))

    for seed in range(5):
        assert distance_from_budget(1.0, seed) < distance_from_budget(0.0, seed) / 2
    multiplier = LagrangeMultiplier(0.5, 1.0, target=0.25, kp=2.0, integral=0.4)  # resumed: the integral is its own state
    assert multiplier.update(0.15) == pytest.approx(0.4 + 0.1 + 2.0 * 0.1) and multiplier.integral == pytest.approx(0.5)


def test_vec_env_rows_end_on_their_own_and_restart_and_train_with_ppo(tiny_family: Path) -> None:
    env = ModelScheduleVecEnv(episode_config(tiny_family), num_envs=4, seed=0)
    observation = env.reset()
    assert observation.shape == (4, env.observation_space.shape[0]) and env.observation_space.contains(observation[0])
    ended = np.zeros(4, dtype=int)
    for _ in range(3 * STEPS):  # a row has at most STEPS decisions: every row ends at least twice
        observation, _, dones, infos = env.step(np.array([0, 1, 0, 1]))
        ended += dones
        for done, info in zip(dones, infos):
            assert done == ("terminal_observation" in info and "saved_executed" in info)
        assert env.observation_space.contains(observation[0])
    assert (ended >= 2).all()
    PPO("MlpPolicy", env, n_steps=16, batch_size=32, n_epochs=1, policy_kwargs={"net_arch": [8]}, seed=0, device="cpu").learn(256)


def test_train_export_resume_and_the_policy_acts_like_the_router(tiny_family: Path, tmp_path: Path) -> None:
    info = train_router(router_config(tiny_family, tmp_path))
    saved = json.loads((tmp_path / "router" / "router.json").read_text())
    assert saved["timesteps"] == info["timesteps"] >= 256 and saved["budget"] == 0.25 and len(saved["features"]) == 9
    assert saved["objective"] == "raw" and saved["seed_baseline"] is None
    resumed = train_router(router_config(tiny_family, tmp_path))  # at the end: exports again, with the whole record
    assert all(resumed[key] == info[key] for key in ("timesteps", "convergence", "train_wall_seconds")) and info["convergence"]
    with (tmp_path / "router" / "training_curve.csv").open() as handle:
        curve = list(csv.DictReader(handle))
    assert len(curve) >= 2 and float(curve[-1]["timesteps"]) <= info["timesteps"] and (tmp_path / "router" / "training_curve.png").is_file()
    assert all(0 <= float(row["path_kl"]) and float(row["lambda"]) >= 0 for row in curve)

    policy = make_policy("learned_router", path=str(tmp_path / "router"))
    assert policy.trained_against is None and not (tmp_path / "router" / "router.zip").exists()  # the export holds no pickle: safetensors and JSON only
    router = PPO.load(tmp_path / "run" / "checkpoints" / f"router_{info['timesteps']}_steps.zip", device="cpu")  # the trained PPO itself
    policy.reset(20, 2)
    for state in synthetic_states(8, 20, 2, seed=0):
        expected = router.predict(router_features(state, 2).numpy(), deterministic=True)[0]
        assert np.array_equal(policy.act(state).numpy(), expected)
    for bias, model in ((policy.knob_range[1], 1), (policy.knob_range[0], 0)):  # the knob's ends: all light, all heavy
        policy.set_knob(bias)
        assert all(bool((policy.act(state) == model).all()) for state in synthetic_states(8, 20, 2, seed=0))
    policy.set_knob(0.0)
    check_policy(policy, num_models=2)
    models = list(load_family({name: tiny_family / name for name in ("heavy", "light")}).values())
    spec = SamplingSpec(STEPS, SEQ_LEN, batch_size=4)
    output = sample(models, policy, torch.arange(6), spec, meter(models))
    assert output.actions.shape == (STEPS, 6)
    reference = reference_sample(models, policy, torch.arange(6), spec, meter(models))  # exact, like every policy
    assert torch.equal(output.tokens, reference.tokens) and torch.equal(output.actions, reference.actions)


def test_at_a_price_above_any_kl_ppo_learns_to_run_the_light_model(tiny_family: Path, tmp_path: Path) -> None:
    """With lambda fixed far above every KL increment, light is right at every step: the saving must climb."""
    overrides = ("env.lambda_init=20.0", "env.lambda_lr=0.0", "ppo.total_timesteps=2048", "ppo.n_steps=32", "ppo.batch_size=64", "ppo.n_epochs=4", "ppo.net_arch=[16]", "ppo.learning_rate=3e-3")
    train_router(router_config(tiny_family, tmp_path, *overrides))
    with (tmp_path / "router" / "training_curve.csv").open() as handle:
        saving = [float(row["saved_executed"]) for row in csv.DictReader(handle)]
    assert np.mean(saving[-4:]) > np.mean(saving[:4]) + 0.1


def test_an_excess_router_records_the_seed_baseline_it_was_trained_against(tiny_family: Path, tmp_path: Path) -> None:
    info = train_router(router_config(tiny_family, tmp_path, "env.objective=excess", "ppo.total_timesteps=64"))
    assert info["objective"] == "excess" and info["seed_baseline"] == "heavy_seed3"
    assert make_policy("learned_router", path=str(tmp_path / "router")).trained_against == "heavy_seed3"
    folders = {objective: compose_config("train_router", [f"env.objective={objective}"]) for objective in ("raw", "excess")}
    assert Path(folders["raw"].export_dir).parent.name == "learned_router" and folders["raw"].run_name.startswith("learned_router-")
    assert Path(folders["excess"].export_dir).parent.name == "learned_router_excess" and folders["excess"].run_name.startswith("learned_router_excess-")


def test_a_checkpoint_keeps_lambda_and_the_return_scale(tiny_family: Path, tmp_path: Path) -> None:
    info = train_router(router_config(tiny_family, tmp_path))
    state = json.loads((tmp_path / "run" / "checkpoints" / f"router_lambda_{info['timesteps']}_steps.json").read_text())
    assert state["lambda"] == info["lambda"] and state["return_scale"]["count"] > 1
    rewards = VecNormalize(ModelScheduleVecEnv(episode_config(tiny_family), num_envs=4), norm_obs=False)
    restore_return_scale(rewards, state)
    assert state["lambda_updates"] > 0
    assert training_state(LagrangeMultiplier(info["lambda"], 0.0, 0.25, updates=state["lambda_updates"]), rewards) == state


def test_missing_router_and_bad_budget_fail_on_one_line(tiny_family: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"no trained router in {tmp_path}.*python experiments/train_router.py"):
        make_policy("learned_router", path=str(tmp_path))
    with pytest.raises(ConfigError, match="budget=1.5 is invalid"):
        train_router(router_config(tiny_family, tmp_path, "budget=1.5"))
    with pytest.raises(ConfigError, match="sampling.precision='half' is unknown"):
        train_router(router_config(tiny_family, tmp_path, "sampling.precision=half"))
    with pytest.raises(ConfigError, match="env.seed_baseline='heavy_seed9' names no denoiser folder in .*, or pass env.objective=raw"):
        train_router(router_config(tiny_family, tmp_path, "env.objective=excess", "env.seed_baseline=heavy_seed9"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "router_64_steps.zip").touch()
    with pytest.raises(ConfigError, match="already holds a run"):
        train_router(router_config(tiny_family, tmp_path, "resume=false"))


def test_a_folder_of_routers_serves_the_one_trained_nearest_the_budget(tmp_path: Path) -> None:
    names = feature_names(2)
    for budget, light_bias in ((0.17, -5.0), (0.33, 5.0)):  # heads that always pick heavy, always light
        network = learned.RouterNetwork(len(names), [4], 2)
        torch.nn.init.zeros_(network.head.weight)
        network.head.bias.data = torch.tensor([0.0, light_bias])
        learned.save(network, tmp_path / f"budget{budget}", {"features": names, "num_models": 2, "budget": budget})
    for budget, model in ((0.2, 0), (0.3, 1)):
        policy = make_policy("learned_router", path=str(tmp_path), budget=budget)
        policy.reset(20, 2)
        assert policy.info["budget"] in (0.17, 0.33) and all(bool((policy.act(state) == model).all()) for state in synthetic_states(4, 20, 2, seed=0))
    with pytest.raises(ConfigError, match=f"{tmp_path} holds routers trained for budgets 0.17, 0.33; pass budget="):
        make_policy("learned_router", path=str(tmp_path))


def test_convergence_compares_the_last_fifth_of_a_curve_with_the_fifth_before() -> None:
    from adasched.jobs.train_router import convergence

    rows = [{"timesteps": float(t), "episode_return": -10.0 + t / 100, "path_kl": 5.0, "saved_executed": 0.17, "lambda": 1.0} for t in range(100, 1001, 100)]
    summary = convergence(rows)
    assert summary["rollouts_last"] == 2  # timesteps 900 and 1000
    assert summary["episode_return_last"] == pytest.approx(-10 + 9.5) and summary["episode_return_change"] == pytest.approx(2.0)
    assert summary["path_kl_change"] == 0 and summary["saved_executed_last"] == pytest.approx(0.17)
    assert summary["episode_return_change_ci95"] == pytest.approx(1.96 * 0.5**0.5, abs=1e-4) and not summary["episode_return_flat"]  # windows (-3, -2), (-1, 0)
    assert summary["path_kl_flat"] and summary["lambda_flat"]
    noisy = [{**row, "episode_return": -10.0 + (3.0 if i % 2 else -3.0)} for i, row in enumerate(rows + [{**rows[-1], "timesteps": 1100.0}])]
    assert convergence(noisy)["episode_return_flat"]  # a swing within the noise is flat
    assert convergence([]) == {} and convergence(rows[:1])["episode_return_change"] is None
