"""Train a PPO router that picks heavy or light per step:  python experiments/train_router.py budget=0.25"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from adasched.cli import preflight, run_defaults, user_errors_exit
from adasched.jobs.train_router import train_router
from adasched.options import check_options

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="train_router", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        check_options(cfg, run_defaults())  # first: a wrong value fails on one line before any model loads
        train_router(cfg)


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
