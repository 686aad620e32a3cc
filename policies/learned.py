"""A router learned with PPO (``experiments/train_router.py``): one small MLP decides every row's model.

Its inputs are ``adasched.sampling.features.router_features`` of the ``DenoiseState``, the same columns the
training environment (``adasched.rl.env``) shows the agent, so a trained router sees at sampling time
exactly what it saw in training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adasched.errors import ConfigError
from adasched.sampling.features import feature_names, router_features
from adasched.sampling.policy import (
    ENTROPY,
    DenoiseState,
    Policy,
    check_budget,
    register_policy,
)

ROUTER_FILE = "router.zip"  # the SB3 PPO model
INFO_FILE = "router.json"  # features, budget, lambda, sampling settings and training metadata
TRAIN_COMMAND = "python experiments/train_router.py budget=0.25"


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
    router's ranking of states.
    """

    features = frozenset({ENTROPY})
    knob_range = (-20.0, 20.0)

    def __init__(self, path: str, light_bias: float = 0.0, budget: float | None = None) -> None:
        from stable_baselines3 import (
            PPO,  # here, not at module level: importing policies stays light
        )

        if budget is not None:
            check_budget(budget)
        folder = Path(path)
        self.info = load_router_info(folder)
        if self.info.get("features") != feature_names(self.info["num_models"]):
            raise ConfigError(f"the router in {folder} was trained on other features; retrain it with: {TRAIN_COMMAND} export_dir={folder}")
        self.router = PPO.load(folder / ROUTER_FILE, device="cpu")
        self.light_bias, self.budget = light_bias, budget

    def set_knob(self, value: float) -> None:
        self.light_bias = value

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(num_steps, num_models)
        if num_models != self.info["num_models"]:
            raise ConfigError(f"the learned router chooses among {self.info['num_models']} models but the family has {num_models}")

    def act(self, state: DenoiseState) -> torch.Tensor:
        observation, _ = self.router.policy.obs_to_tensor(router_features(state, self.num_models).numpy())
        with torch.no_grad():
            logits = self.router.policy.get_distribution(observation).distribution.logits.double().cpu()
        logits[:, 1:] += self.light_bias
        return logits.argmax(dim=1).to(state.step.device)
