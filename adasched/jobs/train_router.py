"""``train_router(cfg)``: train the price-conditioned ``learned_router`` with PPO on batched sampling episodes,
resumably, and export it.

One run learns a policy for every price of compute in ``prices`` (each episode draws its own, and the router reads
it), so one router serves every budget: ``budget=`` calibrates its price at evaluation. The training curve is kept
per episode (``training_episodes.csv``) and drawn per price bucket (``training_curve.png``): a price-conditioned
router can converge at some prices and not at others, which a curve pooled over prices would hide.

A plain function (the ``@hydra.main`` wrapper lives in ``experiments/train_router.py``) so tests can call it
with a composed, shrunken config.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import stable_baselines3
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.logger import KVWriter, Logger, configure
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecMonitor
from torch import nn

from adasched.analysis.evaluation import load_evaluator
from adasched.analysis.plots import plot_router_curve
from adasched.compute import resolve_device, resolve_precision
from adasched.data.tokenizer import load_tokenizer
from adasched.errors import ConfigError
from adasched.io import atomic_path, write_json_atomic, write_text_atomic
from adasched.jobs.arms import load_members, training_seed_baseline
from adasched.rl.env import EpisodeConfig, ModelScheduleVecEnv, PriceScaledRewards, evaluator_scorer
from adasched.sampling.features import check_feature_names, needed_features, router_input_names
from adasched.sampling.policy import PROBE_ENTROPY
from adasched.sampling.prices import PriceRange, bucket_label, bucket_of
from adasched.sampling.spec import SamplingSpec
from policies import learned

CHECKPOINT_PREFIX = "router"
EPISODES_FILE, CURVE_PLOT = "training_episodes.csv", "training_curve.png"
CURVE_MEASURES = ("episode_return", "path_kl", "excess", "saved_executed")  # what the curve and its convergence follow


def training_state(rewards: PriceScaledRewards) -> dict[str, Any]:
    """What PPO's own checkpoint lacks: the running scales of the returns that rewards are divided by."""
    return {"return_scales": rewards.state()}


class RouterCheckpoint(CheckpointCallback):
    """SB3's periodic checkpoint plus the training state (the return scales), written first so every model has it."""

    def __init__(self, save_freq: int, save_path: Path, rewards: PriceScaledRewards) -> None:
        super().__init__(save_freq, str(save_path), name_prefix=CHECKPOINT_PREFIX)
        self.rewards = rewards

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            Path(self.save_path).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(self._checkpoint_path("state_", "json")), training_state(self.rewards))
        return super()._on_step()


def save_checkpoint(model: PPO, checkpoint_dir: Path, rewards: PriceScaledRewards) -> None:
    """The final state, so a rerun of a finished run resumes at its end instead of its last periodic save."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{CHECKPOINT_PREFIX}_{{}}{model.num_timesteps}_steps"
    write_json_atomic(checkpoint_dir / f"{stem.format('state_')}.json", training_state(rewards))
    model.save(checkpoint_dir / f"{stem.format('')}.zip")


def latest_checkpoint(checkpoint_dir: Path, resume: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint (model, training state) to continue from; a fresh start never overwrites a run."""
    steps = [int(m.group(1)) for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}_*_steps.zip") if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}_(\d+)_steps\.zip", p.name))]
    if not steps:
        return None
    if not resume:
        raise ConfigError(f"{checkpoint_dir} already holds a run; pass resume=true to continue it or another run_dir to start anew")
    step = max(steps)
    state = json.loads((checkpoint_dir / f"{CHECKPOINT_PREFIX}_state_{step}_steps.json").read_text(encoding="utf-8"))
    return checkpoint_dir / f"{CHECKPOINT_PREFIX}_{step}_steps.zip", state


class TrainingEpisodes(BaseCallback):
    """One row per finished episode: when it ended (timesteps, wall clock), its price, return, path KL, excess,
    executed saving and each member's share of its decisions.

    Written to ``path`` at every rollout's end (rewritten atomically, so a resumed run continues the same file),
    and per price bucket to SB3's logger (CSV, and W&B when on).
    """

    def __init__(self, path: Path, timesteps: int, buckets: list[tuple[float, float]]) -> None:
        """Continues the episodes of a run resumed at ``timesteps`` (rows written after that checkpoint are redone)."""
        super().__init__()
        self.path, self.buckets = path, buckets
        self.rows: list[dict[str, float]] = []
        if path.exists():
            with path.open(newline="", encoding="utf-8") as handle:
                self.rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle) if float(row["timesteps"]) <= timesteps]
        self.wall_s = self.rows[-1]["wall_s"] if self.rows else 0.0
        self.new: list[dict[str, float]] = []

    def _on_training_start(self) -> None:
        self.clock = time.perf_counter() - self.wall_s

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "saved_executed" in info:
                summary = {key: value for key, value in info.items() if key not in ("terminal_observation", "episode", "executed_flops", "all_heavy_flops")}
                wall = round(time.perf_counter() - self.clock, 1)
                self.new.append({"timesteps": float(self.num_timesteps), "wall_s": wall, "episode_return": float(info["episode"]["r"]), **summary})
        return True

    def _on_rollout_end(self) -> None:
        if not self.new:
            return
        for index, bucket in enumerate(self.buckets):
            episodes = [row for row in self.new if bucket_of(row["price"], self.buckets) == index]
            for key in CURVE_MEASURES:
                if episodes and key in episodes[0]:
                    self.logger.record(f"router/{bucket_label(bucket)}/{key}", float(np.mean([row[key] for row in episodes])))
        self.rows += self.new
        self.new = []
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buffer.getvalue())


