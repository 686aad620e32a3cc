"""``train_router(cfg)``: train the ``learned_router`` with PPO on batched sampling episodes, resumably, and export it.

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
from stable_baselines3.common.vec_env import VecMonitor, VecNormalize
from torch import nn

from adasched.analysis.evaluation import load_evaluator
from adasched.analysis.plots import plot_router_curve
from adasched.data.tokenizer import load_tokenizer
from adasched.errors import ConfigError
from adasched.io import atomic_path, write_json_atomic, write_text_atomic
from adasched.compute import resolve_device, resolve_precision
from adasched.jobs.arms import load_members, training_seed_baseline
from adasched.rl.env import (
    EpisodeConfig,
    LagrangeMultiplier,
    ModelScheduleVecEnv,
    evaluator_scorer,
)
from adasched.sampling.features import feature_names
from adasched.sampling.spec import SamplingSpec
from policies import learned

CHECKPOINT_PREFIX = "router"


def training_state(multiplier: LagrangeMultiplier, rewards: VecNormalize) -> dict[str, Any]:
    """What PPO's own checkpoint lacks: lambda (its integral term and step count) and the running scale of the returns that rewards are divided by."""
    scale = rewards.ret_rms
    return {
        "lambda": multiplier.value, "lambda_updates": multiplier.updates, "lambda_integral": multiplier.integral,
        "return_scale": {"mean": float(scale.mean), "var": float(scale.var), "count": float(scale.count)},
    }


def restore_return_scale(rewards: VecNormalize, state: dict[str, Any]) -> None:
    """Continue a run with the return scale it had (a checkpoint without one starts a fresh scale)."""
    if "return_scale" in state:
        scale = rewards.ret_rms
        scale.mean, scale.var, scale.count = (np.float64(state["return_scale"][key]) for key in ("mean", "var", "count"))


class RouterCheckpoint(CheckpointCallback):
    """SB3's periodic checkpoint plus the training state (lambda, return scale), written first so every model has it."""

    def __init__(self, save_freq: int, save_path: Path, multiplier: LagrangeMultiplier, rewards: VecNormalize) -> None:
        super().__init__(save_freq, str(save_path), name_prefix=CHECKPOINT_PREFIX)
        self.multiplier, self.rewards = multiplier, rewards

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            Path(self.save_path).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(self._checkpoint_path("lambda_", "json")), training_state(self.multiplier, self.rewards))
        return super()._on_step()


def save_checkpoint(model: PPO, checkpoint_dir: Path, multiplier: LagrangeMultiplier, rewards: VecNormalize) -> None:
    """The final state, so a rerun of a finished run resumes at its end instead of its last periodic save."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{CHECKPOINT_PREFIX}_{{}}{model.num_timesteps}_steps"
    write_json_atomic(checkpoint_dir / f"{stem.format('lambda_')}.json", training_state(multiplier, rewards))
    model.save(checkpoint_dir / f"{stem.format('')}.zip")


def latest_checkpoint(checkpoint_dir: Path, resume: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint (model, training state) to continue from; a fresh start never overwrites a run."""
    steps = [int(m.group(1)) for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}_*_steps.zip") if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}_(\d+)_steps\.zip", p.name))]
    if not steps:
        return None
    if not resume:
        raise ConfigError(f"{checkpoint_dir} already holds a run; pass resume=true to continue it or another run_dir to start anew")
    step = max(steps)
    state = json.loads((checkpoint_dir / f"{CHECKPOINT_PREFIX}_lambda_{step}_steps.json").read_text(encoding="utf-8"))
    return checkpoint_dir / f"{CHECKPOINT_PREFIX}_{step}_steps.zip", state


CURVE_FILE, CURVE_PLOT = "training_curve.csv", "training_curve.png"
CURVE_COLUMNS = ("timesteps", "wall_s", "episodes", "episode_return", "path_kl", "saved_executed", "lambda")


