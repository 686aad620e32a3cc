"""``run(cfg)``: sample with one policy, evaluate, and write results.json, samples.jsonl and the schedule.

With ``eval.compare_to_heavy`` the same seeds are also sampled all-heavy in the same process, which gives
paired quality differences and a wall-clock speedup measured under the same conditions (none for an
analysis-only policy: its sampling runs its own evaluation forwards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adasched.analysis.comparison import analysis_label
from adasched.analysis.run_logging import log_run, samples_table
from adasched.io import write_json_atomic
from adasched.jobs.arms import (
    PER_SAMPLE_KEYS,
    check_decision_baseline,
    check_judged_by_another_seed,
    check_trained_members,
    evaluate_arm,
    heldout_text_record,
    load_setting,
    sampling_precision,
    sampling_spec,
)
from adasched.parallel import predict_trainer
from policies import make_policy

BASELINE_POLICY = "static_heavy"


def parallel_trainer(cfg: DictConfig) -> L.Trainer | None:
    """The Lightning Trainer that spreads sampling and scoring over ``parallel.devices`` x ``num_nodes``
    processes, or None to run in this process (one device)."""
    if cfg.parallel.devices == 1 and cfg.parallel.num_nodes == 1:
        return None
    return predict_trainer(cfg.parallel.accelerator, cfg.parallel.devices, cfg.parallel.num_nodes)


def run(cfg: DictConfig) -> dict[str, Any]:
    policy = instantiate(cfg.policy)  # first: a bad policy value fails before any model loads
    check_judged_by_another_seed(cfg, cfg.policy.name, policy)
    check_trained_members(cfg, cfg.policy.name, policy)
    check_decision_baseline(cfg, "policy.", policy)
    spec = sampling_spec(cfg)
    policy.reset(spec.num_steps, len(cfg.family.members))  # a schedule that does not fit the steps fails here too
    setting = load_setting(cfg, parallel_trainer(cfg))
    baseline = None
    if cfg.eval.compare_to_heavy and cfg.policy.name != BASELINE_POLICY:
        baseline = evaluate_arm(setting, BASELINE_POLICY, make_policy(BASELINE_POLICY))
    run_dir = Path(cfg.run_dir)
    writes = setting.trainer is None or setting.trainer.is_global_zero  # every process holds the whole run; one writes it
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
    reference_nll = None if baseline is None else torch.tensor(baseline.record["nll"])
    outcome = evaluate_arm(
        setting, cfg.policy.name, policy, reference_nll,
        samples_path=run_dir / "samples.jsonl" if writes else None, schedule_path=run_dir / "schedule.png" if writes else None,
    )
    record = outcome.record
    results: dict[str, Any] = {
        "policy": cfg.policy.name,
        "policy_config": {k: v for k, v in OmegaConf.to_container(cfg.policy, resolve=True).items() if k != "_target_"},
        "family": {"dir": str(cfg.family.dir), "members": setting.names, "n_blocks": setting.depths},
        "num_samples": cfg.sampling.num_samples,
        "seq_len": cfg.sampling.seq_len,
        "steps": cfg.sampling.num_steps,
        "prefix_len": cfg.sampling.prefix_len,
        "top_p": cfg.sampling.top_p,
        "precision": sampling_precision(cfg),
        "seed": cfg.seed,
        "device": str(next(setting.models[0].parameters()).device),
        "processes": 1 if setting.trainer is None else setting.trainer.world_size,
        "evaluator": cfg.eval.ppl_model,
        **{key: value for key, value in record.items() if key not in ("label", "policy", *PER_SAMPLE_KEYS)},
    }
    if baseline is not None and not policy.analysis_only:
        results["wall_s"]["sampling_all_heavy"] = baseline.generation.wall_s
        results["speedup_vs_all_heavy"] = baseline.generation.wall_s / outcome.generation.wall_s
        results["wall_saved_vs_all_heavy"] = 1 - outcome.generation.wall_s / baseline.generation.wall_s
    if cfg.eval.heldout_text:
        results["heldout_text"] = heldout_text_record(setting)
    if not writes:
        return results
    write_json_atomic(run_dir / "results.json", results)
    print_summary(results)  # before W&B's own summary, which its finish prints
    log_run(cfg, cfg.run_name, results, {"samples": samples_table(record["seeds"], record["nll"], outcome.texts)}, {"schedule": run_dir / "schedule.png"})
    return results


def path_kl_lines(path_kl: dict[str, Any]) -> list[str]:
    """The summary's path KL to all-heavy and, where measured, its excess over the seed floor."""
    total = path_kl["per_sequence"]
    lines = [f"path KL to heavy    {total['mean']:.3f} +- {total['ci95']:.3f} nats/sequence ({path_kl['per_token']['mean']:.4f} per token)"]
    if "excess" in path_kl:
        excess, floor = path_kl["excess"]["per_sequence"], path_kl["floor"]
        lines.append(
            f"excess over seed    {excess['mean']:.3f} +- {excess['ci95']:.3f} nats/sequence "
            f"(floor {floor['per_sequence']['mean']:.3f}: what {floor['seed_baseline']} costs at the same steps)"
        )
    return lines


def print_summary(results: dict[str, Any]) -> None:
    ppl, flops = results["gen_ppl"], results["flops"]
    analysis = analysis_label(results)  # in place of a wall clock and a speedup, which it has none of
    wall = analysis or f"{results['wall_s']['sampling']:.1f} s"
    lines = [
        f"policy              {results['policy']}",
        f"samples             {results['num_samples']} x {results['seq_len']} tokens, {results['steps']} steps, {results['precision']}",
        f"gen PPL             {ppl['mean']:.2f} +- {ppl['ci95']:.2f} (95% CI)",
        *(path_kl_lines(results["path_kl"]) if "path_kl" in results else []),
        *(
            [f"held-out text       PPL {results['heldout_text']['gen_ppl']['mean']:.2f} +- {results['heldout_text']['gen_ppl']['ci95']:.2f} "
             "under the same evaluator, scored the same way (the samples' lengths, blocks of the held-out plays)"]
            if "heldout_text" in results else []
        ),
        f"unigram entropy     {results['entropy']['mean']:.3f} nats",
        f"FLOPs saved         nominal {100 * flops['saved_nominal']:.1f}%, executed {100 * flops['saved_executed']:.1f}%",
        f"forwards per model  {results['forwards']}",
        f"sampling wall       {wall}",
    ]
    if "gen_ppl_paired_diff" in results:
        diff = results["gen_ppl_paired_diff"]
        lines.append(f"vs all-heavy        PPL {diff['mean']:+.2f} +- {diff['ci95']:.2f} (paired)")
        speedup = analysis or (
            f"{results['speedup_vs_all_heavy']:.2f}x for {100 * flops['saved_executed']:.1f}% of FLOPs saved "
            "(one timing of each arm after the same warm-up; experiments/benchmark.py repeats them)"
        )
        lines.append(f"wall speedup        {speedup}")
    print("\n".join(lines))