def convergence(rows: list[dict[str, float]], buckets: list[tuple[float, float]], last_fraction: float = 0.2) -> dict[str, Any]:
    """How flat the curve ended, per price bucket: each measure's mean over the episodes of the last ``last_fraction``
    of timesteps, its change from the window before (as long), and that change's 95% interval from the episodes'
    spread in the two windows. A measure is flat when its change lies within the interval."""
    if not rows:
        return {}
    end = rows[-1]["timesteps"]
    summary: dict[str, Any] = {"last_fraction": last_fraction}
    for index, bucket in enumerate(buckets):
        mine = [row for row in rows if bucket_of(row["price"], buckets) == index]
        last = [r for r in mine if r["timesteps"] > end * (1 - last_fraction)]
        before = [r for r in mine if end * (1 - 2 * last_fraction) < r["timesteps"] <= end * (1 - last_fraction)]
        result: dict[str, Any] = {"prices": list(bucket), "episodes_last": len(last)}
        for key in CURVE_MEASURES:
            if not last or key not in last[0]:
                continue
            now, then = np.array([r[key] for r in last]), np.array([r[key] for r in before])
            result[key] = {"last": round(float(now.mean()), 4), "change": None, "change_ci95": None, "flat": None}
            if len(now) >= 2 and len(then) >= 2:
                change = float(now.mean() - then.mean())
                ci95 = 1.96 * float(np.sqrt(now.var(ddof=1) / len(now) + then.var(ddof=1) / len(then)))
                result[key] |= {"change": round(change, 4), "change_ci95": round(ci95, 4), "flat": abs(change) <= ci95}
        summary[bucket_label(bucket)] = result
    return summary


class WandbWriter(KVWriter):
    """Forwards SB3's logged values to a W&B run."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        numbers = {k: float(v) for k, v in key_values.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    """CSV always (curves without wandb); W&B unless ``logger.mode=disabled``, which never imports wandb."""
    logger = configure(str(run_dir / "metrics"), ["csv"])
    if cfg.logger.mode != "disabled":
        import wandb

        run = wandb.init(
            project=cfg.logger.project, group=cfg.logger.group, name=cfg.logger.name, mode=cfg.logger.mode,
            dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
        )
        logger.output_formats.append(WandbWriter(run))
    return logger


def command_line() -> str:
    """The command that reproduces this run (its Hydra overrides, when run through Hydra)."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["python experiments/train_router.py", *overrides])


def actor_network(model: PPO) -> learned.RouterNetwork:
    """The PPO policy's actor (what acts deterministically) as a plain ``RouterNetwork`` with the same weights."""
    policy = model.policy
    if policy.activation_fn is not nn.Tanh or not policy.share_features_extractor:
        raise ConfigError("the router export copies a tanh MlpPolicy with a shared flatten extractor; keep PPO's defaults")
    hidden = [layer.out_features for layer in policy.mlp_extractor.policy_net if isinstance(layer, nn.Linear)]
    network = learned.RouterNetwork(policy.observation_space.shape[0], hidden, int(policy.action_space.n))
    network.body.load_state_dict(policy.mlp_extractor.policy_net.state_dict())
    network.head.load_state_dict(policy.action_net.state_dict())
    return network.eval()


def export_router(model: PPO, export_dir: Path, info: dict[str, Any], episodes: Path, buckets: list[tuple[float, float]]) -> Path:
    """Write the router (``policies.learned``'s safetensors and JSON) and the training episodes with their figure,
    as one folder, atomically."""
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(export_dir) as partial:
        learned.save(actor_network(model), partial, info)
        if episodes.exists():
            shutil.copyfile(episodes, partial / EPISODES_FILE)
            plot_router_curve(episodes, partial / CURVE_PLOT, "learned_router: training per price bucket", buckets, info["family"]["members"])
    return export_dir


def probe_member(cfg: DictConfig, extras: list[str]) -> int | None:
    """The member whose probe forward the probe features read (``env.probe_model``), checked; None without them."""
    if PROBE_ENTROPY not in needed_features(extras):
        return None
    members = list(cfg.family.members)
    if not 0 < cfg.env.probe_model < len(members):
        raise ConfigError(f"env.probe_model={cfg.env.probe_model} is invalid; it must index a member other than the heavy, in [1, {len(members) - 1}]")
    return int(cfg.env.probe_model)


