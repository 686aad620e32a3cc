"""``sweep(cfg)``: many policies ("arms") on the same evaluation seeds in one process, resumably.

An experiment config names its arms (policy configs, each with overrides) and the FLOPs budgets to test;
an arm whose policy takes a budget runs once per budget (calibrated on the calibration seeds first), or only at
those its own ``budgets:`` lists (a router shipped for some budgets only), the others once. Every arm samples
the same seeds, so the table gives each arm's paired perplexity difference to the experiment's reference arm at
the same budget. Finished arms are appended to ``arms.jsonl``; rerunning the same command skips them, so a sweep
killed mid-way finishes with the table an uninterrupted run gives. An arm whose policy files (a router) changed
since it ran is sampled again instead of reused. Where the reference ran at two budgets or more, the report
also holds every arm's Pareto front against it (``adasched.analysis.pareto``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adasched.analysis.arm_log import ArmLog, artifact_digests, read_sweep
from adasched.analysis.comparison import SWEEP_COLUMNS, format_table, sweep_rows, to_csv
from adasched.analysis.pareto import (
    FIGURE_FILE,
    ISO_COLUMN,
    ISO_COLUMNS,
    PARETO_COLUMNS,
    pareto_summary,
    write_pareto,
)
from adasched.analysis.plots import (
    plot_arms,
    plot_quality_vs_compute,
    plot_runs_path_kl_per_step,
    plot_saving_by_quarter,
)
from adasched.analysis.run_logging import log_run, rows_table, samples_table
from adasched.analysis.segment_search import (
    analysis,
    plot_analysis,
    segment_search_arms,
)
from adasched.errors import ConfigError
from adasched.io import write_json_atomic, write_text_atomic
from adasched.jobs.arms import (
    PER_SAMPLE_KEYS,
    check_decision_baseline,
    check_judged_by_another_seed,
    check_trained_members,
    evaluate_arm,
    load_setting,
    sampling_precision,
    sampling_spec,
)
from adasched.sampling.policy import Policy, check_budget


@dataclass
class Arm:
    """One policy at one budget (or at none): what a row of the sweep's table is."""

    index: int  # position in the whole experiment's table (across shards)
    name: str  # the key under experiment.arms
    budget: float | None
    config: dict[str, Any]  # the policy config, resolved, with the budget set
    policy: Policy

    @property
    def label(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget:g}"


def arm_configs(experiment: DictConfig) -> dict[str, dict[str, Any]]:
    """The experiment's policy configs by arm name: its listed arms, then its segment search's, if any."""
    arms = {str(name): OmegaConf.to_container(policy_cfg, resolve=True) for name, policy_cfg in (experiment.arms or {}).items()}
    if experiment.segment_search is not None:
        arms |= segment_search_arms(**experiment.segment_search)
    if not arms:
        raise ConfigError(f"experiment {experiment.name!r} has no arms; add policy configs under experiment.arms")
    if experiment.reference is not None and experiment.reference not in arms:
        raise ConfigError(f"experiment.reference={experiment.reference!r} is not one of its arms: {', '.join(list(arms)[:12])}")
    return arms


ARM_BUDGETS = "budgets"  # under an arm: the experiment's budgets it runs at, not a key of its policy config


def arm_budgets(name: str, config: dict[str, Any], budgets: list[float]) -> list[float]:
    """The experiment's budgets an arm runs at: all of them, or those its own ``budgets:`` lists. A router trained
    for some budgets only (one per budget) would elsewhere run the one trained nearest, recalibrated far from its
    training; an experiment run at other budgets (``experiment.budgets=[...]``) leaves out those it lacks."""
    own = config.get(ARM_BUDGETS)
    if own is None:
        return budgets
    if "budget" not in config:
        raise ConfigError(f"experiment.arms.{name}.budgets is set but its policy {config.get('name')!r} takes no budget")
    if not isinstance(own, list):
        raise ConfigError(f"experiment.arms.{name}.budgets={own!r} is invalid; it must be a list of budgets")
    for budget in own:
        check_budget(budget)
    return [budget for budget in budgets if budget in own]


