"""``oracle_features(cfg)``: what the oracle knows that routers don't, and the excess a router reading the best of it reaches.

At each of ``budgets`` the analysis oracle is calibrated to the budget and evaluated on the evaluation seeds
(``adasched.jobs.arms``). It then samples ``num_samples`` trajectories on seeds of their own (``record_seed``..,
disjoint from evaluation and calibration), every decision recorded with the router features, the candidate features
(``EXTRA_FEATURES``) and its choice (``adasched.analysis.decision_records``), and
``adasched.analysis.oracle_features`` scores how well each predicts the choice on held-out trajectories. A router
(``policies.kl_router``, oracle objective: a logistic regression by default) is fitted on the ``top_k`` best
deployable features, saved, calibrated to the budget and evaluated on the same seeds as the oracle and the sandwich,
so their excesses over the seed floor pair.

Writes into the run folder: oracle_features.csv (the table, also printed), oracle_features.png, results.json,
records_budget<b>.safetensors (every decision: the analysis reruns without sampling) and routers/budget<b>/ (run
one with ``python experiments/run.py policy=kl_router policy.path=<run dir>/routers/budget<b> budget=<b>``). A plain
function (the ``@hydra.main`` wrapper lives in ``experiments/oracle_features.py``) so tests can call it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from adasched.analysis.comparison import format_table, to_csv, verdict
from adasched.analysis.decision_records import DecisionRecords, record_decisions
from adasched.analysis.evaluation import paired_difference
from adasched.analysis.oracle_features import (
    TABLE_COLUMNS,
    FeatureAnalysis,
    analyse,
    plot_feature_auc,
    scores,
)
from adasched.errors import ConfigError
from adasched.io import write_json_atomic, write_text_atomic
from adasched.jobs.arms import (
    ArmSetting,
    check_decision_baseline,
    check_judged_by_another_seed,
    evaluate_arm,
    load_setting,
    prompts_for,
    sampling_precision,
)
from adasched.sampling.calibration import check_disjoint_seeds
from adasched.sampling.features import EXTRA_FEATURES, NEED_COSTS, feature_names
from adasched.sampling.policy import PROBE_ENTROPY, Policy, check_budget
from policies import kl_router, make_policy

CANDIDATES = list(EXTRA_FEATURES)  # every candidate feature is recorded and scored
# Scored, but never a router input: the recording runs the probe (for the probe features) and charges it, so the
# recorded FLOPs saved so far count a forward that a router reading no probe feature would not pay.
NOT_ROUTER_INPUTS = frozenset({"saved_so_far"})
COMMAND = "python experiments/oracle_features.py"


def router_readable(names: list[str], probe_features: bool) -> list[str]:
    """Those of ``names`` the router may read, in order: never NOT_ROUTER_INPUTS, the probe's only with ``probe_features``."""
    probed = {name for name, feature in EXTRA_FEATURES.items() if feature.needs == PROBE_ENTROPY}
    return [name for name in names if name not in NOT_ROUTER_INPUTS and (probe_features or name not in probed)]


def check_recording_seeds(cfg: DictConfig) -> None:
    """The recorded trajectories' seeds overlap neither the evaluation's nor the calibration's."""
    recorded = range(cfg.record_seed, cfg.record_seed + cfg.num_samples)
    for key, start, count in (("seed", cfg.seed, cfg.sampling.num_samples), ("calibration.seed", cfg.calibration.seed, cfg.calibration.num_samples)):
        other = range(start, start + count)
        if recorded.start < other.stop and other.start < recorded.stop:
            raise ConfigError(
                f"record_seed={cfg.record_seed} (x{cfg.num_samples}) overlaps the seeds {other.start}..{other.stop - 1} of {key}; pick seeds outside them"
            )


