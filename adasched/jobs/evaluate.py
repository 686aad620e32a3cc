"""``evaluate(cfg)``: score a shipped family on the held-out split with the noise used in training validation.

Every denoiser sees the same corrupted validation blocks, so the NELBO gaps between members are paired; the
same holds for the cross-entropy at fixed mask rates, which shows where along the diffusion depth matters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from adasched.analysis.evaluation import load_evaluator
from adasched.analysis.plots import plot_learning_curves, plot_mask_rate_profile
from adasched.data.tokenizer import load_or_train_tokenizer
from adasched.errors import ConfigError
from adasched.io import write_json_atomic, write_text_atomic
from adasched.models.export import read_metadata
from adasched.models.family import load_family
from adasched.training.diffusion import masked_cross_entropy_sum
from adasched.training.family_checks import MemberScore, describe_checks, family_checks
from adasched.training.learning_curve import CURVE_FILE, read_curve
from adasched.training.module import (
    CausalLMObjective,
    MaskedDiffusionObjective,
    evaluate,
    validation_generator,
)


def plot_family_curves(family_dir: Path, members: list[str], path: Path) -> Path | None:
    """Every member's shipped learning curve on one figure (members trained before curves were kept are left out)."""
    curves = {name: read_curve(family_dir / name / CURVE_FILE) for name in members if (family_dir / name / CURVE_FILE).is_file()}
    if not curves:
        return None
    return plot_learning_curves(curves, path, f"{family_dir.name}: validation loss of every member")


def check_mask_rates(rates: object, batches: object) -> None:
    """Refuse, before any model loads, mask rates outside (0, 1] (at t = 0 nothing is masked) and a batch count
    that is not a positive integer."""
    if not isinstance(rates, Sequence) or isinstance(rates, str):
        raise ConfigError(f"mask_rates={rates!r} is invalid; it must be a list of rates in (0, 1], e.g. [0.1,0.5,0.9]")
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
            raise ConfigError(f"mask_rates contains {rate!r}; every mask rate must lie in (0, 1]")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches <= 0:
        raise ConfigError(f"mask_rate_batches={batches!r} is invalid; it must be a positive integer")


@torch.no_grad()
def mask_rate_profile(model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]], rates: list[float], max_batches: int) -> list[float]:
    """Cross-entropy per masked token at each fixed mask rate, over the first ``max_batches`` validation
    batches with each batch's validation noise (so every member sees the same masks)."""
    model.eval()
    profile = []
    for rate in rates:
        total, count = 0.0, 0
        for batch_idx, batch in enumerate(itertools.islice(loader, max_batches)):
            summed, masked = masked_cross_entropy_sum(
                model, batch["input_ids"], batch["attention_mask"], rate, validation_generator(batch_idx, torch.device("cpu"))
            )
            total, count = total + summed, count + masked
        profile.append(total / count if count else math.nan)  # no position masked: nothing measured
    return profile


def report_mask_rate_profile(profiles: dict[str, list[float]], rates: list[float], run_dir: Path) -> None:
    """Print each member's cross-entropy at every mask rate and draw its excess over the first member's."""
    reference = next(iter(profiles))
    print("  cross-entropy (nats/masked token) at mask rate t; in brackets, minus " + reference + "'s")
    print("  " + " " * 14 + "".join(f"{f't={rate:g}':>17}" for rate in rates))
    for name, values in profiles.items():
        cells = "".join(f"{value:8.3f} ({value - ref:+.3f})" for value, ref in zip(values, profiles[reference]))
        print(f"  {name:<14}{cells}")
    excess = {name: [v - r for v, r in zip(values, profiles[reference])] for name, values in profiles.items() if name != reference}
    if excess:
        plot_mask_rate_profile(rates, excess, reference, run_dir / "mask_rate_profile.png")
        print(f"mask-rate profile: {run_dir / 'mask_rate_profile.png'}")


def _millions(count: int | None, digits: int) -> str:
    return "—" if count is None else f"{count / 1e6:.{digits}f}M"


def family_table(rows: Sequence[dict[str, Any]]) -> str:
    """The members as a Markdown table (docs/training.md's family table): size, training, and the loss just measured."""
    lines = [
        "| member | blocks | parameters | steps | tokens seen | CPU wall | validation loss (nats/token) | gained over the last 20% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        wall = "—" if row["train_wall_seconds"] is None else f"{row['train_wall_seconds'] / 60:.0f} min"
        gain = "—" if row["gain_last"] is None else f"{row['gain_last']:.3f}"
        lines.append(
            f"| `{row['member']}` | {row['n_blocks'] or '—'} | {_millions(row['parameters'], 2)} | {row['train_steps'] or '—'} "
            f"| {_millions(row['tokens_seen'], 1)} | {wall} | {row['metric'].upper()} {row['nats_per_token']:.3f} | {gain} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_family(cfg: DictConfig) -> list[dict[str, Any]]:
    """One row per member: validation loss (nats and bits per token), its perplexity bound, training facts;
    whether the seeds agree and the loss falls with depth; each denoiser's cross-entropy at fixed mask rates
    (``mask_rate_profile.png``); ``learning_curves.png``, all members' curves; and ``family_table.md``."""
    family_dir = Path(cfg.family_dir)
    check_mask_rates(cfg.mask_rates, cfg.mask_rate_batches)
    rates = [float(rate) for rate in cfg.mask_rates]
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
                "train_wall_seconds": metadata.get("train_wall_seconds"),
                "gain_last": metadata.get("plateau", {}).get("gain_last"),
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
    if rates:
        profiles = {name: mask_rate_profile(model, loader, rates, cfg.mask_rate_batches) for name, model in denoisers.items()}
        report_mask_rate_profile(profiles, rates, run_dir)
        for row in rows:
            if row["member"] in profiles:
                row["cross_entropy_by_mask_rate"] = {f"{rate:g}": round(value, 4) for rate, value in zip(rates, profiles[row["member"]])}
    write_json_atomic(run_dir / "results.json", {"family": str(family_dir), "members": rows, "checks": checks})
    table = family_table(rows)
    write_text_atomic(run_dir / "family_table.md", table)
    print(table, end="")
    if plot_family_curves(family_dir, list(members), run_dir / "learning_curves.png"):
        print(f"learning curves: {run_dir / 'learning_curves.png'}")
    return rows
