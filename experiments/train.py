"""Train a member of a model family:  python experiments/train.py model=heavy data=shakespeare trainer.max_steps=5000"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from adasched.cli import preflight, user_errors_exit
from adasched.jobs.train import train

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        train(cfg)


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