def checked_budgets(cfg: DictConfig) -> list[float]:
    """Fail on a bad value before any model loads; returns the budgets."""
    budgets = list(cfg.budgets)
    if not budgets:
        raise ConfigError("budgets=[] is invalid; give the budgets to analyse, such as [0.17,0.33]")
    for budget in budgets:
        check_budget(budget)
    if not cfg.eval.path_kl or cfg.eval.seed_baseline is None:
        raise ConfigError("the job compares excesses over the seed floor: it needs eval.path_kl=true and eval.seed_baseline (a heavy from another seed)")
    num_models = len(cfg.family.members)
    if not 0 < cfg.light < num_models:
        raise ConfigError(f"light={cfg.light} is invalid; it must name a member other than the heavy, in [1, {num_models})")
    readable = router_readable([*feature_names(num_models), *CANDIDATES], cfg.probe_features)
    if not cfg.top_k <= len(readable):
        raise ConfigError(f"top_k={cfg.top_k} is invalid; the router can read at most {len(readable)} features (probe_features={cfg.probe_features})")
    check_recording_seeds(cfg)
    check_disjoint_seeds(cfg.seed, cfg.sampling.num_samples, cfg.calibration.seed, cfg.calibration.num_samples)
    return budgets


def oracle_at(cfg: DictConfig, budget: float) -> Policy:
    """The oracle of ``cfg.oracle`` at ``budget``, checked before any model loads: its seed baseline exists and is not the judge."""
    oracle = instantiate(cfg.oracle, budget=budget)
    check_decision_baseline(cfg, "oracle.", oracle)
    check_judged_by_another_seed(cfg, "oracle", oracle)
    return oracle


def record(setting: ArmSetting, oracle: Policy) -> DecisionRecords:
    """Every decision of the calibrated oracle on the recording seeds, with the candidate features."""
    cfg = setting.cfg
    seeds = cfg.record_seed + torch.arange(cfg.num_samples)
    with tqdm(desc="recording the oracle's decisions", unit="step") as bar:
        return record_decisions(
            setting.models, oracle, seeds, setting.spec, CANDIDATES, oracle.increments, probe_model=cfg.light,
            prompts=prompts_for(cfg, setting.tokenizer, seeds), on_step=bar.update,
        )


def fit_router(cfg: DictConfig, analysis: FeatureAnalysis, directory: Path, num_models: int, seed_baseline: str | None) -> dict[str, Any]:
    """Fit the router on the training trajectories' top_k features, score it on the held-out ones and save it."""
    columns, test = analysis.columns, torch.from_numpy(analysis.test)
    inputs = router_readable(analysis.ranking, cfg.probe_features)[: cfg.top_k]
    features = torch.from_numpy(columns.values[:, columns.index(inputs)]).float()
    keeps_heavy = torch.from_numpy(~columns.left_heavy).double()
    model, metadata = kl_router.fit((features[~test], keeps_heavy[~test]), objective="oracle", **cfg.router)
    logit = model.predict_kl(features[test]).numpy()
    metadata |= {
        "command": " ".join([COMMAND, *sys.argv[1:]]), "inputs": inputs, "held_out": scores(columns.left_heavy[analysis.test], -logit, logit < 0),
        "family": {"name": cfg.family.name, "members": list(cfg.family.members), "light": cfg.light},
    }
    kl_router.save(model, directory, num_models, metadata, seed_baseline, inputs)
    return metadata


