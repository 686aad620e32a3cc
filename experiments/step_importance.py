"""Step importance (paper sec. 4.1, Fig. 5-6):  python experiments/step_importance.py light_models=[light]"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from adasched.cli import preflight, user_errors_exit
from adasched.jobs.step_importance import step_importance

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="step_importance", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        step_importance(cfg)


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