def expand_arms(experiment: DictConfig) -> list[Arm]:
    """This shard's arms in table order: budget-free arms (e.g. all-heavy) first, then each budget's.

    Every policy is built here, before any model loads, so a bad arm fails the sweep at once.
    """
    budgets = list(experiment.budgets or [])
    for budget in budgets:
        check_budget(budget)
    if not 0 <= experiment.shard_index < experiment.num_shards:
        raise ConfigError(f"experiment.shard_index={experiment.shard_index} is invalid; it must lie in 0..num_shards-1 ({experiment.num_shards - 1})")
    fixed, budgeted = [], []
    for name, config in arm_configs(experiment).items():
        runs_at = arm_budgets(name, config, budgets)
        config = {key: value for key, value in config.items() if key != ARM_BUDGETS}
        if "budget" not in config or not budgets:
            fixed.append((name, None, {key: value for key, value in config.items() if key != "budget"}))
        budgeted += [(name, budget, {**config, "budget": budget}) for budget in runs_at if "budget" in config]
    ordered = fixed + sorted(budgeted, key=lambda arm: arm[1])  # stable: arms keep their order within a budget
    mine = list(enumerate(ordered))[experiment.shard_index :: experiment.num_shards]
    return [Arm(index, name, budget, config, instantiate(OmegaConf.create(config))) for index, (name, budget, config) in mine]


def sweep_settings(cfg: DictConfig) -> dict[str, Any]:
    """What every arm of a sweep (and every shard) must share for their rows to be comparable."""
    return {
        "experiment": {key: OmegaConf.to_container(cfg.experiment, resolve=True)[key] for key in ("name", "reference", "segment_search")},
        "family": {"dir": str(cfg.family.dir), "members": list(cfg.family.members)},
        # batch size never changes samples; precision does, so a sweep compares the resolved one (auto -> bf16 or float32)
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True) | {"batch_size": None, "precision": sampling_precision(cfg)},
        "seed": cfg.seed,
        "evaluator": cfg.eval.ppl_model,
        "calibration": OmegaConf.to_container(cfg.calibration, resolve=True),
    }


