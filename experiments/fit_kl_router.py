"""Fit the supervised KL router on all-heavy rollouts:  python experiments/fit_kl_router.py

Records the light model's path-KL increments along all-heavy trajectories, fits the router on most of them,
reports its error on the rest and saves it where ``policy=kl_router`` reads it (``adasched/jobs/fit_kl_router.py``).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from adasched.cli import preflight, run_defaults, user_errors_exit
from adasched.jobs.fit_kl_router import fit_kl_router
from adasched.options import check_options

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="fit_kl_router", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        check_options(cfg, run_defaults())  # first: a wrong value fails on one line before any model loads
        fit_kl_router(cfg)


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
