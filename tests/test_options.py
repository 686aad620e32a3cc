"""Every scalar option of the entry points is checked before any work: a wrong value is one line naming it.

The table test covers an option added to a yaml later without an edit here; it fails for an option whose
default is null until ``adasched.options.OPTIONS`` says what it holds.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from adasched.errors import ConfigError
from adasched.options import check_options, default_of, option_keys, spec_for
from tests.helpers import CONFIG_DIR, ROOT, compose_config

ENTRY_POINTS = ("run", "sweep", "train_router", "fit_kl_router", "benchmark", "oracle_features")
WRONG = {bool: "maybe", int: 2.5, float: "abc", str: True, dict: "abc"}  # a value of another kind, by the spec's kind


def group_choices(name: str) -> Iterator[list[str]]:
    """The entry point's config as shipped, then with each option of each of its config groups in turn."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        choices = compose(config_name=name, return_hydra_config=True).hydra.runtime.choices
    yield []
    for group in choices:
        if "/" not in group and "@" not in group:  # Hydra's own groups; policies an experiment places under its arms
            yield from ([f"{group}={path.stem}"] for path in sorted((CONFIG_DIR / group).glob("*.yaml")))


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_scalar_option_rejects_a_value_of_another_kind_by_name(name: str) -> None:
    problems, tried = [], set()
    for groups in group_choices(name):
        defaults = compose_config(name, groups)
        check_options(defaults, defaults)  # the shipped defaults pass
        for key in option_keys(defaults):
            default = default_of(defaults, key)
            if key in tried or isinstance(default, (DictConfig, ListConfig)):  # an interpolated mapping is no scalar
                continue
            tried.add(key)
            spec = spec_for(key, default)
            if spec is None:
                problems.append(f"{key} (with {groups}) has a null default and no row in adasched.options.OPTIONS: add one saying what it holds")
                continue
            cfg, wrong = copy.deepcopy(defaults), WRONG[spec.kind]
            OmegaConf.update(cfg, key, wrong)
            try:
                check_options(cfg, defaults)
                problems.append(f"{key}={wrong!r} passed")
            except ConfigError as error:
                if not str(error).startswith(f"{key}={wrong!r} is invalid; it must be ") or "\n" in str(error):
                    problems.append(f"{key}: {error}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("run", ["budget=1.5"], "budget=1.5 is invalid; it must be a number in (0, 1) or null"),
        ("train_router", ["prices.high=null"], "prices.high=null is invalid; it must be a number"),
        ("run", ["seed=true"], "seed=True is invalid; it must be an integer >= 0"),
        ("run", ["sampling.top_p=0"], "sampling.top_p=0 is invalid; it must be a number in (0, 1]"),
        ("run", ["device=cuda:x"], "device='cuda:x' is invalid; it must be one of: auto, cpu, cuda, cuda:N"),
        ("train_router", ["prices.scale=-1"], "prices.scale=-1 is invalid; it must be a number > 0"),
        ("benchmark", ["size.paper.steps_timed=0"], "size.paper.steps_timed=0 is invalid; it must be an integer >= 1 or null"),
        ("sweep", ["experiment.segment_search=3"], "experiment.segment_search=3 is invalid; it must be a mapping"),
    ],
)
def test_ranges_choices_and_null_are_checked(name: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_options(compose_config(name, overrides), compose_config(name, []))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("name", "groups", "overrides"),
    [
        ("run", [], ["budget=0.2", "calibration.tolerance=1", "device=cuda:1", "sampling.precision=bf16", "run_name=2024", "eval.tokenizer_path=null"]),
        ("run", ["policy=kl_router"], ["budget=null", "policy.threshold=0.5", "sampling.precision=float32"]),
        ("sweep", ["experiment=exhaustive"], ["experiment.segment_search.light_segments=3", "experiment.reference=null"]),
        ("benchmark", [], ["size.paper.steps_timed=null", "threads=2", "precisions=[auto,bf16]", "dtype=float16"]),
    ],
)
def test_values_of_the_right_kind_pass(name: str, groups: list[str], overrides: list[str]) -> None:
    check_options(compose_config(name, groups + overrides), compose_config(name, groups))


def cli(script: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "experiments" / script), *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("run.py", "budget=abc", "budget='abc' is invalid; it must be a number in (0, 1) or null"),
        ("run.py", "calibration.seed=x", "calibration.seed='x' is invalid; it must be an integer >= 0"),
        ("run.py", "sampling.batch_size=two", "sampling.batch_size='two' is invalid; it must be an integer >= 1"),
        ("run.py", "eval.path_kl=maybe", "eval.path_kl='maybe' is invalid; it must be true or false"),
        ("sweep.py", "experiment.num_shards=two", "experiment.num_shards='two' is invalid; it must be an integer >= 1"),
        ("train_router.py", "env.num_envs=2.5", "env.num_envs=2.5 is invalid; it must be an integer >= 1"),
        ("fit_kl_router.py", "validation_fraction=1.5", "validation_fraction=1.5 is invalid; it must be a number in (0, 1)"),
        ("benchmark.py", "size.paper.steps_timed=abc", "size.paper.steps_timed='abc' is invalid; it must be an integer >= 1 or null"),
    ],
)
def test_entry_points_refuse_a_wrong_value_on_one_line_before_any_work(script: str, override: str, message: str, tmp_path: Path) -> None:
    result = cli(script, tmp_path / "run", override)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {message}"] and "Traceback" not in result.stderr
    assert result.stdout == ""  # nothing sampled, loaded or timed
    assert not (tmp_path / "run").exists()