def sweep(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run every unfinished arm of this shard, then write its report; returns the table's rows."""
    arms = expand_arms(cfg.experiment)
    spec = sampling_spec(cfg)
    # before any model loads: a schedule that does not fit the steps or the family, a router judged by its own seed
    # baseline, or a policy deciding against a seed baseline the family lacks, fails
    for arm in arms:
        arm.policy.reset(spec.num_steps, len(cfg.family.members))
        check_judged_by_another_seed(cfg, arm.label, arm.policy)
        check_trained_members(cfg, arm.label, arm.policy)
        check_decision_baseline(cfg, f"experiment.arms.{arm.name}.", arm.policy)
    run_dir = Path(cfg.run_dir)
    settings = sweep_settings(cfg)
    log = ArmLog(run_dir, settings)
    finished = log.load()
    for arm in arms:
        if arm.label in finished and finished[arm.label]["policy_config"] != arm.config:
            raise ConfigError(
                f"arm {arm.label} in {log.path} was run with policy config {finished[arm.label]['policy_config']}, "
                f"now {arm.config}; remove its line to rerun it, or pass another hydra.run.dir"
            )
    todo = [arm for arm in arms if arm.label not in finished or stale(finished[arm.label], arm)]
    print(f"experiment {cfg.experiment.name}: {len(arms)} arms, {len(arms) - len(todo)} already finished in {run_dir}")
    if todo:
        run_arms(cfg, todo, log, start=len(arms) - len(todo), total=len(arms))
        finished = log.load()
    results = write_report(run_dir, settings["experiment"], [finished[arm.label] for arm in arms])
    if "pareto" in results and todo and cfg.experiment.num_shards == 1:
        log_pareto(cfg, run_dir, results["pareto"])
    return results["rows"]


def stale(record: dict[str, Any], arm: Arm) -> bool:
    """Whether a finished arm's policy files (a router, a fitted predictor) changed since it ran: then it runs again."""
    changed = record.get("artifacts", {}) != artifact_digests(arm.config)
    if changed:
        print(f"arm {arm.label}: the files its policy reads changed since it ran; sampling it again")
    return changed


def write_report(folder: Path, experiment: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """table.csv, results.json, the quality-vs-compute and per-arm figures, the segment analysis if searched, and
    the Pareto fronts where the reference ran at several budgets; returns what results.json holds."""
    rows = sweep_rows(records, experiment["reference"])
    results: dict[str, Any] = {"experiment": experiment["name"], "reference": experiment["reference"], "rows": rows}
    if experiment.get("segment_search") is not None:
        results["segment_search"] = analysis(records)
        plot_analysis(records, folder)
    if (fronts := pareto_summary(records, experiment["reference"])) is not None:
        results["pareto"] = fronts
    write_text_atomic(folder / "table.csv", to_csv(rows, SWEEP_COLUMNS))
    write_json_atomic(folder / "results.json", results)
    plot_quality_vs_compute(records, folder / "quality_vs_compute.png")
    plot_runs_path_kl_per_step(records, folder / "path_kl_per_step.png")
    plot_arms(records, folder / "quality_by_arm.png")
    plot_saving_by_quarter(records, folder / "saving_by_quarter.png")
    print(format_table(rows, SWEEP_COLUMNS))
    print(f"\nwrote {folder / 'table.csv'}, results.json and figures")
    if fronts is not None:
        write_pareto(folder, records, fronts)
    return results


def log_pareto(cfg: DictConfig, folder: Path, fronts: dict[str, Any]) -> None:
    """The Pareto tables and figure as one more W&B run in the experiment's group, beside its arms' runs. Only a
    sweep that ran arms logs it (a rerun that only reports would log it twice), and no shard does: its fronts lack
    the other shards' arms (merge_sweep writes the whole one to disk)."""
    iso = {row["label"]: row[ISO_COLUMN] for row in fronts["iso_quality"] if not isinstance(row[ISO_COLUMN], str)}
    tables = {"pareto": rows_table(fronts["rows"], PARETO_COLUMNS), "pareto_iso_quality": rows_table(fronts["iso_quality"], ISO_COLUMNS)}
    log_run(cfg, f"{cfg.experiment.name}__pareto", {"level": fronts["level"] or {}, ISO_COLUMN: iso}, tables, {"pareto": folder / FIGURE_FILE})


def run_arms(cfg: DictConfig, arms: list[Arm], log: ArmLog, start: int, total: int) -> None:
    """Load the family and the evaluator once, then evaluate each arm and append it to the log."""
    setting = load_setting(cfg)
    for folder in ("samples", "schedules"):
        (log.folder / folder).mkdir(exist_ok=True)
    for index, arm in enumerate(arms, start + 1):
        print(f"[{index}/{total}] {arm.label}", flush=True)
        schedule = log.folder / "schedules" / f"{arm.label}.png"
        outcome = evaluate_arm(setting, arm.label, arm.policy, samples_path=log.folder / "samples" / f"{arm.label}.jsonl", schedule_path=schedule)
        record = {
            **outcome.record, "index": arm.index, "arm": arm.name, "budget": arm.budget, "policy_config": arm.config,
            "artifacts": artifact_digests(arm.config),
        }
        log.append(record)
        summary = {key: value for key, value in record.items() if key not in PER_SAMPLE_KEYS}
        log_run(cfg, f"{cfg.experiment.name}__{arm.label}", summary, {"samples": samples_table(record["seeds"], record["nll"], outcome.texts)}, {"schedule": schedule})


def pair_against(folder: Path, reference: str) -> list[dict[str, Any]]:
    """The table of a finished sweep (or of its shards) paired against another of its arms instead of the
    experiment's reference, from the same samples (nothing is resampled): e.g. every router against kl_router.

    Written to ``table_vs_<reference>.csv`` beside the sweep's own table, which stays as it is.
    """
    _, records, _ = read_sweep(folder)
    ordered = sorted(records.values(), key=lambda record: record["index"])
    arms = list(dict.fromkeys(record["arm"] for record in ordered))
    if reference not in arms:
        raise ConfigError(f"reference={reference!r} is not an arm of the sweep in {folder}; its arms: {', '.join(arms)}")
    rows = sweep_rows(ordered, reference)
    write_text_atomic(folder / f"table_vs_{reference}.csv", to_csv(rows, SWEEP_COLUMNS))
    print(format_table(rows, SWEEP_COLUMNS))
    print(f"\nwrote {folder / f'table_vs_{reference}.csv'}")
    return rows


def merge_shards(folder: Path) -> list[dict[str, Any]]:
    """Combine the arm logs of a sweep's shards (e.g. a Hydra multirun) under ``folder`` and report on them all.

    The shards must share their settings (see ``read_sweep``).
    """
    settings, records, shards = read_sweep(folder)
    print(f"merging {len(records)} arms from {len(shards)} shards")
    return write_report(folder, settings["experiment"], sorted(records.values(), key=lambda record: record["index"]))["rows"]
