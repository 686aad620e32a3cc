"""A router learned with PPO (``experiments/train_router.py``): one small MLP decides every row's model.

Its inputs are ``adasched.sampling.features.router_inputs`` of the ``DenoiseState``, the same columns the
training environment (``adasched.rl.env``) shows the agent, so a trained router sees at sampling time
exactly what it saw in training. A price-conditioned router (its ``router.json`` records the ``prices`` it was
trained on) also reads the price of compute, which is its knob: ``budget=`` calibrates the price, and a price
outside the trained range is refused. Routers trained for one budget (no ``prices``) are moved by a bias on
the log-odds of the light members instead. The export holds only the PPO policy's actor, as safetensors weights and a
JSON of its architecture and training metadata: loading a router runs no pickled code and needs no RL library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adasched.errors import ConfigError
from adasched.io import atomic_path, write_json_atomic
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.features import needed_features, router_input_names, router_inputs
from adasched.sampling.policy import (
    ENTROPY,
    DenoiseState,
    Policy,
    check_budget,
    register_policy,
)
from adasched.sampling.prices import PriceRange
from adasched.sampling.spec import SamplingSpec

WEIGHTS, METADATA = "router.safetensors", "router.json"
TRAIN_COMMAND = "python experiments/train_router.py"
LIGHT_BIAS_RANGE = (-20.0, 20.0)  # log-odds: beyond it a fixed-price router's choice no longer moves


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
    expected = router_input_names(info.get("num_models", 0), info.get("extra_features", []), "prices" in info)
    if "num_models" not in info or info.get("features") != expected or "architecture" not in info:
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
    """Acts deterministically with an exported PPO router, per row and step: the member with the largest logit.

    A price-conditioned router reads ``price`` (nats per full heavy forward's FLOPs), its calibration knob on the
    asinh scale it was trained on; ``budget=`` finds the price that saves it. A router trained for one budget
    instead adds ``light_bias`` to the log-odds of every member but the heavy one: the knob that moves it to another
    budget, or holds it to its own on new seeds, while keeping its ranking of states.
    """

    features = frozenset({ENTROPY})

    def __init__(self, path: str, light_bias: float = 0.0, budget: float | None = None, price: float | None = None) -> None:
        if budget is not None:
            check_budget(budget)
        self.network, self.info = load(router_for_budget(Path(path), budget))
        self.budget, self.light_bias = budget, light_bias
        self.trained_against = self.info.get("seed_baseline")  # routers trained before objectives existed are raw
        self.trained_members = tuple(self.info["family"]["members"]) if "family" in self.info else None
        self.extras = list(self.info.get("extra_features", []))
        self.features = frozenset({ENTROPY}) | needed_features(self.extras)
        self.probe_model = self.info.get("probe_model")
        self.prices = PriceRange(**self.info["prices"]) if "prices" in self.info else None
        if self.prices is None:
            self.knob_range = LIGHT_BIAS_RANGE
            return
        if light_bias:
            raise ConfigError(f"policy.light_bias={light_bias} is for routers trained at one price; this router reads a price (policy.price) instead")
        self.knob_range = self.prices.codes
        if price is not None:
            self.prices.check(price)
            self.code = self.prices.encode(price)
        elif budget is None:
            raise ConfigError(
                f"the router in {path} reads a price: pass budget=<fraction> to calibrate it, or policy.price=<nats per heavy forward in [{self.prices.low:g}, {self.prices.high:g}]>"
            )
        else:
            self.code = self.code_saving(budget)

    @property
    def price(self) -> float | None:
        """The price the router is charged (nats per full heavy forward); None for a router trained at one price."""
        return None if self.prices is None else self.prices.decode(self.code)

    def set_knob(self, value: float) -> None:
        if self.prices is None:
            self.light_bias = value
        else:
            self.code = value

    def initial_knob(self, budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> float:
        """A fixed-price router: its configured bias (it was trained for the budget nearest this one). A priced one:
        ``code_saving(budget)``."""
        return self.light_bias if self.prices is None else self.code_saving(budget)

    def code_saving(self, budget: float) -> float:
        """The price code at which the router's last training episodes saved ``budget``, interpolated between the
        price buckets' (the middle of the range where the record has too few)."""
        buckets = [value for value in self.info.get("convergence", {}).values() if isinstance(value, dict) and "saved_executed" in value]
        centres = sorted((bucket["saved_executed"]["last"], sum(map(self.prices.encode, bucket["prices"])) / 2) for bucket in buckets)
        if len(centres) < 2:
            return sum(self.knob_range) / 2
        savings, codes = zip(*centres)
        return float(np.interp(budget, savings, codes))

    def describe_knob_end(self, knob: float) -> str:
        if self.prices is None:
            return f"at light bias {knob:g}, an end of [{self.knob_range[0]:g}, {self.knob_range[1]:g}]"
        return f"at price {self.prices.decode(knob):.4g}, an end of the prices it was trained on, [{self.prices.low:g}, {self.prices.high:g}]"

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(num_steps, num_models)
        if num_models < self.info["num_models"]:
            raise ConfigError(f"the learned router chooses among {self.info['num_models']} models but the family has {num_models}")

    def act(self, state: DenoiseState) -> torch.Tensor:
        positions = None if self.prices is None else self.prices.position(torch.full((state.batch_size,), self.code, dtype=torch.float64))
        with torch.no_grad():
            logits = self.network(router_inputs(state, self.info["num_models"], self.extras, positions)).double()
        if self.prices is None:
            logits[:, 1:] += self.light_bias
        return logits.argmax(dim=1).to(state.step.device)
