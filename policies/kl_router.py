"""The supervised KL router: heavy where a small MLP predicts the light model would depart from it.

The MLP maps a row's router features (``adasched.sampling.features``, those in ``INPUTS``) to log1p of the
path-KL increment the light model would add at the row's step (KL(light || heavy) summed over the positions
revealing then), fitted by MSE on all-heavy rollouts (``experiments/fit_kl_router.py``); log1p tames the
KL's heavy tail without hiding zeros. A row runs the heavy model where the predicted increment exceeds
``threshold``, else the light one: the myopic version of the learned router's goal (least path KL for the
FLOPs). The threshold is the calibration knob: raising it sends more rows to the light model, so the saving
never drops.

Path KL charges for being another network, not only a worse one, so the raw increment also steers the router
away from steps where any other good network (a heavy from another seed) departs from the heavy. The
``excess`` objective fits the light model's increment minus a seed baseline's at the same step and positions
instead: signed, so its squash is log1p mirrored for negative values. A router fitted against one seed
baseline is judged with another (``adasched.jobs.arms``), never with its own training signal.

The same regressor and policy serve a router fitted on other features, named in its ``router.json`` (columns of
``router_features`` or ``adasched.sampling.features.EXTRA_FEATURES``; the policy then has the sampler compute what
they need, a probe of its light model included), and to another target: the ``oracle`` objective fits, by logistic
loss, the logit that the analysis oracle keeps the heavy at a row's step (``experiments/oracle_features.py``), so
the same rule, heavy where the prediction exceeds the threshold, follows the oracle's choices.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adasched.errors import ConfigError
from adasched.io import atomic_path, write_json_atomic
from adasched.models.dit import MDLMDenoiser
from adasched.sampling.features import (
    check_feature_names,
    named_features,
    needed_features,
    select_features,
)
from adasched.sampling.policy import (
    ENTROPY,
    PROBE_ENTROPY,
    DenoiseState,
    Policy,
    check_budget,
    check_model_index,
    register_policy,
)
from adasched.sampling.spec import SamplingSpec

WEIGHTS, METADATA = "router.safetensors", "router.json"
# The state features the router reads: those all-heavy rollouts show as they will be at sampling time. The
# previous model and the FLOPs saved so far are left out: under all-heavy they never vary.
INPUTS = ["t", "mask_fraction", "mask_fraction_drop", "log1p_reveal_count", "last_entropy", "has_entropy"]
FIT_COMMAND = "python experiments/fit_kl_router.py"


def signed_log1p(values: torch.Tensor) -> torch.Tensor:
    """log1p of the magnitude, the sign kept: raw's squash for positive targets, mirrored for negative ones."""
    return values.sign() * values.abs().log1p()


def signed_expm1(values: torch.Tensor) -> torch.Tensor:
    return values.sign() * values.abs().expm1()


def unchanged(values: torch.Tensor) -> torch.Tensor:
    return values


@dataclass(frozen=True)
class Objective:
    """What the router predicts and how its fit squashes the targets, compares them with the network's output
    (``criterion``, reported as ``metric``) and reads predictions back."""

    target: str  # in words, for the fit's report
    loss: str  # recorded in the fit metadata
    squash: Callable[[torch.Tensor], torch.Tensor]
    unsquash: Callable[[torch.Tensor], torch.Tensor]
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.mse_loss
    metric: str = "mse"  # the criterion's name in the fit metadata: train_<metric>, validation_<metric>


OBJECTIVES = {
    "raw": Objective("log1p(KL)", "mse_log1p_kl", torch.log1p, lambda predicted: torch.expm1(predicted).clamp(min=0.0)),  # a KL is never negative
    "excess": Objective("signed log1p(KL - floor)", "mse_signed_log1p_excess_kl", signed_log1p, signed_expm1),
    # targets 1 where the oracle kept the heavy, 0 where it left it; predictions are logits
    "oracle": Objective("logit P(oracle keeps the heavy)", "bce_oracle_keeps_heavy", unchanged, unchanged, nn.functional.binary_cross_entropy_with_logits, "bce"),
}


