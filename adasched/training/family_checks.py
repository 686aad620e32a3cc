"""Whether a trained family can carry the paper's comparisons: its seeds agree and its depths differ.

Scheduling measures what a shallower model costs the sampler. That is only measured fairly when a replacement
differs from the heavy because it is shallower, not because it is another under-trained network: a second
heavy seed must lie within a third of the heavy-light gap of the first, and validation loss must fall with
every block added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adasched.errors import ConfigError

SEED_SPREAD_FRACTION = 1 / 3  # of the heavy-light gap


@dataclass(frozen=True)
class MemberScore:
    """One denoiser's validation loss (nats/token) with what sets it apart: depth and seed."""

    name: str
    n_blocks: int
    seed: int | None
    loss: float


def family_checks(scores: Sequence[MemberScore], heavy: str = "heavy", light: str = "light") -> dict[str, Any]:
    """The two checks, with their numbers; a check is ``None`` where the family lacks the members it needs."""
    by_name = {score.name: score for score in scores}
    if heavy not in by_name:
        return {"seeds_agree": None, "falls_with_depth": None}
    reference = by_name[heavy]
    ladder = sorted((s for s in scores if s.seed == reference.seed), key=lambda s: s.n_blocks)
    depths = [s.n_blocks for s in ladder]
    if len(set(depths)) != len(depths):
        raise ConfigError(f"two members share a depth and a seed: {[s.name for s in ladder]}; the depth ladder needs one per depth")
    checks: dict[str, Any] = {
        "depth_ladder": [{"member": s.name, "n_blocks": s.n_blocks, "loss": s.loss} for s in ladder],
        "falls_with_depth": all(a.loss > b.loss for a, b in zip(ladder, ladder[1:])) if len(ladder) > 1 else None,
        "seeds_agree": None,
    }
    replicas = [s for s in scores if s.n_blocks == reference.n_blocks and s.seed != reference.seed]
    if light in by_name and replicas:
        gap = by_name[light].loss - reference.loss
        spread = max(abs(s.loss - reference.loss) for s in replicas)
        checks |= {
            "heavy_light_gap": round(gap, 4),
            "seed_spread": round(spread, 4),
            "seeds_agree": spread <= SEED_SPREAD_FRACTION * gap,
        }
    return checks


def describe_checks(checks: dict[str, Any]) -> list[str]:
    """The checks as lines a person reads after scoring a family."""
    lines = []
    if checks["seeds_agree"] is not None:
        verdict = "yes" if checks["seeds_agree"] else "NO"
        lines.append(
            f"seeds agree: heavy seeds {checks['seed_spread']:.4f} apart, within a third of the heavy-light gap "
            f"({checks['heavy_light_gap']:.4f} / 3 = {checks['heavy_light_gap'] / 3:.4f})? {verdict}"
        )
    if checks["falls_with_depth"] is not None:
        ladder = " > ".join(f"{m['member']} ({m['n_blocks']}) {m['loss']:.4f}" for m in checks["depth_ladder"])
        lines.append(f"loss falls with depth: {ladder}? {'yes' if checks['falls_with_depth'] else 'NO'}")
    return lines