class TrainingCurve(BaseCallback):
    """One row per PPO rollout: mean return, path KL and executed saving of the episodes it finished, and lambda.

    Written to ``path`` (rewritten atomically, so a resumed run continues the same curve) and to SB3's logger
    (CSV, and W&B when on).
    """

    def __init__(self, path: Path, multiplier: LagrangeMultiplier, timesteps: int) -> None:
        """Continues the curve of a run resumed at ``timesteps`` (rows written after that checkpoint are redone)."""
        super().__init__()
        self.path, self.multiplier = path, multiplier
        self.rows: list[dict[str, float]] = []
        if path.exists():
            with path.open(newline="", encoding="utf-8") as handle:
                self.rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle) if float(row["timesteps"]) <= timesteps]
        self.wall_s = self.rows[-1]["wall_s"] if self.rows else 0.0
        self.episodes: list[dict[str, float]] = []

    def _on_training_start(self) -> None:
        self.clock = time.perf_counter()

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "saved_executed" in info:
                self.episodes.append({"return": info["episode"]["r"] if "episode" in info else float("nan"), **info})
        return True

    def _on_rollout_end(self) -> None:
        if not self.episodes:
            return
        row = {
            "timesteps": float(self.num_timesteps), "wall_s": round(self.wall_s + time.perf_counter() - self.clock, 1),
            "episodes": float(len(self.episodes)), "episode_return": float(np.mean([e["return"] for e in self.episodes])),
            "path_kl": float(np.mean([e["path_kl"] for e in self.episodes])),
            "saved_executed": float(np.mean([e["saved_executed"] for e in self.episodes])), "lambda": self.multiplier.value,
        }
        self.rows.append(row)
        self.episodes = []
        for key in CURVE_COLUMNS[2:]:
            self.logger.record(f"router/{key}", row[key])
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buffer.getvalue())


def convergence(rows: list[dict[str, float]], last_fraction: float = 0.2) -> dict[str, Any]:
    """How flat the curve ended: each measure's mean over the last ``last_fraction`` of timesteps, its change from
    the window before (as long), and that change's 95% interval from the rollouts' spread in the two windows.
    A measure is flat when its change lies within the interval (a strict test: neighbouring rollouts are
    correlated, so the spread understates the noise); a flat run's saving also sits at the budget."""
    if not rows:
        return {}
    end = rows[-1]["timesteps"]
    last = [r for r in rows if r["timesteps"] > end * (1 - last_fraction)]
    before = [r for r in rows if end * (1 - 2 * last_fraction) < r["timesteps"] <= end * (1 - last_fraction)]
    summary: dict[str, Any] = {"last_fraction": last_fraction, "rollouts_last": len(last)}
    for key in ("episode_return", "path_kl", "saved_executed", "lambda"):
        now, then = np.array([r[key] for r in last]), np.array([r[key] for r in before])
        summary[f"{key}_last"] = round(float(now.mean()), 4)
        summary[f"{key}_change"] = summary[f"{key}_change_ci95"] = summary[f"{key}_flat"] = None
        if len(now) >= 2 and len(then) >= 2:
            change = float(now.mean() - then.mean())
            ci95 = 1.96 * float(np.sqrt(now.var(ddof=1) / len(now) + then.var(ddof=1) / len(then)))
            summary |= {f"{key}_change": round(change, 4), f"{key}_change_ci95": round(ci95, 4), f"{key}_flat": abs(change) <= ci95}
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


def export_router(model: PPO, export_dir: Path, info: dict[str, Any], curve: Path) -> Path:
    """Write the router (``policies.learned``'s safetensors and JSON) and the training curve with its figure,
    as one folder, atomically."""
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(export_dir) as partial:
        learned.save(actor_network(model), partial, info)
        if curve.exists():
            shutil.copyfile(curve, partial / CURVE_FILE)
            plot_router_curve(curve, partial / CURVE_PLOT, f"learned_router, budget {info['budget']}", info["budget"])
    return export_dir


