"""One page per experiment: its table and figures on disk, and a W&B report over its runs when online.

A sweep's results are spread over ``table.csv``, ``arms.jsonl`` and several figures, and its W&B runs (one per
arm) hold only numbers; the dashboard puts the paired verdicts (and a sweep's Pareto fronts, where it has them)
next to the figures in ``dashboard.md``, and online builds the same page as a W&B report whose charts read the
experiment's runs, so it stays current when runs are synced or added. The local files are written in every
logger mode.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wandb
import wandb_workspaces.reports.v2 as wr
from omegaconf import DictConfig, OmegaConf
from wandb_workspaces import expr

from adasched.analysis.arm_log import read_sweep
from adasched.analysis.comparison import (
    COLUMNS,
    SWEEP_COLUMNS,
    find_results,
    load_rows,
    table_rows,
)
from adasched.analysis.pareto import (
    FIGURE_FILE,
    ISO_COLUMN,
    ISO_COLUMNS,
    PARETO_COLUMNS,
    plot_pareto,
)
from adasched.analysis.plots import (
    plot_arms,
    plot_quality_vs_compute,
    plot_runs_path_kl_per_step,
)
from adasched.analysis.segment_search import plot_analysis
from adasched.errors import ConfigError
from adasched.io import write_text_atomic

MARKDOWN_FILE = "dashboard.md"
RESULTS_FILE = "results.json"  # the table a sweep (and a run) writes
# Summary keys of every arm's W&B run: run_logging.flatten of its results.
PPL_KEY = "gen_ppl/mean"
SAVED_EXECUTED_KEY = "flops/saved_executed"
RUN_TABLE_KEYS = (
    PPL_KEY, "gen_ppl/ci95", "path_kl/per_sequence/mean", "path_kl/per_sequence/ci95", "path_kl/excess/per_sequence/mean",
    "path_kl/excess/per_sequence/ci95", "path_kl/floor/per_sequence/mean", SAVED_EXECUTED_KEY, "flops/saved_nominal",
    "entropy/mean", "wall_s/sampling",
)

HEADERS = {
    "label": "arm", "gen_ppl": "gen PPL (95% CI)", "diff_vs_reference": "paired diff vs reference (95% CI)",
    "paired_diff": "paired diff vs all-heavy", "entropy": "unigram entropy", "saved_nominal_%": "FLOPs saved nominal %",
    "saved_executed_%": "FLOPs saved executed %", "knob": "calibrated knob", "wall_s": "sampling wall s",
    "speedup_vs_reference": "speedup vs reference", "speedup": "speedup vs all-heavy",
    "path_kl": "path KL, nats/sequence (95% CI)", "path_kl_diff": "paired path KL diff vs reference (95% CI)",
    "path_kl_verdict": "path KL verdict", "path_kl_floor": "seed floor, nats/sequence (95% CI)",
    "path_kl_excess": "path KL over the seed floor, nats/sequence (95% CI)", "path_kl_excess_diff": "paired excess diff vs reference (95% CI)",
    "path_kl_excess_verdict": "excess verdict",
    "headroom_captured": "headroom captured", "headroom_ci95_low": "headroom 95% CI low", "headroom_ci95_high": "high",
    "budgets": "budgets run", "saved_executed_%_min": "saved executed % from", "saved_executed_%_max": "to",
    ISO_COLUMN: "iso-quality saving, executed %",
}
INTERVALS = {  # a value column and its 95% half-width, shown as one cell
    "gen_ppl": "ci95", "diff_vs_reference": "diff_ci95", "path_kl": "path_kl_ci95", "path_kl_diff": "path_kl_diff_ci95",
    "path_kl_floor": "path_kl_floor_ci95", "path_kl_excess": "path_kl_excess_ci95", "path_kl_excess_diff": "path_kl_excess_diff_ci95",
}
MODES = ("online", "offline", "disabled")


@dataclass
class Experiment:
    """The arms of one experiment as the dashboard shows them, and where their W&B runs were logged."""

    name: str
    sources: list[Path]
    description: str
    records: list[dict[str, Any]]  # per arm: label, gen_ppl, flops (what the figures plot)
    rows: list[dict[str, Any]]  # the experiment's table, one row per arm
    columns: Sequence[str]
    project: str | None  # of its W&B runs; None: unknown, or several
    groups: list[str]  # W&B groups of its runs
    segment_search: bool = False
    pareto: dict[str, Any] | None = None  # a sweep's Pareto summary (adasched.analysis.pareto), where it has one


def logged_to(folders: Sequence[Path]) -> tuple[str | None, list[str]]:
    """The W&B project and groups the runs in ``folders`` were logged to, read from their saved Hydra configs."""
    configs = [OmegaConf.load(path) for path in (folder / ".hydra" / "config.yaml" for folder in folders) if path.is_file()]
    projects = {OmegaConf.select(config, "logger.project") for config in configs}
    groups = sorted({OmegaConf.select(config, "logger.group") for config in configs} - {None})
    return (projects.pop() if len(projects) == 1 else None), groups


def load_sweep(folder: Path) -> Experiment:
    """A folder written by ``experiments/sweep.py``, or a multirun folder of its shards after
    ``experiments/merge_sweep.py``: its table (results.json) and its finished arms (the shards' arms.jsonl)."""
    if not folder.is_dir():
        raise ConfigError(f"no such sweep folder: {folder}")
    if not (folder / RESULTS_FILE).is_file():
        raise ConfigError(f"{folder} is not a finished sweep: no {RESULTS_FILE}, as experiments/sweep.py (or merge_sweep.py for a multirun) writes it")
    results = json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))
    settings, finished, shards = read_sweep(folder)
    records = [finished[row["label"]] for row in results["rows"]]  # the table's arms, in its order
    seed, sampling = settings["seed"], settings["sampling"]
    project, groups = logged_to(shards)
    return Experiment(
        name=results["experiment"], sources=[folder],
        description=(
            f"{len(records)} arms, each sampled on seeds {seed}-{seed + sampling['num_samples'] - 1} ({sampling['num_steps']} steps, "
            f"{sampling['seq_len']} tokens); paired differences are to `{results['reference']}` on the same seeds, at the same budget."
        ),
        records=records, rows=results["rows"], columns=SWEEP_COLUMNS, project=project, groups=groups,
        segment_search="segment_search" in results, pareto=results.get("pareto"),
    )


