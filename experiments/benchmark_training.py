"""Training tokens/s of the old and new recipe at every member depth:  python experiments/benchmark_training.py"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from adasched.cli import preflight, user_errors_exit
from adasched.jobs.benchmark_training import benchmark_training

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="benchmark_training", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        benchmark_training(cfg)


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
