"""What every Hydra entry point shares: config-group checks and one-line errors for fixable mistakes."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from adasched.errors import ConfigError, DataUnavailableError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


def check_group_choices(config_dir: Path, overrides: Sequence[str]) -> None:
    """Reject ``group=value`` overrides naming no config file, listing the options, before Hydra starts.

    Hydra's own message for this spans many lines; a user who typed a wrong name needs one.
    """
    for override in overrides:
        if "=" not in override or override.startswith(("+", "~", "hydra.", "hydra/")):  # hydra/ groups come from plugins too
            continue
        group, value = override.split("=", 1)
        group_dir = config_dir / group
        if not group_dir.is_dir():
            continue
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        for choice in value.split(","):  # multirun sweeps: a,b,c
            if choice not in options:
                raise ConfigError(f"unknown {group} {choice!r}; choose one of: {', '.join(options)}")


def run_defaults() -> DictConfig:
    """This Hydra run's config composed with its config-group choices but none of its value overrides: the
    defaults ``adasched.options.check_options`` takes each option's kind from."""
    hydra_config = HydraConfig.get()
    overrides = OverridesParser.create().parse_overrides(list(hydra_config.overrides.task))
    groups = [override.input_line for override in overrides if override.get_key_element().lstrip("+~") in hydra_config.runtime.choices]
    return compose(hydra_config.job.config_name, overrides=groups)


USER_ERRORS = (ConfigError, DataUnavailableError)


def user_error_in(error: BaseException | None) -> BaseException | None:
    """The ConfigError / DataUnavailableError behind ``error``, also when wrapped (Hydra's ``instantiate`` wraps)."""
    while error is not None and not isinstance(error, USER_ERRORS):
        error = error.__cause__
    return error


HYDRA_ONLY = {".hydra", "run.log"}  # what Hydra itself writes into a run folder


def remove_empty_run_dir() -> None:
    """Remove this Hydra run's folder if it holds nothing the job wrote: a run refused for a bad value leaves none."""
    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    if folder.is_dir() and {entry.name for entry in folder.iterdir()} <= HYDRA_ONLY:
        shutil.rmtree(folder)


@contextmanager
def user_errors_exit() -> Iterator[None]:
    """Turn a ConfigError / DataUnavailableError into ``error: <message>`` on its own stderr line and exit status 2."""
    try:
        yield
    except Exception as error:
        cause = user_error_in(error)
        if cause is None:
            raise
        remove_empty_run_dir()
        sys.stdout.flush()
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def preflight(config_dir: Path) -> None:
    """Run before ``@hydra.main``: check group choices in ``sys.argv``."""
    with user_errors_exit():
        check_group_choices(config_dir, sys.argv[1:])