class KLRegressor(nn.Module):
    """Normalized features -> the objective's squashed increment; the normalization is part of the saved model."""

    def __init__(self, num_features: int, hidden: int, depth: int, objective: str = "raw") -> None:
        super().__init__()
        self.objective = objective
        layers: list[nn.Module] = []
        width = num_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)

    def predict_kl(self, features: torch.Tensor) -> torch.Tensor:
        """The predicted increment (nats): the KL, non-negative, for raw; the excess over the floor, signed, for excess
        (for oracle the logit that the oracle keeps the heavy)."""
        with torch.no_grad():
            return OBJECTIVES[self.objective].unsquash(self(features))


Examples = tuple[torch.Tensor, torch.Tensor]  # (N, len(INPUTS)) features and (N,) targets in nats (KL, or its excess)


def examples(features: torch.Tensor, kl: torch.Tensor, num_models: int) -> Examples:
    """Fitting examples from rows' ``router_features`` (all columns) and their targets."""
    return select_features(features, num_models, INPUTS), kl


def fit(
    train: Examples, validation: Examples | None = None, objective: str = "raw", hidden: int = 32, depth: int = 2, steps: int = 400,
    lr: float = 3e-3, seed: int = 0,
) -> tuple[KLRegressor, dict[str, Any]]:
    """Full-batch Adam on the objective's criterion (MSE of its squashed targets, or logistic loss); seeded, so the
    same examples give the same router. ``depth=0`` is a linear model: a logistic regression for ``oracle``.

    Returns the model and its fit metadata: losses, sizes, the smallest, largest and lower-quartile predicted
    increment on the training examples (the knob's range and the default threshold).
    """
    chosen = OBJECTIVES[objective]
    features, target = train[0].float(), chosen.squash(train[1]).float()
    with torch.random.fork_rng(devices=[]):  # nn.Linear's init draws from the global generator: leave it as it was
        torch.manual_seed(seed)
        model = KLRegressor(features.shape[1], hidden, depth, objective)
    model.mean.copy_(features.mean(0))
    model.std.copy_(features.std(0).clamp(min=1e-6))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    initial = fit_loss(model, train)
    for _ in range(steps):
        loss = chosen.criterion(model(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    predicted = model.predict_kl(features)
    metric = chosen.metric
    metadata: dict[str, Any] = {
        "loss": chosen.loss, "hidden": hidden, "depth": depth, "steps": steps, "lr": lr, "fit_seed": seed, "train_records": len(target),
        f"train_{metric}_initial": initial, f"train_{metric}": fit_loss(model, train),
        "min_predicted_kl": float(predicted.min()), "max_predicted_kl": float(predicted.max()), "suggested_threshold": float(predicted.quantile(0.25)),
    }
    if validation is not None:
        variance = chosen.squash(validation[1]).var(unbiased=False).item()  # the MSE of predicting its mean
        metadata |= {"validation_records": len(validation[1]), f"validation_{metric}": fit_loss(model, validation), "validation_variance": variance}
    return model, metadata


def fit_loss(model: KLRegressor, examples: Examples) -> float:
    """The objective's criterion on ``examples``: MSE of the squashed target (log1p(KL) for raw), or logistic loss."""
    objective = OBJECTIVES[model.objective]
    with torch.no_grad():
        return objective.criterion(model(examples[0].float()), objective.squash(examples[1]).float()).item()


def save(
    model: KLRegressor, directory: str | Path, num_models: int, metadata: dict[str, Any], seed_baseline: str | None = None,
    inputs: Sequence[str] = tuple(INPUTS),
) -> None:
    """Weights as safetensors; the features it reads (``inputs``, by name), architecture, objective, the seed baseline
    it was fitted against (None for raw) and fit metadata as JSON beside them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS) as partial:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial)
    hidden = model.net[0].out_features
    depth = (len(model.net) - 1) // 2
    info = {"num_models": num_models, "feature_names": list(inputs), "architecture": {"hidden": hidden, "depth": depth},
            "normalization": {"mean": model.mean.tolist(), "std": model.std.tolist()}, "objective": model.objective,
            "seed_baseline": seed_baseline, "fit": metadata}
    write_json_atomic(directory / METADATA, info)


def load(directory: str | Path) -> tuple[KLRegressor, dict[str, Any]]:
    """A router saved by ``save`` (one saved before objectives existed is raw); a missing folder or one fitted on
    features this code does not know is a one-line ConfigError."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / METADATA).is_file():
        raise ConfigError(f"no fitted KL router at {directory}; create it with: {FIT_COMMAND} out_dir={directory} (objective=excess: to the excess over a seed baseline)")
    info = json.loads((directory / METADATA).read_text(encoding="utf-8"))
    if "num_models" not in info:
        raise ConfigError(f"the KL router at {directory} was fitted on other features; refit it with: {FIT_COMMAND}")
    try:
        check_feature_names(info["feature_names"], info["num_models"])
    except ConfigError as error:
        raise ConfigError(f"the KL router at {directory} was fitted on other features ({error}); refit it with: {FIT_COMMAND}") from None
    model = KLRegressor(len(info["feature_names"]), **info["architecture"], objective=info.get("objective", "raw"))
    model.load_state_dict(load_file(directory / WEIGHTS))
    return model.eval(), info


@register_policy("kl_router")
class KLRouter(Policy):
    """Per row and step: heavy where the predicted path-KL increment of the light model (raw, or its excess over
    the floor) > ``threshold`` nats (oracle: the logit that the oracle keeps the heavy), else light.

    ``threshold=None`` takes the router's suggested one (light on about a quarter of the training steps).
    With a ``budget`` the threshold is calibrated up to the largest predicted increment seen in training, from 0
    (raw) or from the smallest predicted excess, which may be negative (oracle: between the extreme logits).
    """

    def __init__(self, path: str, threshold: float | None = None, light: int = 1, heavy: int = 0, budget: float | None = None) -> None:
        if budget is not None:
            check_budget(budget)
        self.model, self.info = load(path)
        self.inputs = list(self.info["feature_names"])
        # the sampler reads these from the instance: they depend on the features the router was fitted on
        self.features = frozenset({ENTROPY}) | needed_features(self.inputs)
        self.probe_model = light if PROBE_ENTROPY in self.features else None
        fitted = self.info["fit"]
        self.threshold = fitted["suggested_threshold"] if threshold is None else float(threshold)
        self.light, self.heavy, self.budget = light, heavy, budget
        lowest = 0.0 if self.model.objective == "raw" else float(fitted["min_predicted_kl"])
        self.knob_range = (lowest, float(fitted["max_predicted_kl"]))
        self.trained_against = self.info.get("seed_baseline")  # routers fitted before objectives existed are raw

    def set_knob(self, value: float) -> None:
        self.threshold = value

    def initial_knob(self, budget: float, models: Sequence[MDLMDenoiser], spec: SamplingSpec) -> float:
        """The configured threshold, by default the router's suggestion (light on about a quarter of its
        training steps): what a threshold saves depends on the models, so the first try measures it."""
        return self.threshold

    def reset(self, num_steps: int, num_models: int) -> None:
        super().reset(num_steps, num_models)
        check_model_index(self, max(self.light, self.heavy), num_models)
        if num_models < self.info["num_models"]:
            raise ConfigError(f"the KL router was fitted on a family of {self.info['num_models']} models but this one has {num_models}")

    def act(self, state: DenoiseState) -> torch.Tensor:
        predicted = self.model.predict_kl(named_features(state, self.num_models, self.inputs))
        return torch.where(predicted > self.threshold, self.heavy, self.light).to(torch.int64).to(state.step.device)
