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

from adasched.analysis.evaluation import load_evaluator
from adasched.analysis.path_kl import path_kl
from adasched.data.tokenizer import load_tokenizer
from adasched.errors import ConfigError
from adasched.jobs.train_router import convergence, train_router, training_state
from adasched.models.family import load_family
from adasched.rl.env import EpisodeConfig, ModelScheduleEnv, ModelScheduleVecEnv, PriceScaledRewards, evaluator_scorer
from adasched.sampling.calibration import Recording, calibrate
from adasched.sampling.features import feature_names, router_features, router_input_names, router_inputs
from adasched.sampling.policy import REVEALING
from adasched.sampling.prices import PriceRange
from adasched.sampling.policy_check import check_policy, synthetic_states
from adasched.sampling.reference import reference_sample
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import sample
from policies import learned, make_policy
from tests.helpers import compose_config, meter

STEPS, SEQ_LEN = 10, 16


def episode_config(
    root: Path, price: float = 1.0, quality_weight: float = 0.0, members: tuple[str, ...] = ("heavy", "light"), increment: str = "revealed"
) -> EpisodeConfig:
    """Episodes priced at ``price`` (a range narrower than any difference it could make); rewarded by the revealed
    increments unless told, so that an episode's rewards sum to its measured path KL exactly."""
    models = list(load_family({name: root / name for name in members}).values())
    evaluator, evaluator_tokenizer = load_evaluator(str(root / "ar_evaluator"), "cpu", str(root / "tokenizer"))
    score = evaluator_scorer(evaluator, evaluator_tokenizer, load_tokenizer(root / "tokenizer"), 8, "cpu")
    prices = PriceRange(price - 1e-9, price + 1e-9, 1.0)
    return EpisodeConfig(models, SamplingSpec(STEPS, SEQ_LEN), prices, score=score, quality_weight=quality_weight, increment=increment)


