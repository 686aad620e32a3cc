"""A router learned with PPO (``experiments/train_router.py``): one small MLP decides every row's model per step.

The router's inputs are defined here, once: ``RouterFeatures`` turns successive ``DenoiseState``s into the
observations the training environment (``adasched.env``) shows the agent, so a trained router sees at
sampling time exactly what it saw in training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adasched.errors import ConfigError
from policies.base import ENTROPY, DenoiseState, Policy, check_budget, register_policy

ROUTER_FILE = "router.zip"  # the SB3 PPO model
INFO_FILE = "router.json"  # features, budget, lambda, sampling settings and training metadata
TRAIN_COMMAND = "python experiments/train_router.py budget=0.25"


def feature_names(num_models: int) -> list[str]:
    """The observation's columns, in order (also written next to an exported router)."""
    return [
        "t",  # noise level of the step, 1 -> 0
        "mask_fraction",  # generated positions still masked
        "mask_fraction_change",  # drop of mask_fraction since the previous step
        "log1p_reveal_count",  # log(1 + positions revealing now)
        "saved_so_far",  # FLOPs saved vs all-heavy by the row's forwards so far, at full-forward prices
        "budget",  # the target saving the router was trained for
        *(f"last_action_{m}" for m in range(num_models)),  # one-hot model of the row's last forward
        "last_entropy",  # mean predictive entropy of the row's last forward (0 before any)
    ]


class RouterFeatures:
    """Per-row observations from successive ``DenoiseState``s: the one place the router's inputs are defined.

    Call ``observe`` once per step and ``record`` with the step's action. ``saved_so_far`` prices each forward
    at ``state.model_flops`` (full projection), since a policy sees no finer cost split; the environment's
    reward and budget use the exact executed FLOPs.
    """

    def __init__(self, batch_size: int, num_models: int, budget: float) -> None:
        self.num_models, self.budget = num_models, budget
        self.previous_mask = torch.ones(batch_size, dtype=torch.float64)
        self.spent = torch.zeros(batch_size, dtype=torch.float64)
        self.all_heavy = torch.zeros(batch_size, dtype=torch.float64)

    def observe(self, state: DenoiseState) -> np.ndarray:
        """(B, F) float32 observation of ``state``; advances the mask-fraction memory."""
        mask = state.mask_fraction.detach().double().cpu()
        change, self.previous_mask = self.previous_mask - mask, mask
        saved = torch.where(self.all_heavy > 0, 1 - self.spent / self.all_heavy.clamp_min(1e-30), 0.0)
        last = state.last_action.cpu()
        one_hot = (last[:, None] == torch.arange(self.num_models)).double()
        columns = [
            torch.full_like(mask, state.t), mask, change, state.reveal_count.cpu().double().log1p(), saved,
            torch.full_like(mask, self.budget), one_hot, torch.nan_to_num(state.last_entropy.cpu().double(), nan=0.0),
        ]
        return torch.column_stack(columns).numpy().astype(np.float32)

    def record(self, state: DenoiseState, action: torch.Tensor) -> None:
        """Charge the step's forwards: only rows that reveal run a model."""
        ran = state.reveal_count.cpu() > 0
        prices = torch.tensor(state.model_flops, dtype=torch.float64)
        self.spent += torch.where(ran, prices[action.cpu()], 0.0)
        self.all_heavy += torch.where(ran, prices[0], 0.0)


def load_router_info(folder: Path) -> dict[str, Any]:
    """The exported router's JSON; a missing export names the command that makes it."""
    if not (folder / ROUTER_FILE).is_file() or not (folder / INFO_FILE).is_file():
        raise ConfigError(f"no trained router in {folder} ({ROUTER_FILE}, {INFO_FILE}); make one with: {TRAIN_COMMAND} export_dir={folder}")
    return json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))


@register_policy("learned_router")
class LearnedRouter(Policy):
    """Acts deterministically with an exported PPO router, per row and step: the most likely model after
    adding ``light_bias`` to the log-odds of every model but the heavy one.

    ``light_bias`` is the calibration knob: a router trained for one budget (through the Lagrangian) is
    moved to another, or held to its own on new seeds, the same way every other policy is, while keeping the
    router's ranking of states. The observation's ``budget`` column stays the one the router was trained for.
    """

    features = frozenset({ENTROPY})
    knob_range = (-20.0, 20.0)

    def __init__(self, path: str, light_bias: float = 0.0, budget: float | None = None) -> None:
        from stable_baselines3 import PPO  # here, not at module level: importing policies stays light

        if budget is not None:
            check_budget(budget)
        folder = Path(path)
        self.info = load_router_info(folder)
        self.router = PPO.load(folder / ROUTER_FILE, device="cpu")
        self.light_bias, self.budget = light_bias, budget

    def set_knob(self, value: float) -> None:
        self.light_bias = value

    def reset(self, batch_size: int, num_steps: int, num_models: int, seed: int = 0) -> None:
        super().reset(batch_size, num_steps, num_models, seed)
        if num_models != self.info["num_models"]:
            raise ConfigError(f"the learned router chooses among {self.info['num_models']} models but the family has {num_models}")
        self.inputs = RouterFeatures(batch_size, num_models, self.info["budget"])

    def act(self, state: DenoiseState) -> torch.Tensor:
        observation, _ = self.router.policy.obs_to_tensor(self.inputs.observe(state))
        with torch.no_grad():
            logits = self.router.policy.get_distribution(observation).distribution.logits.double().cpu()
        logits[:, 1:] += self.light_bias
        action = logits.argmax(dim=1)
        self.inputs.record(state, action)
        return action
