"""Every scalar option of an entry point's config checked before any work, so a typo costs a second, not a run
(``budget=abc`` used to fail deep in calibration, and ``calibration.seed=x`` to sample on).

A key's kind (bool, int, float, str) comes from its default: the config composed with the same config groups
but without the user's value overrides. ``OPTIONS`` adds ranges and choices and says what a key whose default
is null holds; null is accepted where the default is null or the row says so. A value still interpolated
(``${family.seq_len}``) is checked where it comes from. Checks that relate keys to each other stay with the jobs.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from adasched.compute import AUTO, PRECISIONS
from adasched.errors import ConfigError
from adasched.models.export import DTYPES

LOGGER_MODES = ("disabled", "offline", "online")

IS_KIND: dict[type, Callable[[Any], bool]] = {  # bool is an int to Python, never to a config
    bool: lambda value: isinstance(value, bool),
    int: lambda value: isinstance(value, int) and not isinstance(value, bool),
    float: lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    str: lambda value: isinstance(value, (str, int, float)) and not isinstance(value, bool),  # Hydra reads name=2024 as an int
    dict: lambda value: isinstance(value, DictConfig),
}


def anything(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class Spec:
    """What one option holds: a value of ``kind`` that passes ``test`` (null too where ``nullable``), ``allowed`` in words."""

    kind: type
    allowed: str
    test: Callable[[Any], bool] = anything
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        return IS_KIND[self.kind](value) and self.test(value)


def within(bounds: str) -> Callable[[float], bool]:
    """The test for ``'>= 0'``, ``'> 0'`` or an interval such as ``'(0, 1]'``."""
    if bounds[0] in "([":
        low, high = (float(end) for end in bounds[1:-1].split(","))
        above = operator.gt if bounds[0] == "(" else operator.ge
        below = operator.lt if bounds[-1] == ")" else operator.le
        return lambda value: above(value, low) and below(value, high)
    comparison, low = bounds.split()
    compare, limit = {">": operator.gt, ">=": operator.ge}[comparison], float(low)
    return lambda value: compare(value, limit)


def in_words(bounds: str) -> str:
    return f"in {bounds}" if bounds[0] in "([" else bounds


def integer(bounds: str, nullable: bool = False) -> Spec:
    return Spec(int, f"an integer {in_words(bounds)}", within(bounds), nullable)


def number(bounds: str | None = None) -> Spec:
    return Spec(float, f"a number {in_words(bounds)}" if bounds else "a number", within(bounds) if bounds else anything)


def choice(*names: str) -> Spec:
    return Spec(str, f"one of: {', '.join(names)}", lambda value: value in names)


TEXT = Spec(str, "a string")
DEVICE = Spec(str, "one of: auto, cpu, cuda, cuda:N", lambda value: re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value)) is not None)
KIND_SPECS = {bool: Spec(bool, "true or false"), int: Spec(int, "an integer"), float: number(), str: TEXT}

# Each row's patterns (space-separated) name a key or the end of one: "seed" is seed, calibration.seed and fit.seed.
# The first row that names a key holds; a key no row names has its default's kind.
OPTIONS: list[tuple[str, Spec]] = [
    ("device", DEVICE),
    ("precision", choice(AUTO, *PRECISIONS)),
    ("dtype", choice(AUTO, *DTYPES)),
    ("parallel.accelerator", choice("auto", "cpu", "cuda", "gpu")),
    ("logger.mode", choice(*LOGGER_MODES)),
    ("budget", number("(0, 1)")),
    ("top_p", number("(0, 1]")),
    ("validation_fraction", number("(0, 1)")),
    ("gamma gae_lambda", number("[0, 1]")),
    ("tolerance learning_rate fit.lr router.lr max_price prices.scale", number("> 0")),
    ("quality_weight learning_rate_end ent_coef", number(">= 0")),
    ("threshold", number()),  # kl_router's default is null: the threshold its fit suggests
    ("price prices.low prices.high", number()),  # negative under the excess objective (ranges are checked where they are built)
    ("steps_timed threads expected_positions", integer(">= 1", nullable=True)),  # null: every step to the end; torch's own thread count; every masked position
    (
        "num_samples batch_size num_steps seq_len num_trajectories record_every repeats torch_threads "
        "devices num_nodes num_shards num_envs total_timesteps n_steps n_epochs checkpoint_every_n_timesteps curve_buckets reward_buckets "
        "fit.hidden fit.depth fit.steps router.hidden router.steps d_model n_heads vocab_size validation_size top_k eval_samples",
        integer(">= 1"),
    ),
    ("seed record_seed shard_index prefix_len slice_start warmup_steps num_workers mask_token_id heavy light letters.* router.depth", integer(">= 0")),
    ("tokenizer_path validation_split experiment.reference", Spec(str, "a string", nullable=True)),
    ("seed_baseline", Spec(str, "the name of a model folder of the family", nullable=True)),  # null: no floor under path KL
    ("objective", choice("raw", "excess")),  # what a router learns: path KL, or its excess over a seed baseline
    ("increment", choice("expected", "revealed")),  # a router's step reward: in expectation over the reveal draw, or at it
    ("run_dir save_dir", TEXT),  # Hydra's output folder: known only inside a run
    ("experiment.segment_search", Spec(dict, "a mapping {num_segments, light_segments, light}", nullable=True)),
]


def spec_for(key: str, default: Any) -> Spec | None:
    """The first row of ``OPTIONS`` naming ``key``, else the spec of its default's kind; None for a null default without a row."""
    for patterns, spec in OPTIONS:
        if any(fnmatchcase(key, pattern) or fnmatchcase(key, f"*.{pattern}") for pattern in patterns.split()):
            return spec
    if default is None:
        return None
    return next(spec for kind, spec in KIND_SPECS.items() if isinstance(default, kind))  # bool before int: True is an int