def train_router(cfg: DictConfig) -> dict[str, Any]:
    """Train PPO on priced episodes; returns the JSON written next to the exported router."""
    torch.set_num_threads(cfg.torch_threads)
    members = list(cfg.family.members)
    prices = PriceRange(cfg.prices.low, cfg.prices.high, cfg.prices.scale)
    extras = list(cfg.env.extra_features)
    check_feature_names(extras, len(members))
    probe = probe_member(cfg, extras)
    baseline = training_seed_baseline(cfg.env, "env.", cfg.family.dir)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.sampling.precision, device)
    print(f"sampling precision: {precision}")
    models, seed_baseline = load_members(cfg.family.dir, members, baseline, precision, device)
    score = None
    if cfg.env.quality_weight:  # the evaluator term is optional: path KL is the quality reward
        evaluator, evaluator_tokenizer = load_evaluator(cfg.eval.ppl_model, device, cfg.eval.tokenizer_path)
        score = evaluator_scorer(evaluator, evaluator_tokenizer, load_tokenizer(cfg.family.tokenizer), cfg.eval.batch_size, device)

    run_dir = Path(cfg.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    latest = latest_checkpoint(checkpoint_dir, cfg.resume)
    spec = SamplingSpec(cfg.sampling.num_steps, cfg.sampling.seq_len, cfg.env.num_envs, cfg.sampling.top_p)
    episodes = EpisodeConfig(models, spec, prices, seed_baseline, score, cfg.env.quality_weight, tuple(extras), probe, cfg.env.increment, cfg.env.expected_positions)
    env = ModelScheduleVecEnv(episodes, cfg.env.num_envs, seed=cfg.seed)
    # Rewards are divided by the running scale of the returns at their price: unscaled, a return of the price x
    # up to ~seq_len heavy forwards saved makes the value loss so large that PPO's gradient clipping leaves the
    # policy's gradient ~0.
    venv = PriceScaledRewards(VecMonitor(env), cfg.env.reward_buckets, cfg.ppo.gamma)
    if latest:
        venv.load_state(latest[1]["return_scales"])
        print(f"resuming from {latest[0]}")
        model = PPO.load(latest[0], env=venv, device="cpu")
    else:
        ppo = OmegaConf.to_container(cfg.ppo, resolve=True)
        net_arch, _ = ppo.pop("net_arch"), ppo.pop("total_timesteps")
        # SB3 anneals over the run's total timesteps, a resumed run's included
        ppo["learning_rate"] = LinearSchedule(ppo["learning_rate"], ppo.pop("learning_rate_end"), end_fraction=1.0)
        model = PPO("MlpPolicy", venv, policy_kwargs={"net_arch": net_arch}, seed=cfg.seed, device="cpu", **ppo)
    model.set_logger(make_logger(cfg, run_dir))
    buckets = prices.buckets(cfg.curve_buckets)
    curve = TrainingEpisodes(run_dir / EPISODES_FILE, model.num_timesteps, buckets)
    callbacks = [RouterCheckpoint(max(1, cfg.checkpoint_every_n_timesteps // cfg.env.num_envs), checkpoint_dir, venv), curve]
    remaining = cfg.ppo.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callbacks, progress_bar=cfg.progress_bar, reset_num_timesteps=False)
        save_checkpoint(model, checkpoint_dir, venv)
    model.logger.close()

    info = {
        "features": router_input_names(len(models), extras, priced=True),
        "extra_features": extras,
        "probe_model": probe,
        "num_models": len(models),
        "family": {"name": cfg.family.name, "members": members},
        "member_flops": [float(m.flops_per_forward(spec.seq_len, spec.seq_len)) for m in models],
        "prices": prices.as_dict(),  # learned_router refuses a price outside it
        "objective": cfg.env.objective,
        "increment": cfg.env.increment,
        "expected_positions": cfg.env.expected_positions,
        "seed_baseline": baseline,  # the floor it was trained against: runs refuse to judge it with the same one
        "training_episodes": EPISODES_FILE,
        "convergence": convergence(curve.rows, buckets),
        "train_wall_seconds": curve.rows[-1]["wall_s"] if curve.rows else None,
        "precision": precision,
        "num_steps": cfg.sampling.num_steps,
        "seq_len": cfg.sampling.seq_len,
        "timesteps": model.num_timesteps,
        "num_envs": cfg.env.num_envs,
        "quality_weight": cfg.env.quality_weight,
        "seed": cfg.seed,
        "command": command_line(),
        "trained_on": f"{platform.machine()} {device}",
        "torch": torch.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    export_router(model, Path(cfg.export_dir), info, run_dir / EPISODES_FILE, buckets)
    print(f"exported learned_router to {cfg.export_dir}: {model.num_timesteps} timesteps, prices [{prices.low:g}, {prices.high:g}]")
    for label, result in info["convergence"].items():
        if isinstance(result, dict):
            flat = {key: result[key]["flat"] for key in CURVE_MEASURES if key in result}
            verdict = "too few episodes to tell" if None in flat.values() else ", ".join(f"{key} {'flat' if v else 'moving'}" for key, v in flat.items())
            print(f"  {label}: {verdict}")
    return info
