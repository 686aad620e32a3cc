"""What the oracle knows that routers don't:  python experiments/oracle_features.py

Records the analysis oracle's decisions with the router features and candidate features, scores how well each
predicts its choices, fits a router on the best ones and evaluates it beside the oracle and the sandwich
(``adasched/jobs/oracle_features.py``).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from adasched.cli import preflight, run_defaults, user_errors_exit
from adasched.jobs.oracle_features import oracle_features
from adasched.options import check_options

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="oracle_features", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        check_options(cfg, run_defaults())  # first: a wrong value fails on one line before any model loads
        oracle_features(cfg)


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