def load_runs(folders: Sequence[Path]) -> Experiment:
    """Runs of ``experiments/run.py`` (run folders, or a multirun folder holding them) compared as one experiment."""
    files = find_results(folders)
    records = load_rows(files)
    project, groups = logged_to([file.parent for file in files])
    return Experiment(
        name=", ".join(groups) or "runs", sources=list(folders),
        description=f"{len(records)} runs; paired differences (where run with eval.compare_to_heavy) are to all-heavy on the same seeds.",
        records=records, rows=table_rows(records), columns=COLUMNS, project=project, groups=groups,
    )


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a markdown table: values with their 95% interval in one cell; columns empty (or absent) in every row left out."""
    shown = [c for c in columns if c not in INTERVALS.values() and any(row.get(c, "") != "" for row in rows)]

    def cell(row: dict[str, Any], column: str) -> str:
        value = row[column]
        if column == "label":
            return f"`{value}`"
        return f"{value} ± {row[INTERVALS[column]]}" if column in INTERVALS and value != "" else str(value)

    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in shown) + " |", "|" + " --- |" * len(shown)]
    lines += ["| " + " | ".join(cell(row, c) for c in shown) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(experiment: Experiment, command: str, figures: Sequence[Path] = ()) -> str:
    """The dashboard's text: what was compared, the table, the figures (links relative to the markdown) and the command."""
    parts = [
        f"# {experiment.name}",
        f"From {', '.join(f'`{source}`' for source in experiment.sources)}. {experiment.description}",
        *([f"W&B runs: project `{experiment.project}`, group {', '.join(f'`{g}`' for g in experiment.groups)}."] if experiment.groups else []),
        markdown_table(experiment.rows, experiment.columns),
        *(pareto_markdown(experiment.pareto) if experiment.pareto else []),
        *(f"![{figure.stem}]({figure.name})" for figure in figures),
        f"Made with `{command}`.",
    ]
    return "\n\n".join(parts) + "\n"


def pareto_markdown(fronts: dict[str, Any]) -> list[str]:
    """The Pareto summary's two tables, each after the sentence that says how to read it."""
    reference, level = fronts["reference"], fronts["level"]
    read_at = f"`{level['label']}`'s excess, {level['path_kl_excess']:.4f} nats/sequence" if level else "the reference's excess (not measured)"
    return [
        "## Pareto fronts",
        (
            f"Headroom captured: (`{reference}` - arm) / (`{reference}` - `{fronts['oracle_policy']}`) of the excess over the seed floor at "
            "the same budget, with a paired bootstrap 95% interval over the seeds; the oracle is an analysis reference (greedy with hindsight)."
        ),
        markdown_table(fronts["rows"], PARETO_COLUMNS),
        f"Iso-quality saving: the largest executed saving at which each front (linear between its budgets) is no worse than {read_at}.",
        markdown_table(fronts["iso_quality"], ISO_COLUMNS),
    ]


