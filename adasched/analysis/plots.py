"""Figures written next to results: the schedule a policy chose, and quality vs compute across runs."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap

from adasched.io import atomic_path
from adasched.sampling.prices import bucket_of

MODEL_COLORS = ["#1f4e79", "#d62728", "#ff9896", "#2ca02c", "#9467bd"]


def save_figure(figure: plt.Figure, path: Path) -> Path:
    """Write the figure atomically and close it."""
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


NO_FORWARD_COLOR = "#f2f2f2"  # steps at which a sample revealed nothing: no model ran


def plot_schedule(actions: torch.Tensor, names: Sequence[str], title: str, path: Path, max_rows: int = 32) -> Path:
    """Model per step (x: step, from t = 1 on the left) for up to ``max_rows`` samples (y); -1 (no reveal) is blank."""
    shown = actions[:, :max_rows].T.numpy()
    figure, axis = plt.subplots(figsize=(10, 1.2 + 0.12 * shown.shape[0]))
    colors = ListedColormap([NO_FORWARD_COLOR, *MODEL_COLORS[: len(names)]])
    axis.imshow(shown, aspect="auto", interpolation="nearest", cmap=colors, vmin=-1.5, vmax=len(names) - 0.5)
    axis.set_xlabel("step (t = 1 -> 0)")
    axis.set_ylabel("sample")
    axis.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in [*MODEL_COLORS[: len(names)], NO_FORWARD_COLOR]]
    labels = [*names, "no reveal"]
    axis.legend(handles, labels, loc="upper right", bbox_to_anchor=(1.0, 1.35), ncol=len(labels), frameon=False)
    return save_figure(figure, path)


QualityMeasure = tuple[str, Callable[[dict], dict | None]]  # axis label, a row's {mean, ci95} (None where not measured)
GEN_PPL: QualityMeasure = ("generative perplexity (95% CI)", lambda row: row["gen_ppl"])
PATH_KL_MEASURES: tuple[QualityMeasure, ...] = (
    ("path KL to all-heavy, nats/sequence (95% CI)", lambda row: row.get("path_kl", {}).get("per_sequence")),
    ("path KL over the seed floor, nats/sequence (95% CI)", lambda row: row.get("path_kl", {}).get("excess", {}).get("per_sequence")),
)


NAMED_POLICIES = 20  # up to this many policies get a color and a legend entry each; more (a search) are drawn alike
ANALYSIS_MARK = " (analysis, greedy)"  # after the name of an analysis-only policy (the oracle) in every figure


def shown_label(row: dict, label: str) -> str:
    """``label`` as a figure shows it: marked where the run is analysis only (the oracle), not a deployable policy."""
    return label + ANALYSIS_MARK if row.get("analysis_only") else label


def plot_quality_vs_compute(rows: Sequence[dict], path: Path, saving_key: str = "saved_executed") -> Path:
    """Quality against the FLOPs saved, one point per run: generative perplexity, and beside it the path KL to
    the all-heavy sampler and its excess over the seed floor where runs measured them (all with 95% intervals).

    Runs of one policy at several budgets (labels ``name@budget``) share a color and are joined by a line, its
    trade-off curve; the legend names the policies, so no label is printed over another.
    """
    measures = [GEN_PPL, *(measure for measure in PATH_KL_MEASURES if any(measure[1](row) is not None for row in rows))]
    names = list(dict.fromkeys(row["label"].split("@")[0] for row in rows))
    named = len(names) <= NAMED_POLICIES
    palette = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    figure, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4), squeeze=False)
    for axis, (label, value) in zip(axes[0], measures):
        for index, name in enumerate(names):
            group = sorted((r for r in rows if value(r) is not None and r["label"].split("@")[0] == name), key=lambda r: r["flops"][saving_key])
            if not group:
                continue
            axis.errorbar(
                [100 * r["flops"][saving_key] for r in group], [value(r)["mean"] for r in group], yerr=[value(r)["ci95"] for r in group],
                fmt="o-" if len(group) > 1 else "o", color=palette(index) if named else "#1f4e79", capsize=3, markersize=4,
                linewidth=1, alpha=1.0 if named else 0.5, label=shown_label(group[0], name) if named else None,
            )
        axis.set_xlabel(f"{saving_key.removeprefix('saved_')} FLOPs saved against all-heavy, %")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    if named:
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, len(labels)), fontsize=8, frameon=False)
    else:
        figure.suptitle(f"{len(names)} schedules", y=1.02)
    figure.tight_layout()
    return save_figure(figure, path)


MAX_LABELLED_ARMS = 30  # beyond this (an exhaustive search) arms are ranked instead of named: the table names them


def plot_arms(rows: Sequence[dict], path: Path) -> Path:
    """Quality per arm as bars with 95% CIs (the paper's Fig. 1 and 8-11): generative perplexity, and beside
    it the path KL to the all-heavy sampler and its excess over the seed floor where every arm measured them.
    Many arms are drawn sorted, by rank."""
    measures = [GEN_PPL, *(measure for measure in PATH_KL_MEASURES if all(measure[1](row) is not None for row in rows))]
    ranked = len(rows) > MAX_LABELLED_ARMS
    width = 8 if ranked else max(5, 0.6 * len(rows))
    figure, axes = plt.subplots(1, len(measures), figsize=(width * len(measures), 4), squeeze=False)
    positions = range(len(rows))
    for axis, (label, value) in zip(axes[0], measures):
        shown = sorted(rows, key=lambda r: value(r)["mean"]) if ranked else rows
        axis.bar(positions, [value(r)["mean"] for r in shown], yerr=[value(r)["ci95"] for r in shown], capsize=0 if ranked else 3, color=MODEL_COLORS[0])
        if ranked:
            axis.set_xlabel(f"{len(rows)} arms, ranked (names in table.csv)")
        else:
            axis.set_xticks(positions, [shown_label(r, r["label"]) for r in rows], rotation=45, ha="right")
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_learning_curves(curves: dict[str, Sequence], path: Path, title: str) -> Path:
    """Validation loss against tokens seen (``CurvePoint`` rows), one line per named curve, best point marked."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        line, = axis.plot([p.tokens_seen / 1e6 for p in points], [p.val_loss for p in points], label=name, linewidth=1.5)
        best = min(points, key=lambda p: p.val_loss)
        axis.scatter([best.tokens_seen / 1e6], [best.val_loss], s=18, color=line.get_color(), zorder=3)
    axis.set_xlabel("tokens seen (millions)")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_mask_rate_profile(rates: Sequence[float], excess: dict[str, Sequence[float]], reference: str, path: Path) -> Path:
    """Each member's cross-entropy minus the reference's at fixed mask rates: where along t depth matters."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, values in excess.items():
        axis.plot(rates, values, marker="o", markersize=3, linewidth=1.5, label=name)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("mask rate t (1: fully masked, the sampler's first step)")
    axis.set_ylabel(f"cross-entropy minus {reference}'s (nats/masked token)")
    axis.set_title("validation cross-entropy at fixed mask rates")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_router_curve(
    episodes_csv: Path, path: Path, title: str, buckets: Sequence[tuple[float, float]], members: Sequence[str], windows: int = 20
) -> Path:
    """A price-conditioned router's training, per price bucket (one line each): episode return, excess (path KL for
    a raw run), executed saving, each a mean over ``windows`` equal spans of timesteps; and each member's share of
    the decisions over the last fifth of timesteps, per bucket (where a collapse to one member shows)."""
    with episodes_csv.open(newline="", encoding="utf-8") as handle:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
    quality = "excess" if rows and "excess" in rows[0] else "path_kl"
    measures = [("episode_return", "episode return"), (quality, f"{quality.replace('_', ' ')} (nats/sequence)"), ("saved_executed", "executed FLOPs saved")]
    end = max((row["timesteps"] for row in rows), default=1.0)
    edges = np.linspace(0, end, windows + 1)
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(buckets)))
    in_bucket = [[row for row in rows if bucket_of(row["price"], buckets) == index] for index in range(len(buckets))]
    for axis, (key, label) in zip(axes, measures):
        for color, (low, high), mine in zip(colors, buckets, in_bucket):
            spans = [[row[key] for row in mine if a < row["timesteps"] <= b] for a, b in zip(edges[:-1], edges[1:])]
            centres = [(a + b) / 2000 for (a, b), values in zip(zip(edges[:-1], edges[1:]), spans) if values]
            axis.plot(centres, [np.mean(values) for values in spans if values], color=color, linewidth=1.4, label=f"{low:.3g}..{high:.3g}")
        axis.set_xlabel("timesteps (thousands)")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(title="price (nats/heavy forward)", fontsize=7, title_fontsize=7)
    bottom = np.zeros(len(buckets))
    for member, name in enumerate(members):
        shares = np.array([np.mean([row.get(f"share_{member}", 0.0) for row in mine if row["timesteps"] > 0.8 * end] or [0.0]) for mine in in_bucket])
        axes[3].bar(range(len(buckets)), shares, bottom=bottom, color=MODEL_COLORS[member % len(MODEL_COLORS)], label=name)
        bottom += shares
    axes[3].set_xticks(range(len(buckets)), [f"{low:.2g}..{high:.2g}" for low, high in buckets], fontsize=7)
    axes[3].set_xlabel("price bucket")
    axes[3].set_title("share of decisions, last fifth", fontsize=10)
    axes[3].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_saving_by_quarter(records: Sequence[dict], path: Path) -> Path | None:
    """Where each run saved: its executed saving in each quarter of the steps (t = 1 on the left), one row per run,
    with each member's share of its decisions beside it; a router that spends its saving early (budget
    bankruptcy) is dark on the left, one that collapses onto a member is one colour on the right. None where no
    run recorded it (runs made before it was recorded)."""
    shown = [r for r in records if "saved_by_quarter" in r]
    if not shown:
        return None
    members = list(shown[0]["member_shares"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.28 * len(shown)), gridspec_kw={"width_ratios": [1, 1.2]})
    values = np.array([r["saved_by_quarter"] for r in shown])
    image = left.imshow(values, aspect="auto", cmap="Blues", vmin=min(0.0, values.min()), vmax=max(values.max(), 1e-9))
    for (row, column), value in np.ndenumerate(values):
        left.text(column, row, f"{value:.0%}", ha="center", va="center", fontsize=7, color="white" if value > values.max() * 0.6 else "black")
    labels = [shown_label(r, r["label"]) for r in shown]
    left.set_yticks(range(len(shown)), labels, fontsize=7)
    left.set_xticks(range(values.shape[1]), [f"steps {i}/{values.shape[1]}" for i in range(1, values.shape[1] + 1)], fontsize=7)
    left.set_title("executed saving per quarter of the steps (t = 1 first)", fontsize=9)
    figure.colorbar(image, ax=left, fraction=0.04)
    left_edge = np.zeros(len(shown))
    for index, member in enumerate(members):
        shares = np.array([r["member_shares"].get(member, 0.0) for r in shown])
        right.barh(range(len(shown)), shares, left=left_edge, color=MODEL_COLORS[index % len(MODEL_COLORS)], label=member)
        left_edge += shares
    right.set_yticks(range(len(shown)), [])
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_title("share of decisions per member", fontsize=9)
    right.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_runs_path_kl_per_step(records: Sequence[dict], path: Path) -> Path | None:
    """``plot_path_kl_per_step`` of every run that measured a non-zero path KL; None when none did (all-heavy only)."""
    shown = [r for r in records if "path_kl" in r and r["path_kl"]["per_sequence"]["mean"] > 0]
    return plot_path_kl_per_step(shown, path) if shown else None


def binned(per_step: Sequence[float], span: int) -> tuple[list[float], list[float]]:
    """Centres and sums of consecutive spans of ``span`` steps (the last one padded with zeros)."""
    values = torch.tensor(list(per_step), dtype=torch.float64)
    sums = torch.nn.functional.pad(values, (0, (-len(values)) % span)).view(-1, span).sum(1)
    return (torch.arange(len(sums)) * span + span / 2).tolist(), sums.tolist()


def plot_path_kl_per_step(records: Sequence[dict], path: Path, bins: int = 50) -> Path:
    """Where along the trajectory each run departs from all-heavy: its mean path KL per sample in each of ``bins``
    equal spans of steps (t = 1 on the left), one line per run (``label``), and dashed in the same color its
    excess over the seed floor where measured (what it loses beyond being another good network)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    span = max(1, -(-max(len(r["path_kl"]["per_step"]) for r in records) // bins))
    for record in records:
        kl = record["path_kl"]
        line, = axis.plot(*binned(kl["per_step"], span), label=record["label"], linewidth=1.3)
        if "excess" in kl:
            label = f"{record['label']}: excess over {kl['floor']['seed_baseline']}"
            axis.plot(*binned(kl["excess"]["per_step"], span), label=label, color=line.get_color(), linestyle="--", linewidth=1.1)
    if any("excess" in r["path_kl"] for r in records):
        axis.axhline(0.0, color="black", linewidth=0.6)  # the excess can fall below 0 where the policy's model beats the seed's
    axis.set_xlabel("step (t = 1 -> 0)")
    axis.set_ylabel(f"path KL per sample, nats per {span} steps")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)
