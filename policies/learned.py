"""A router learned with PPO (``experiments/train_router.py``): one small MLP decides every row's model.

Its inputs are ``adasched.sampling.features.router_features`` of the ``DenoiseState``, the same columns the
training environment (``adasched.rl.env``) shows the agent, so a trained router sees at sampling time
exactly what it saw in training. The export holds only the PPO policy's actor, as safetensors weights and a
JSON of its architecture and training metadata: loading a router runs no pickled code and needs no RL library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adasched.errors import ConfigError
from adasched.io import atomic_path, write_json_atomic
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.features import feature_names, router_features
from adasched.sampling.policy import (
    ENTROPY,
    DenoiseState,
    Policy,
    check_budget,
    register_policy,
)
from adasched.sampling.spec import SamplingSpec

WEIGHTS, METADATA = "router.safetensors", "router.json"
TRAIN_COMMAND = "python experiments/train_router.py budget=0.17"


class RouterNetwork(nn.Module):
    """Router features -> one logit per family member: tanh hidden layers and a linear head, the shape of a
    PPO ``MlpPolicy``'s actor, so its weights copy over one for one."""

    def __init__(self, num_features: int, hidden: list[int], num_models: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_models)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(features))


def save(network: RouterNetwork, directory: Path, info: dict[str, Any]) -> None:
    """Weights as safetensors and ``info`` (features, budget, training metadata) plus the architecture as JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS) as partial:
        save_file({k: v.detach().contiguous() for k, v in network.state_dict().items()}, partial)
    hidden = [layer.out_features for layer in network.body if isinstance(layer, nn.Linear)]
    write_json_atomic(directory / METADATA, {**info, "architecture": {"hidden": hidden, "activation": "tanh"}})


def load(directory: Path) -> tuple[RouterNetwork, dict[str, Any]]:
    """A router written by ``save``; a missing one, or one trained on other features, is a one-line ConfigError."""
    if not (directory / WEIGHTS).is_file() or not (directory / METADATA).is_file():
        raise ConfigError(f"no trained router in {directory} ({WEIGHTS}, {METADATA}); make one with: {TRAIN_COMMAND} export_dir={directory}")
    info = json.loads((directory / METADATA).read_text(encoding="utf-8"))
    if "num_models" not in info or info.get("features") != feature_names(info["num_models"]) or "architecture" not in info:
        raise ConfigError(f"the router in {directory} was trained on other features or another format; retrain it with: {TRAIN_COMMAND} export_dir={directory}")
    network = RouterNetwork(len(info["features"]), info["architecture"]["hidden"], info["num_models"])
    network.load_state_dict(load_file(directory / WEIGHTS))
    return network.eval(), info


def router_for_budget(path: Path, budget: float | None) -> Path:
    """``path`` when it holds a router; when it holds one router per budget (subfolders), the one trained for
    the budget nearest ``budget``: a router trained at the target needs the least calibration."""
    if (path / METADATA).is_file() or not path.is_dir():
        return path
    budgets = {float(json.loads((folder / METADATA).read_text(encoding="utf-8"))["budget"]): folder for folder in sorted(path.iterdir()) if (folder / METADATA).is_file()}
    if not budgets:
        return path  # ``load`` names what is missing
    if budget is None:
        if len(budgets) == 1:
            return next(iter(budgets.values()))
        raise ConfigError(f"{path} holds routers trained for budgets {', '.join(f'{b:g}' for b in sorted(budgets))}; pass budget=<fraction> or a path to one of them")
    return budgets[min(budgets, key=lambda trained: abs(trained - budget))]


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
        if budget is not None:
            check_budget(budget)
        self.network, self.info = load(router_for_budget(Path(path), budget))
        self.light_bias, self.budget = light_bias, budget
        self.trained_against = self.info.get("seed_baseline")  # routers trained before objectives existed are raw

    def set_knob(self, value: float) -> None:
        self.light_bias = value

    def initial_knob(self, budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> float:
        """The configured bias, by default none: the router was trained for the budget nearest this one."""
        return self.light_bias

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(num_steps, num_models)
        if num_models != self.info["num_models"]:
            raise ConfigError(f"the learned router chooses among {self.info['num_models']} models but the family has {num_models}")

    def act(self, state: DenoiseState) -> torch.Tensor:
        with torch.no_grad():
            logits = self.network(router_features(state, self.num_models)).double()
        logits[:, 1:] += self.light_bias
        return logits.argmax(dim=1).to(state.step.device)