def excess(record: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(record["path_kl_excess_per_sample"])


def arm_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of an arm: its saving, path KL and excess, and the knob its calibration found with the
    saving it gave on the calibration seeds."""
    path_kl, calibration = record["path_kl"], record["calibration"]
    return {
        "label": record["label"], "saved_executed": record["flops"]["saved_executed"], "path_kl": path_kl["per_sequence"],
        "excess": path_kl["excess"]["per_sequence"], "knob": calibration["knob"], "calibrated_saving": calibration["saved_executed"],
    }


def paired_excess(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each pair of arms' excess difference per sample (same seeds), with its 95% interval and verdict (lower is better)."""
    pairs = (("router", "oracle"), ("router", "sandwich"), ("oracle", "sandwich"))
    paired = {}
    for first, second in pairs:
        mean, half_width = paired_difference(excess(records[first]), excess(records[second]))
        paired[f"{first}_minus_{second}"] = {"mean": mean, "ci95": half_width, "verdict": verdict(mean, half_width)}
    return paired


def analyse_budget(setting: ArmSetting, budget: float, run_dir: Path) -> dict[str, Any]:
    """One budget: the oracle evaluated and recorded, the analysis, the router fitted and evaluated, the sandwich."""
    cfg = setting.cfg
    oracle = oracle_at(cfg, budget)
    arms = {"oracle": evaluate_arm(setting, f"oracle@{budget:g}", oracle).record}  # binds it and calibrates its price
    records = record(setting, oracle)
    records.save(run_dir / f"records_budget{budget:g}.safetensors", CANDIDATES)
    analysis = analyse(records, CANDIDATES, cfg.light, cfg.validation_fraction)
    directory = run_dir / "routers" / f"budget{budget:g}"
    router_fit = fit_router(cfg, analysis, directory, len(setting.models), oracle.decision_baseline)
    router = make_policy("kl_router", path=str(directory), light=cfg.light, budget=budget)
    arms["router"] = evaluate_arm(setting, f"router@{budget:g}", router).record
    arms["sandwich"] = evaluate_arm(setting, f"sandwich@{budget:g}", instantiate(cfg.sandwich, budget=budget)).record
    return {
        **analysis.summary(), "rows": [{"budget": budget, **row} for row in analysis.rows], "router": router_fit,
        "arms": {name: arm_summary(arm) for name, arm in arms.items()}, "paired_excess": paired_excess(arms),
    }


def budget_lines(budget: float, result: dict[str, Any]) -> list[str]:
    """The printed summary of one budget: each arm's excess and saving, and the router's paired differences."""
    arms, paired = result["arms"], result["paired_excess"]
    router = result["router"]
    heading = (
        f"budget {budget:g}: the oracle left the heavy at {result['left_heavy_share']:.1%} of {result['decisions']} decisions; "
        f"the router reads {', '.join(router['inputs'])} (held-out AUC {router['held_out']['auc']:.3f})"
    )
    lines = [heading]
    for name, arm in arms.items():
        shown = arm["excess"]
        lines.append(f"  {name:<9} excess {shown['mean']:.3f} +- {shown['ci95']:.3f} nats/sequence, saved {arm['saved_executed']:.1%}")
    for name, difference in paired.items():
        lines.append(f"  {name.replace('_minus_', ' - '):<18} {difference['mean']:+.3f} +- {difference['ci95']:.3f} ({difference['verdict']})")
    return lines


def oracle_features(cfg: DictConfig) -> dict[str, Any]:
    """Every budget analysed; writes the table, the figure, results.json, the records and the routers; returns the results."""
    budgets = checked_budgets(cfg)
    for budget in budgets:
        oracle_at(cfg, budget)  # a bad oracle value fails before any model loads
    setting = load_setting(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    per_budget = {f"{budget:g}": analyse_budget(setting, budget, run_dir) for budget in budgets}
    rows = [row for result in per_budget.values() for row in result["rows"]]
    results = {
        "command": " ".join([COMMAND, *sys.argv[1:]]), "family": {"dir": str(cfg.family.dir), "members": setting.names},
        "oracle": {k: v for k, v in OmegaConf.to_container(cfg.oracle, resolve=True).items() if k not in ("_target_", "budget")}, "judged_by": cfg.eval.seed_baseline,
        "num_samples": cfg.num_samples, "record_seed": cfg.record_seed, "eval_samples": cfg.sampling.num_samples, "seed": cfg.seed,
        "steps": cfg.sampling.num_steps, "seq_len": cfg.sampling.seq_len, "precision": sampling_precision(cfg), "top_k": cfg.top_k,
        "validation_fraction": cfg.validation_fraction, "light": cfg.light,
        "feature_costs": {name: NEED_COSTS[feature.needs] for name, feature in EXTRA_FEATURES.items()}, "budgets": per_budget,
    }
    write_text_atomic(run_dir / "oracle_features.csv", to_csv(rows, TABLE_COLUMNS))
    plot_feature_auc(rows, run_dir / "oracle_features.png")
    write_json_atomic(run_dir / "results.json", results)
    print(format_table([{key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()} for row in rows], TABLE_COLUMNS))
    print("\n".join(line for budget, result in zip(budgets, per_budget.values()) for line in budget_lines(budget, result)))
    return results
