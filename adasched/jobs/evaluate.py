"""``evaluate(cfg)``: score a shipped family on the held-out split with the noise used in training validation.

Every denoiser sees the same corrupted validation blocks, so the NELBO gaps between members are paired.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from adasched.analysis.evaluation import load_evaluator
from adasched.analysis.plots import plot_learning_curves
from adasched.data.tokenizer import load_or_train_tokenizer
from adasched.io import write_json_atomic
from adasched.models.export import read_metadata
from adasched.models.family import load_family
from adasched.training.family_checks import MemberScore, describe_checks, family_checks
from adasched.training.learning_curve import CURVE_FILE, read_curve
from adasched.training.module import (
    CausalLMObjective,
    MaskedDiffusionObjective,
    evaluate,
)


def plot_family_curves(family_dir: Path, members: list[str], path: Path) -> Path | None:
    """Every member's shipped learning curve on one figure (members trained before curves were kept are left out)."""
    curves = {name: read_curve(family_dir / name / CURVE_FILE) for name in members if (family_dir / name / CURVE_FILE).is_file()}
    if not curves:
        return None
    return plot_learning_curves(curves, path, f"{family_dir.name}: validation loss of every member")


def evaluate_family(cfg: DictConfig) -> list[dict[str, Any]]:
    """One row per member: validation loss (nats and bits per token), its perplexity bound, training facts;
    whether the seeds agree and the loss falls with depth; and ``learning_curves.png``, all members' curves."""
    family_dir = Path(cfg.family_dir)
    tokenizer = load_or_train_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path, cfg.tokenizer.vocab_size, None)
    datamodule = instantiate(cfg.data.module, corpus=instantiate(cfg.data.corpus), tokenizer=tokenizer)
    datamodule.setup()
    loader = datamodule.val_dataloader()
    members: dict[str, tuple[torch.nn.Module, Any]] = {}
    denoisers = load_family({name: family_dir / name for name in cfg.denoisers})
    members |= {name: (model, MaskedDiffusionObjective()) for name, model in denoisers.items()}
    if cfg.evaluator:
        evaluator, _ = load_evaluator(str(family_dir / cfg.evaluator), "cpu", tokenizer_path=cfg.tokenizer.path)
        members[cfg.evaluator] = (evaluator, CausalLMObjective())

    rows = []
    for name, (model, objective) in members.items():
        nats = evaluate(model, objective, loader)
        metadata = read_metadata(family_dir / name)
        rows.append(
            {
                "member": name,
                "metric": objective.metric,
                "nats_per_token": round(nats, 4),
                "bits_per_token": round(nats / math.log(2), 4),
                "perplexity_bound": round(math.exp(nats), 2),
                "parameters": sum(p.numel() for p in model.parameters()),
                "n_blocks": metadata.get("n_blocks"),
                "seed": metadata.get("seed"),
                "train_steps": metadata.get("steps"),
                "tokens_seen": metadata.get("tokens_seen"),
            }
        )
        print(f"  {name:<14} val {objective.metric:<5} {nats:7.4f} nats/token  (perplexity <= {math.exp(nats):8.2f})")
    scores = [
        MemberScore(row["member"], denoisers[row["member"]].config.n_blocks, row["seed"], row["nats_per_token"])
        for row in rows
        if row["member"] in denoisers
    ]
    checks = family_checks(scores)
    for line in describe_checks(checks):
        print(line)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "results.json", {"family": str(family_dir), "members": rows, "checks": checks})
    if plot_family_curves(family_dir, list(members), run_dir / "learning_curves.png"):
        print(f"learning curves: {run_dir / 'learning_curves.png'}")
    return rows
