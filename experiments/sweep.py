"""Compare policies on common seeds, resumably:  python experiments/sweep.py experiment=budget_comparison"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from adasched.cli import preflight, run_defaults, user_errors_exit
from adasched.jobs.sweep import sweep
from adasched.options import check_options

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="sweep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        check_options(cfg, run_defaults())  # first: a wrong value fails on one line before any model loads
        sweep(cfg)


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
