"""Validation NELBO of every shipped denoiser (and the evaluator's NLL), and whether the family's seeds agree and
its loss falls with depth:  python experiments/evaluate.py"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from adasched.cli import preflight, user_errors_exit
from adasched.jobs.evaluate import evaluate_family

CONFIG_DIR = Path(__file__).parent / "configs"


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        evaluate_family(cfg)


if __name__ == "__main__":
    preflight(CONFIG_DIR)
    main()