def train_router(cfg: DictConfig) -> dict[str, Any]:
    """Train PPO against the budget's Lagrangian; returns the JSON written next to the exported router."""
    torch.set_num_threads(cfg.torch_threads)
    baseline = training_seed_baseline(cfg.env, "env.", cfg.family.dir)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.sampling.precision, device)
    print(f"sampling precision: {precision}")
    members = list(cfg.family.members)
    models, seed_baseline = load_members(cfg.family.dir, members, baseline, precision, device)
    score = None
    if cfg.env.quality_weight:  # the evaluator term is optional: path KL is the quality reward
        evaluator, evaluator_tokenizer = load_evaluator(cfg.eval.ppl_model, device, cfg.eval.tokenizer_path)
        score = evaluator_scorer(evaluator, evaluator_tokenizer, load_tokenizer(cfg.family.tokenizer), cfg.eval.batch_size, device)

    run_dir = Path(cfg.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    latest = latest_checkpoint(checkpoint_dir, cfg.resume)
    state = latest[1] if latest else {"lambda": cfg.env.lambda_init}
    multiplier = LagrangeMultiplier(
        state["lambda"], cfg.env.lambda_lr, cfg.budget, cfg.env.lambda_lr_decay, cfg.env.lambda_kp, state.get("lambda_updates", 0), state.get("lambda_integral")
    )
    spec = SamplingSpec(cfg.sampling.num_steps, cfg.sampling.seq_len, cfg.env.num_envs, cfg.sampling.top_p)
    episodes = EpisodeConfig(models, spec, cfg.budget, multiplier, score, cfg.env.quality_weight, cfg.env.budget_penalty, seed_baseline)
    env = ModelScheduleVecEnv(episodes, cfg.env.num_envs, seed=cfg.seed)
    # Rewards are divided by the running scale of the returns: unscaled, a return of -lambda x ~seq_len heavy
    # forwards makes the value loss so large that PPO's gradient clipping leaves the policy's gradient ~0.
    venv = VecNormalize(VecMonitor(env), norm_obs=False, norm_reward=True, gamma=cfg.ppo.gamma)
    if latest:
        restore_return_scale(venv, latest[1])
        print(f"resuming from {latest[0]} (lambda {multiplier.value:.4f})")
        model = PPO.load(latest[0], env=venv, device="cpu")
    else:
        ppo = OmegaConf.to_container(cfg.ppo, resolve=True)
        net_arch, _ = ppo.pop("net_arch"), ppo.pop("total_timesteps")
        # SB3 anneals over the run's total timesteps, a resumed run's included
        ppo["learning_rate"] = LinearSchedule(ppo["learning_rate"], ppo.pop("learning_rate_end"), end_fraction=1.0)
        model = PPO("MlpPolicy", venv, policy_kwargs={"net_arch": net_arch}, seed=cfg.seed, device="cpu", **ppo)
    model.set_logger(make_logger(cfg, run_dir))
    curve = TrainingCurve(run_dir / CURVE_FILE, multiplier, model.num_timesteps)
    callbacks = [RouterCheckpoint(max(1, cfg.checkpoint_every_n_timesteps // cfg.env.num_envs), checkpoint_dir, multiplier, venv), curve]
    remaining = cfg.ppo.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callbacks, progress_bar=cfg.progress_bar, reset_num_timesteps=False)
        save_checkpoint(model, checkpoint_dir, multiplier, venv)
    model.logger.close()

    info = {
        "features": feature_names(len(models)),
        "num_models": len(models),
        "family": {"name": cfg.family.name, "members": members},
        "budget": cfg.budget,
        "objective": cfg.env.objective,
        "seed_baseline": baseline,  # the floor it was trained against: runs refuse to judge it with the same one
        "lambda": multiplier.value,
        "training_curve": CURVE_FILE,
        "convergence": convergence(curve.rows),
        "train_wall_seconds": curve.rows[-1]["wall_s"] if curve.rows else None,
        "precision": precision,
        "num_steps": cfg.sampling.num_steps,
        "seq_len": cfg.sampling.seq_len,
        "timesteps": model.num_timesteps,
        "num_envs": cfg.env.num_envs,
        "quality_weight": cfg.env.quality_weight,
        "budget_penalty": cfg.env.budget_penalty,
        "seed": cfg.seed,
        "command": command_line(),
        "trained_on": f"{platform.machine()} {device}",
        "torch": torch.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    export_router(model, Path(cfg.export_dir), info, run_dir / CURVE_FILE)
    print(f"exported learned_router to {cfg.export_dir}: {model.num_timesteps} timesteps, lambda {multiplier.value:.4f}")
    flat = {key: info["convergence"].get(f"{key}_flat") for key in ("episode_return", "path_kl", "saved_executed", "lambda")}
    if None in flat.values():
        print("too few rollouts to tell whether the curves are flat")
    else:
        print("flat over the last fifth (change within its 95% interval): " + ", ".join(f"{key} {'yes' if v else 'no'}" for key, v in flat.items()))
    return info
