"""Every policy's Pareto front over a sweep's budgets: quality against the executed FLOPs it saves.

Where a sweep ran its reference arm (the sandwich) at two budgets or more, a table gives per arm and budget its
executed saving, its excess over the seed floor, raw path KL and gen PPL (95% intervals), and the share of the
headroom between the reference and the oracle it captures at that budget: (reference - policy) / (reference -
oracle) of mean excess on the same seeds. A ratio of means has no t interval, so its 95% interval comes from a
paired bootstrap over the seeds, seeded, so the same records always give the same table. Per policy it gives the
iso-quality saving: how much its front saves at the excess the reference has at ``ISO_QUALITY_BUDGET``.

Everything comes from the arms' records alone, so a rerun (from arms.jsonl) and a merge of shards give the same
summary. The oracle is an analysis reference, greedy with hindsight of every member, and is drawn apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from adasched.analysis.comparison import (
    format_table,
    path_kl_cells,
    seed_baseline_of,
    to_csv,
)
from adasched.analysis.plots import GEN_PPL, PATH_KL_MEASURES, save_figure, shown_label
from adasched.errors import ConfigError
from adasched.io import write_text_atomic

ORACLE = "oracle"  # the policy name of the analysis oracle: the other end of the headroom
ISO_QUALITY_BUDGET = 0.17  # the reference's excess at this budget is the quality every front is read at
RESAMPLES, BOOTSTRAP_SEED = 2000, 0
PARETO_COLUMNS = (
    "label", "budget", "saved_executed_%", "path_kl_excess", "path_kl_excess_ci95", "path_kl", "path_kl_ci95", "gen_ppl", "ci95",
    "headroom_captured", "headroom_ci95_low", "headroom_ci95_high",
)
ISO_COLUMN = "iso_quality_saved_executed_%"
ISO_COLUMNS = ("label", "budgets", "saved_executed_%_min", "saved_executed_%_max", ISO_COLUMN)
TABLE_FILE, ISO_FILE, FIGURE_FILE = "pareto.csv", "pareto_iso_quality.csv", "pareto.png"
RAW, EXCESS = PATH_KL_MEASURES  # (axis label, a record's {mean, ci95} or None)


def headroom_captured(
    policy: Sequence[float], reference: Sequence[float], oracle: Sequence[float], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float] | None:
    """(reference - policy) / (reference - oracle) of the means of per-seed values, and the 2.5 and 97.5
    percentiles of that ratio over ``resamples`` resamplings of the seeds, each keeping a seed's three values
    together (the pairing that makes it tight). None where the oracle's mean equals the reference's: no headroom."""
    if not len(policy) == len(reference) == len(oracle) >= 2:
        raise ConfigError(f"headroom needs the same seeds (at least 2) under all three arms, got {len(policy)}, {len(reference)} and {len(oracle)}")
    values = torch.tensor([list(policy), list(reference), list(oracle)], dtype=torch.float64)
    gain, room = values[1] - values[0], values[1] - values[2]
    if room.mean() == 0:
        return None
    draws = torch.randint(len(gain), (resamples, len(gain)), generator=torch.Generator().manual_seed(seed))
    ratios = gain[draws].mean(1) / room[draws].mean(1)
    low, high = torch.nanquantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return (gain.mean() / room.mean()).item(), low, high


def iso_quality_saving(front: Sequence[tuple[float, float]], level: float) -> float | str:
    """The largest saving at which a front of (saving, quality) points, linear between them (lower quality is
    better), is no worse than ``level``; ">max" where even its largest saving is better, "<min" where even its
    smallest is worse: the front does not cross the level within its range."""
    points = sorted(front)
    if points[-1][1] <= level:
        return points[-1][0] if points[-1][1] == level else ">max"
    meeting = [index for index, (_, value) in enumerate(points) if value <= level]
    if not meeting:
        return "<min"
    (saving, value), (next_saving, next_value) = points[meeting[-1]], points[meeting[-1] + 1]  # value <= level < next_value
    return saving + (level - value) / (next_value - value) * (next_saving - saving)


def saving(record: dict[str, Any]) -> float:
    return record["flops"]["saved_executed"]


def at_budget(records: Sequence[dict[str, Any]], budget: float, arm: str | None = None, policy: str | None = None) -> dict[str, Any] | None:
    """The first record at ``budget`` of the named arm (or of any arm of the named policy) with its excess measured."""
    return next(
        (r for r in records if r["budget"] == budget and (arm is None or r["arm"] == arm) and (policy is None or r["policy"] == policy) and EXCESS[1](r)),
        None,
    )


def headroom_cells(record: dict[str, Any], records: Sequence[dict[str, Any]], reference: str) -> dict[str, Any]:
    """A row's headroom captured and its interval; blank without a budget, or where the reference or the oracle
    did not run (or measure its excess against the same seed baseline) at the record's budget."""
    cells: dict[str, Any] = dict.fromkeys(("headroom_captured", "headroom_ci95_low", "headroom_ci95_high"), "")
    if record["budget"] is None or not EXCESS[1](record):
        return cells
    ends = (at_budget(records, record["budget"], arm=reference), at_budget(records, record["budget"], policy=ORACLE))
    if None in ends or any(seed_baseline_of(end) != seed_baseline_of(record) for end in ends):
        return cells
    for end in ends:
        if end["seeds"] != record["seeds"]:
            raise ConfigError(f"arms {record['label']} and {end['label']} were sampled on different seeds; they cannot be paired")
    captured = headroom_captured(*(r["path_kl_excess_per_sample"] for r in (record, *ends)))
    return cells if captured is None else dict(zip(cells, (round(value, 3) + 0.0 for value in captured)))  # + 0.0: no "-0.0"