def option_keys(config: DictConfig, prefix: str = "") -> Iterator[str]:
    """The dotted key of every option holding one value: leaves outside lists, an interpolation counting as one."""
    for name in config:
        if OmegaConf.is_interpolation(config, name):
            yield f"{prefix}{name}"
        elif not OmegaConf.is_missing(config, name):  # '???': the job asks for it
            value = config[name]
            if isinstance(value, DictConfig):
                yield from option_keys(value, f"{prefix}{name}.")
            elif not isinstance(value, ListConfig):
                yield f"{prefix}{name}"


def default_of(defaults: DictConfig, key: str) -> Any:
    """``key``'s default, resolved; None where it resolves only inside a Hydra run (``${hydra:runtime.output_dir}``)."""
    return OmegaConf.select(defaults, key, throw_on_resolution_failure=False)


NOT_SET = object()


def own_value(cfg: DictConfig, key: str) -> Any:
    """What ``cfg`` sets ``key`` to, or NOT_SET where it sets nothing of its own (interpolated, absent, '???')."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    # parent.keys(): `name in parent` would resolve the value, and resolving is most of the check's time
    if not isinstance(parent, DictConfig) or name not in parent.keys() or OmegaConf.is_interpolation(parent, name) or OmegaConf.is_missing(parent, name):
        return NOT_SET
    return parent[name]


def check_options(cfg: DictConfig, defaults: DictConfig) -> None:
    """A ConfigError naming the first scalar option of ``cfg`` its spec rejects; ``defaults``: the same config
    composed without the user's value overrides (the same config groups)."""
    for key in option_keys(defaults):
        value = own_value(cfg, key)
        if value is NOT_SET:
            continue
        default = default_of(defaults, key)
        spec = None if isinstance(default, (DictConfig, ListConfig)) else spec_for(key, default)  # an interpolated mapping: size.shipped_b4.family
        if spec is None:
            continue  # tests/test_options.py fails for a scalar option without a spec
        nullable = spec.nullable or default is None
        if not (spec.accepts(value) or value is None and nullable):
            shown = "null" if value is None else repr(value)
            raise ConfigError(f"{key}={shown} is invalid; it must be {spec.allowed}{' or null' if nullable else ''}")