def write_local(experiment: Experiment, out: Path, command: str) -> Path:
    """The experiment's figures as PNGs and ``dashboard.md`` linking them, into ``out``; returns the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    figures = [plot_quality_vs_compute(experiment.records, out / "quality_vs_compute.png"), plot_arms(experiment.records, out / "quality_by_arm.png")]
    if (path_kl_figure := plot_runs_path_kl_per_step(experiment.records, out / "path_kl_per_step.png")) is not None:
        figures.append(path_kl_figure)
    if experiment.segment_search:
        figures += plot_analysis(experiment.records, out)
    if experiment.pareto:
        figures.append(plot_pareto(experiment.records, experiment.pareto["level"], out / FIGURE_FILE))
    path = out / MARKDOWN_FILE
    write_text_atomic(path, summary_markdown(experiment, command, figures))
    return path


def build_report(experiment: Experiment, markdown: str, entity: str, project: str, groups: Sequence[str]) -> wr.Report:
    """The W&B report, unsaved: the summary, then charts and the runs table over the runs in ``groups``."""
    runset = wr.Runset(
        entity=entity, project=project, name=experiment.name, filters=expr.And(expr.Metric("Group").isin(list(groups))),
        order=[wr.OrderBy(wr.SummaryMetric(PPL_KEY), ascending=True)],
        pinned_columns=["run:displayName"], visible_columns=[f"summary:{key}" for key in RUN_TABLE_KEYS],
    )
    panels = [
        wr.ScatterPlot(
            title="gen PPL vs executed FLOPs saved", x=wr.SummaryMetric(SAVED_EXECUTED_KEY), y=wr.SummaryMetric(PPL_KEY),
            layout=wr.Layout(x=0, y=0, w=12, h=8),
        ),
        wr.BarPlot(title="gen PPL per arm", metrics=[wr.SummaryMetric(PPL_KEY)], orientation="v", layout=wr.Layout(x=12, y=0, w=12, h=8)),
        wr.RunComparer(diff_only="split", layout=wr.Layout(x=0, y=8, w=24, h=10)),
    ]
    return wr.Report(
        entity=entity, project=project, title=f"{experiment.name}: quality vs compute", description=experiment.description,
        blocks=[wr.MarkdownBlock(text=markdown), wr.PanelGrid(runsets=[runset], panels=panels)],
    )


def publish_report(experiment: Experiment, markdown: str, logger: DictConfig) -> str:
    """Save the report to W&B; returns its URL."""
    try:
        api = wandb.Api()
    except wandb.errors.UsageError as error:
        raise ConfigError(f"logger.mode=online needs a W&B login (run `wandb login`): {error}") from error
    project = logger.project or experiment.project
    groups = [logger.group] if logger.group else experiment.groups
    if project is None or not groups:
        raise ConfigError(
            f"the W&B project or group of the runs in {experiment.sources[0]} is unknown (no single one in their .hydra/config.yaml); "
            "pass logger.project= and logger.group="
        )
    report = build_report(experiment, markdown, logger.entity or api.default_entity, project, groups)
    return report.save().url


def dashboard(cfg: DictConfig, command: str) -> Path:
    """Write the local dashboard of ``cfg.sweep_dir`` (or ``cfg.run_dirs``) and, with ``logger.mode=online``, the W&B report."""
    if cfg.logger.mode not in MODES:
        raise ConfigError(f"logger.mode={cfg.logger.mode!r} is unknown; choose one of {', '.join(MODES)}")
    if (cfg.sweep_dir is None) == (not cfg.run_dirs):
        raise ConfigError("pass one of sweep_dir=<a folder of experiments/sweep.py> or run_dirs=[<folders of experiments/run.py>]")
    experiment = load_sweep(Path(cfg.sweep_dir)) if cfg.sweep_dir is not None else load_runs([Path(d) for d in cfg.run_dirs])
    out = Path(cfg.out_dir) if cfg.out_dir is not None else experiment.sources[0] / "dashboard"
    path = write_local(experiment, out, command)
    print(f"wrote {path} and its figures")
    if cfg.logger.mode == "online":
        print(f"W&B report: {publish_report(experiment, summary_markdown(experiment, command), cfg.logger)}")
    return path