def front_row(record: dict[str, Any], records: Sequence[dict[str, Any]], reference: str) -> dict[str, Any]:
    path_kl = path_kl_cells(record)
    return {
        "label": record["label"],
        "budget": "" if record["budget"] is None else record["budget"],
        "saved_executed_%": round(100 * saving(record), 2),
        **{column: path_kl[column] for column in ("path_kl_excess", "path_kl_excess_ci95", "path_kl", "path_kl_ci95")},
        "gen_ppl": round(record["gen_ppl"]["mean"], 2),
        "ci95": round(record["gen_ppl"]["ci95"], 2),
        **headroom_cells(record, records, reference),
    }


def iso_quality_rows(records: Sequence[dict[str, Any]], level: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per budgeted arm, its front's range of savings and its iso-quality saving (blank without a level)."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in records if r["budget"] is not None):
        shown = [r for r in records if r["arm"] == arm and r["budget"] is not None and EXCESS[1](r)]
        if level is not None:  # excesses over another floor are not comparable with the level
            shown = [r for r in shown if seed_baseline_of(r) == level["seed_baseline"]]
        if not shown:
            continue
        front = sorted((saving(r), EXCESS[1](r)["mean"]) for r in shown)
        iso = "" if level is None else iso_quality_saving(front, level["path_kl_excess"])
        rows.append({
            "label": arm, "budgets": len(front), "saved_executed_%_min": round(100 * front[0][0], 2), "saved_executed_%_max": round(100 * front[-1][0], 2),
            ISO_COLUMN: iso if isinstance(iso, str) else round(100 * iso, 2),
        })
    return rows


def pareto_summary(records: Sequence[dict[str, Any]], reference: str | None) -> dict[str, Any] | None:
    """The JSON summary: the quality level, a row per record and the iso-quality rows; None unless the reference
    ran at two budgets or more (a single point is no front to read a level off)."""
    if reference is None or len({r["budget"] for r in records if r["arm"] == reference and r["budget"] is not None}) < 2:
        return None
    level_record = at_budget(records, ISO_QUALITY_BUDGET, arm=reference)
    level = None if level_record is None else {
        "label": level_record["label"], "path_kl_excess": EXCESS[1](level_record)["mean"], "seed_baseline": seed_baseline_of(level_record),
    }
    return {
        "reference": reference, "oracle_policy": ORACLE, "level": level,
        "rows": [front_row(record, records, reference) for record in records], "iso_quality": iso_quality_rows(records, level),
    }


def plot_pareto(records: Sequence[dict[str, Any]], level: dict[str, Any] | None, path: Path) -> Path:
    """Against the executed saving, one line per arm over its budgets (an arm without a budget is one point), with
    95% intervals: its excess over the seed floor, its raw path KL and its gen PPL, a panel each (path KL is mostly
    floor: on one axis it would flatten the excess). The oracle is black stars; a dotted line marks the level the
    iso-quality savings are read at."""
    arms = list(dict.fromkeys(r["arm"] for r in records))
    palette = plt.get_cmap("tab20" if len(arms) > 10 else "tab10")
    measures = (EXCESS, RAW, GEN_PPL)
    figure, axes = plt.subplots(1, len(measures), figsize=(6 * len(measures), 4.5))
    for index, arm in enumerate(arms):
        group = sorted((r for r in records if r["arm"] == arm), key=saving)
        style = {"color": "black", "marker": "*", "markersize": 10, "linewidth": 2.0} if group[0]["policy"] == ORACLE else {"color": palette(index), "marker": "o", "markersize": 4, "linewidth": 1.2}
        for axis, (_, value) in zip(axes, measures):
            shown = [r for r in group if value(r) is not None]
            if shown:
                axis.errorbar(
                    [100 * saving(r) for r in shown], [value(r)["mean"] for r in shown], yerr=[value(r)["ci95"] for r in shown],
                    linestyle="-" if len(shown) > 1 else "none", capsize=3, label=shown_label(group[0], arm), **style,
                )
    if level is not None:
        line = axes[0].axhline(level["path_kl_excess"], color="gray", linestyle=":", linewidth=1, label=f"{level['label']}: the iso-quality level")
        axes[0].legend(handles=[line], fontsize=8)
    for axis, (label, _) in zip(axes, measures):
        axis.set_xlabel("executed FLOPs saved against all-heavy, %")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(6, len(labels)), fontsize=8, frameon=False)
    figure.tight_layout()
    return save_figure(figure, path)


def write_pareto(folder: Path, records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The summary's two tables as CSVs, printed, and its figure, beside the sweep's own table."""
    write_text_atomic(folder / TABLE_FILE, to_csv(summary["rows"], PARETO_COLUMNS))
    write_text_atomic(folder / ISO_FILE, to_csv(summary["iso_quality"], ISO_COLUMNS))
    plot_pareto(records, summary["level"], folder / FIGURE_FILE)
    level = summary["level"]
    print(f"\nPareto fronts: headroom captured = ({summary['reference']} - arm) / ({summary['reference']} - {ORACLE}) of excess at the same budget")
    print(format_table(summary["rows"], PARETO_COLUMNS))
    print("\niso-quality: the executed saving at which each front reaches " + (
        f"{level['label']}'s excess, {level['path_kl_excess']:.4f} nats/sequence" if level else f"the reference's excess at {ISO_QUALITY_BUDGET:g} (not measured: blank)"
    ))
    print(format_table(summary["iso_quality"], ISO_COLUMNS))
    print(f"\nwrote {folder / TABLE_FILE}, {ISO_FILE} and {FIGURE_FILE}")
