"""One experiment's table and figures on one page:  python experiments/dashboard.py sweep_dir=runs/sweep/shakespeare/placement

Writes dashboard.md and its figures into <sweep_dir>/dashboard; with logger.mode=online also a W&B report.
"""

import shlex
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from adasched.analysis.dashboard import dashboard
from adasched.cli import preflight, user_errors_exit

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="dashboard", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        dashboard(cfg, shlex.join(["python", "experiments/dashboard.py", *HydraConfig.get().overrides.task]))


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