def router_config(root: Path, run_dir: Path, *overrides: str):
    cfg = compose_config(
        "train_router",
        [
            f"family.dir={root}", f"sampling.num_steps={STEPS}", f"sampling.seq_len={SEQ_LEN}", "env.num_envs=4",
            "ppo.total_timesteps=256", "ppo.n_steps=16", "ppo.batch_size=32", "ppo.n_epochs=2", "ppo.net_arch=[8]",
            "checkpoint_every_n_timesteps=64", "progress_bar=false", "logger.mode=disabled", "eval.batch_size=8", "env.objective=raw", "env.extra_features=[]", *overrides,
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


def test_the_reward_is_minus_the_path_kl_plus_the_priced_saving(tiny_family: Path) -> None:
    config = episode_config(tiny_family, price=2.0)
    heavy, heavy_summary, _ = episode(config, 0)
    light, light_summary, env = episode(config, 1)
    assert len(light) == len(heavy) <= STEPS  # same seed: same reveal steps, whatever the models
    full = config.models[0].flops_per_forward(SEQ_LEN, SEQ_LEN)
    assert heavy_summary["path_kl"] == 0.0 and heavy_summary["saved_executed"] == 0.0 and heavy_summary["price"] == pytest.approx(2.0)
    assert heavy == [0.0] * len(heavy)
    assert light_summary["path_kl"] > 0 and light_summary["saved_executed"] > 0
    saved = light_summary["all_heavy_flops"] - light_summary["executed_flops"]
    assert sum(light) == pytest.approx(-light_summary["path_kl"] + 2.0 * saved / full)
    assert (heavy_summary["share_0"], light_summary["share_1"]) == (1.0, 1.0) and "excess" not in light_summary
    # the environment's path KL is the replay's of the same finished sample
    path = env.rows.path
    replayed = path_kl(config.models, path.tokens_out[:1], path.plan[:1], path.actions_out[:, :1])
    assert light_summary["path_kl"] == pytest.approx(replayed.per_sample[0].item())


def test_every_member_is_an_action_charged_its_own_flops(tiny_family: Path) -> None:
    """A third member as deep as the heavy (another seed) costs what the heavy does, yet departs from it."""
    config = episode_config(tiny_family, price=1.0, members=("heavy", "light", "heavy_seed1"))
    _, heavy, _ = episode(config, 0)
    _, light, _ = episode(config, 1)
    _, deep, _ = episode(config, 2)
    assert deep["executed_flops"] == heavy["executed_flops"] > light["executed_flops"] and deep["saved_executed"] == 0.0
    assert deep["path_kl"] > 0 and deep["share_2"] == 1.0
    assert ModelScheduleEnv(config).action_space.n == 3


def test_the_excess_objective_charges_only_what_the_chosen_model_loses_beyond_the_seed_baseline(tiny_family: Path) -> None:
    raw = episode_config(tiny_family, price=0.0)
    raw_rewards, raw_summary, _ = episode(raw, 1)
    assert raw_summary["path_kl"] > 0 and sum(raw_rewards) == pytest.approx(-raw_summary["path_kl"], abs=1e-6)  # raw: minus the path KL
    rewards, summary, _ = episode(dataclasses.replace(raw, seed_baseline=raw.models[1]), 1)  # the light model as its own floor
    assert rewards == pytest.approx([0.0] * len(raw_rewards), abs=1e-6) and summary["path_kl"] == raw_summary["path_kl"] and summary["excess"] == 0.0
    seed = load_family({name: tiny_family / name for name in ("heavy", "heavy_seed3")})["heavy_seed3"]
    rewards, summary, env = episode(dataclasses.replace(raw, seed_baseline=seed), 1)
    path = env.rows.path
    replayed = path_kl(raw.models, path.tokens_out[:1], path.plan[:1], path.actions_out[:, :1], seed_baseline=seed)
    excess = (replayed.per_sample[0] - replayed.floor_per_sample[0]).item()
    assert sum(rewards) == pytest.approx(-excess) and summary["excess"] == pytest.approx(excess) and sum(rewards) != sum(raw_rewards)


def test_expected_increments_reward_the_same_path_kl_on_average_with_less_noise(tiny_family: Path) -> None:
    """Rewards in expectation over the reveal draw sum, on the same trajectories, to the revealed path KL on
    average (paired over 48 seeds, within 4 standard errors), and vary less."""
    seed = load_family({name: tiny_family / name for name in ("heavy", "heavy_seed3")})["heavy_seed3"]
    revealed = dataclasses.replace(episode_config(tiny_family, price=0.0), seed_baseline=seed)
    expected = dataclasses.replace(revealed, increment="expected")
    sums = torch.tensor([[sum(episode(config, 1, seed=s)[0]) for config in (revealed, expected)] for s in range(48)], dtype=torch.float64)
    difference = sums[:, 1] - sums[:, 0]
    assert difference.mean().abs() < 4 * difference.std() / len(difference) ** 0.5
    assert sums[:, 1].std() < sums[:, 0].std() and difference.abs().max() > 0


def test_the_optional_terminal_reward_is_the_evaluator_nll(tiny_family: Path) -> None:
    rewards, summary, _ = episode(episode_config(tiny_family, price=0.0, quality_weight=0.5), 0)
    assert rewards[:-1] == pytest.approx([0.0] * (len(rewards) - 1), abs=1e-6) and rewards[-1] == pytest.approx(-0.5 * summary["nll"])


def test_each_episode_draws_its_price_uniformly_on_the_asinh_scale_and_reads_it_last(tiny_family: Path) -> None:
    prices = PriceRange(-0.05, 5.0, 0.01)
    config = dataclasses.replace(episode_config(tiny_family), prices=prices)
    env = ModelScheduleVecEnv(config, num_envs=4, seed=0)
    observation = env.reset()
    codes = env.rows.codes.clone()
    assert np.allclose(observation[:, -1], prices.position(codes).numpy()) and np.allclose(env.rows.prices.numpy(), [prices.decode(c) for c in codes.tolist()])
    seen = []
    for _ in range(6 * STEPS):
        observation, _, dones, infos = env.step(np.array([0, 1, 0, 1]))
        seen += [info["price"] for info in infos if "price" in info]
        assert np.allclose(observation[:, -1], prices.position(env.rows.codes).numpy()) and env.observation_space.contains(observation[0])
    assert len(seen) >= 16 and len(set(seen)) == len(seen)  # every episode its own price
    drawn = prices.decode_all(prices.draw_codes(np.random.default_rng(0), 20000))
    codes = np.arcsinh(drawn.numpy() / 0.01)
    assert drawn.min() >= -0.05 and drawn.max() <= 5.0 and (drawn < 0).any()
    assert np.histogram(codes, bins=4, range=prices.codes)[0] == pytest.approx([5000] * 4, rel=0.05)  # uniform in the code


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
    assert saved["timesteps"] == info["timesteps"] >= 256 and saved["features"] == router_input_names(2, [], priced=True)
    assert saved["objective"] == "raw" and saved["seed_baseline"] is None and saved["family"]["members"] == ["heavy", "light"]
    assert saved["prices"] == {"low": -0.3, "high": 2.0, "scale": 0.02}
    resumed = train_router(router_config(tiny_family, tmp_path))  # at the end: exports again, with the whole record
    assert all(resumed[key] == info[key] for key in ("timesteps", "convergence", "train_wall_seconds")) and info["convergence"]
    with (tmp_path / "router" / "training_episodes.csv").open() as handle:
        episodes = list(csv.DictReader(handle))
    assert len(episodes) >= 4 and float(episodes[-1]["timesteps"]) <= info["timesteps"] and (tmp_path / "router" / "training_curve.png").is_file()
    assert all(0 <= float(row["path_kl"]) and -0.3 <= float(row["price"]) <= 2.0 for row in episodes)

    policy = make_policy("learned_router", path=str(tmp_path / "router"), price=0.5)
    assert policy.trained_against is None and policy.trained_members == ("heavy", "light") and policy.price == pytest.approx(0.5)
    assert not (tmp_path / "router" / "router.zip").exists()  # the export holds no pickle: safetensors and JSON only
    router = PPO.load(tmp_path / "run" / "checkpoints" / f"router_{info['timesteps']}_steps.zip", device="cpu")  # the trained PPO itself
    policy.reset(20, 2)
    for price in (-0.3, 0.5, 2.0):
        policy.set_knob(PriceRange(**saved["prices"]).encode(price))
        for state in synthetic_states(8, 20, 2, seed=0):
            position = 2 * (np.arcsinh(price / 0.02) - np.arcsinh(-0.3 / 0.02)) / (np.arcsinh(2.0 / 0.02) - np.arcsinh(-0.3 / 0.02)) - 1
            inputs = np.column_stack([router_features(state, 2).numpy(), np.full(8, position, dtype=np.float32)])
            assert np.array_equal(policy.act(state).numpy(), router.predict(inputs, deterministic=True)[0])
    check_policy(policy, num_models=2)
    models = list(load_family({name: tiny_family / name for name in ("heavy", "light")}).values())
    spec = SamplingSpec(STEPS, SEQ_LEN, batch_size=4)
    output = sample(models, policy, torch.arange(6), spec, meter(models))
    assert output.actions.shape == (STEPS, 6)
    reference = reference_sample(models, policy, torch.arange(6), spec, meter(models))  # exact, like every policy
    assert torch.equal(output.tokens, reference.tokens) and torch.equal(output.actions, reference.actions)


def test_one_router_learns_light_at_a_high_price_and_heavy_at_a_low_one(tiny_family: Path, tmp_path: Path) -> None:
    """Prices from far below any KL increment to far above it: one PPO run must learn both ends, so its saving at
    calibration moves with the price instead of collapsing onto one member."""
    overrides = ("prices.low=0.0", "prices.high=1.0", "prices.scale=0.01", "ppo.total_timesteps=8192", "ppo.n_steps=32", "ppo.batch_size=64",
                 "ppo.n_epochs=4", "ppo.net_arch=[16]", "ppo.learning_rate=3e-3", "checkpoint_every_n_timesteps=8192")
    train_router(router_config(tiny_family, tmp_path, *overrides))
    models = list(load_family({name: tiny_family / name for name in ("heavy", "light")}).values())
    spec = SamplingSpec(STEPS, SEQ_LEN, batch_size=8)
    saved = {}
    for price in (0.0, 1.0):
        policy = make_policy("learned_router", path=str(tmp_path / "router"), price=price)
        policy.reset(STEPS, 2)
        cost = meter(models)
        sample(models, policy, torch.arange(16), spec, cost)
        saved[price] = cost.saved_executed()
    assert saved[0.0] < 0.1 and saved[1.0] > saved[0.0] + 0.3, saved


def test_an_excess_router_records_the_seed_baseline_it_was_trained_against(tiny_family: Path, tmp_path: Path) -> None:
    info = train_router(router_config(tiny_family, tmp_path, "env.objective=excess", "ppo.total_timesteps=64"))
    assert info["objective"] == "excess" and info["seed_baseline"] == "heavy_seed3"
    assert make_policy("learned_router", path=str(tmp_path / "router"), price=1.0).trained_against == "heavy_seed3"
    default = compose_config("train_router", [])
    assert default.env.objective == "excess" and Path(default.export_dir).name == "learned_router" and default.run_name == "learned_router-excess-seed0"


def test_a_checkpoint_keeps_the_return_scale_of_every_price_bucket(tiny_family: Path, tmp_path: Path) -> None:
    info = train_router(router_config(tiny_family, tmp_path))
    state = json.loads((tmp_path / "run" / "checkpoints" / f"router_state_{info['timesteps']}_steps.json").read_text())
    assert len(state["return_scales"]) == 8 and sum(scale["count"] > 1 for scale in state["return_scales"]) >= 4
    rewards = PriceScaledRewards(ModelScheduleVecEnv(episode_config(tiny_family), num_envs=4), 8, 1.0)
    rewards.load_state(state["return_scales"])
    assert training_state(rewards) == state
    with pytest.raises(ConfigError, match="keeps 8 return scales but env.reward_buckets=4"):
        PriceScaledRewards(ModelScheduleVecEnv(episode_config(tiny_family), num_envs=4), 4, 1.0).load_state(state["return_scales"])


def test_rewards_are_scaled_by_their_price_buckets_own_return_scale(tiny_family: Path) -> None:
    """Two prices 100 times apart: each bucket's scaled returns come out alike, where one shared scale would not."""
    config = dataclasses.replace(episode_config(tiny_family), prices=PriceRange(0.0, 100.0, 1.0))
    env = ModelScheduleVecEnv(config, num_envs=4, seed=0)
    env.rows.new_episodes = lambda count: (torch.arange(count) + 2_000_000, torch.full((count,), 0.0, dtype=torch.float64))  # noqa
    scaled = PriceScaledRewards(env, 2, 1.0)
    scaled.reset()
    env.rows.codes = torch.tensor([config.prices.encode(1.0)] * 2 + [config.prices.encode(100.0)] * 2, dtype=torch.float64)
    scaled.positions = config.prices.position(env.rows.codes).numpy()
    raw, out = [], []
    for _ in range(3):
        scaled.step_async(np.array([1, 1, 1, 1]))
        _, rewards, _, _ = scaled.step_wait()
        out.append(rewards)
    out = np.array(out)
    cheap, dear = np.abs(out[:, :2]).mean(), np.abs(out[:, 2:]).mean()
    assert 0.2 < cheap / dear < 5  # unscaled they differ by a factor of ~100
def test_a_price_outside_the_trained_range_and_other_bad_input_fail_on_one_line(tiny_family: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"no trained router in {tmp_path}.*python experiments/train_router.py"):
        make_policy("learned_router", path=str(tmp_path))
    with pytest.raises(ConfigError, match="prices.low=5.0 must lie below prices.high=2.0"):
        train_router(router_config(tiny_family, tmp_path, "prices.low=5.0"))
    with pytest.raises(ConfigError, match="prices.scale=0.0 is invalid"):
        train_router(router_config(tiny_family, tmp_path, "prices.scale=0.0"))
    with pytest.raises(ConfigError, match="sampling.precision='half' is unknown"):
        train_router(router_config(tiny_family, tmp_path, "sampling.precision=half"))
    with pytest.raises(ConfigError, match="env.increment='sometimes' is invalid; it must be one of: expected, revealed"):
        train_router(router_config(tiny_family, tmp_path, "env.increment=sometimes"))
    with pytest.raises(ConfigError, match="unknown router feature 'wobble'"):
        train_router(router_config(tiny_family, tmp_path, "env.extra_features=[wobble]"))
    with pytest.raises(ConfigError, match="env.seed_baseline='heavy_seed9' names no denoiser folder in .*, or pass env.objective=raw"):
        train_router(router_config(tiny_family, tmp_path, "env.objective=excess", "env.seed_baseline=heavy_seed9"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "router_64_steps.zip").touch()
    with pytest.raises(ConfigError, match="already holds a run"):
        train_router(router_config(tiny_family, tmp_path, "resume=false"))

    trained = tmp_path / "trained"
    train_router(router_config(tiny_family, trained, "ppo.total_timesteps=64"))
    router = str(trained / "router")
    with pytest.raises(ConfigError, match=r"policy.price=9 lies outside the prices the router was trained on, \[-0.3, 2\]"):
        make_policy("learned_router", path=router, price=9.0)
    with pytest.raises(ConfigError, match=r"reads a price: pass budget=<fraction> to calibrate it, or policy.price="):
        make_policy("learned_router", path=router)
    with pytest.raises(ConfigError, match="policy.light_bias=2.0 is for routers trained at one price"):
        make_policy("learned_router", path=router, light_bias=2.0, price=1.0)
    with pytest.raises(ConfigError, match="chooses among 2 models but the family has 1"):
        make_policy("learned_router", path=router, price=1.0).reset(STEPS, 1)
    # a budget beyond what the trained prices reach: the error names the price range, not the knob's asinh scale
    models = list(load_family({name: tiny_family / name for name in ("heavy", "light")}).values())
    policy = make_policy("learned_router", path=router, budget=0.99)
    with pytest.raises(ConfigError, match=r"budget=0.99 is out of reach .* saves at most .* \(at price 2, an end of the prices it was trained on, \[-0.3, 2\]\)"):
        calibrate(policy, models, torch.arange(100, 104), SamplingSpec(STEPS, SEQ_LEN, batch_size=4), tolerance=0.001)


def test_the_job_refuses_a_router_whose_members_are_not_the_familys_first(tiny_family: Path, tmp_path: Path) -> None:
    from adasched.jobs.arms import check_trained_members

    train_router(router_config(tiny_family, tmp_path, "ppo.total_timesteps=64"))
    policy = make_policy("learned_router", path=str(tmp_path / "router"), price=1.0)
    check_trained_members(compose_config("run", ["family.members=[heavy,light,light_b3]"]), "learned_router", policy)  # more may follow
    with pytest.raises(ConfigError, match=r"trained on, \[heavy, light\], but family.members is \[heavy, light_b4\]; pass family.members=\[heavy,light\]"):
        check_trained_members(compose_config("run", ["family.members=[heavy,light_b4]"]), "learned_router", policy)


def test_a_folder_of_routers_trained_at_one_price_serves_the_one_trained_nearest_the_budget(tmp_path: Path) -> None:
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
    for bias, model in ((policy.knob_range[1], 1), (policy.knob_range[0], 0)):  # the light bias's ends: all light, all heavy
        policy.set_knob(bias)
        assert all(bool((policy.act(state) == model).all()) for state in synthetic_states(8, 20, 2, seed=0))
    with pytest.raises(ConfigError, match=f"{tmp_path} holds routers trained for budgets 0.17, 0.33; pass budget="):
        make_policy("learned_router", path=str(tmp_path))


def test_convergence_compares_the_last_fifth_of_each_price_buckets_episodes_with_the_fifth_before() -> None:
    buckets = [(0.0, 1.0), (1.0, 2.0)]
    rows = [
        {"timesteps": float(t), "price": price, "episode_return": -10.0 + t / 100, "path_kl": 5.0, "saved_executed": 0.1 * price}
        for t in range(100, 1001, 100) for price in (0.5, 1.5)
    ]
    summary = convergence(rows, buckets)
    low, high = summary["price 0..1"], summary["price 1..2"]
    assert low["episodes_last"] == high["episodes_last"] == 2  # timesteps 900 and 1000
    assert low["episode_return"]["last"] == pytest.approx(-10 + 9.5) and low["episode_return"]["change"] == pytest.approx(2.0)
    assert low["episode_return"]["change_ci95"] == pytest.approx(1.96 * 0.5**0.5, abs=1e-4) and not low["episode_return"]["flat"]
    assert low["path_kl"]["flat"] and low["saved_executed"]["last"] == pytest.approx(0.05) and high["saved_executed"]["last"] == pytest.approx(0.15)
    assert "excess" not in low  # a raw run measures no floor
    assert convergence([], buckets) == {} and convergence(rows[:2], buckets)["price 0..1"]["episode_return"]["change"] is None


def test_calibration_starts_at_the_price_where_the_training_episodes_saved_the_budget(tmp_path: Path) -> None:
    prices = PriceRange(-0.02, 2.0, 0.005)
    buckets = prices.buckets(2)
    names = router_input_names(2, [], priced=True)
    info = {
        "features": names, "num_models": 2, "prices": prices.as_dict(),
        "convergence": {"last_fraction": 0.2, **{f"bucket{i}": {"prices": list(b), "saved_executed": {"last": saved}} for i, (b, saved) in enumerate(zip(buckets, (0.1, 0.5)))}},
    }
    learned.save(learned.RouterNetwork(len(names), [4], 2), tmp_path, info)
    policy = make_policy("learned_router", path=str(tmp_path), budget=0.3)
    centres = [sum(map(prices.encode, bucket)) / 2 for bucket in buckets]
    assert policy.code_saving(0.3) == pytest.approx(sum(centres) / 2) and policy.code_saving(0.1) == pytest.approx(centres[0])
    assert policy.price == pytest.approx(prices.decode(sum(centres) / 2))  # where it stands before calibration moves it


def test_a_router_reading_extra_features_reads_them_alike_in_training_and_sampling(tiny_family: Path, tmp_path: Path) -> None:
    extras = ["nearest_revealed_distance", "left_revealed", "right_revealed"]
    info = train_router(router_config(tiny_family, tmp_path, f"env.extra_features=[{','.join(extras)}]", "ppo.total_timesteps=128"))
    assert info["features"] == router_input_names(2, extras, priced=True) and info["extra_features"] == extras
    policy = make_policy("learned_router", path=str(tmp_path / "router"), price=0.3)
    assert REVEALING in policy.features  # the sampler hands over z_t and the reveal plan, which cost nothing
    router = PPO.load(tmp_path / "run" / "checkpoints" / f"router_{info['timesteps']}_steps.zip", device="cpu")
    models = list(load_family({name: tiny_family / name for name in ("heavy", "light")}).values())
    spec = SamplingSpec(STEPS, SEQ_LEN, batch_size=4)
    recorded = Recording(policy)
    output = sample(models, recorded, torch.arange(6), spec, meter(models))
    for state in recorded.states:
        expected = router.predict(router_inputs(state, 2, extras, PriceRange(-0.3, 2.0, 0.02).position(torch.full((state.batch_size,), policy.code))).numpy(), deterministic=True)[0]
        assert np.array_equal(policy.act(state).numpy(), expected)
    reference = reference_sample(models, policy, torch.arange(6), spec, meter(models))  # exact, like every policy
    assert torch.equal(output.tokens, reference.tokens) and torch.equal(output.actions, reference.actions)


def test_an_episode_samples_the_tokens_the_sampler_draws_and_costs_what_it_charges(tiny_family: Path) -> None:
    """The environment steps the event-driven sampler itself: an all-light episode has the tokens and executed FLOPs
    of ``sample`` with the static light policy from the same seed, though the light model runs once per step, for
    the increment, and the sampler draws from those logits."""
    config = episode_config(tiny_family, price=1.0)
    light, calls = config.models[1], []
    forward = light.hidden_states
    light.hidden_states = lambda *args: calls.append(1) or forward(*args)  # counts the light model's forwards
    rewards, summary, env = episode(config, 1)
    del light.hidden_states
    assert len(calls) == len(rewards)
    path = env.rows.path
    seed = path.seeds[:1]
    cost = meter(config.models)
    output = sample(config.models, make_policy("static_light"), seed, SamplingSpec(STEPS, SEQ_LEN, batch_size=1), cost)
    assert torch.equal(output.tokens, path.tokens_out[:1]) and torch.equal(output.actions, path.actions_out[:, :1])
    assert summary["executed_flops"] == pytest.approx(sum(cost.flops)) and summary["saved_executed"] == pytest.approx(cost.saved_executed())
