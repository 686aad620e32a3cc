"""``run(cfg)``: sample with one policy, evaluate, and write results.json, samples.jsonl and the schedule.

With ``eval.compare_to_heavy`` the same seeds are also sampled all-heavy in the same process, which gives
paired quality differences and a wall-clock speedup measured under the same conditions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adasched.calibration import Calibratable, Calibration, calibrate, check_disjoint_seeds
from adasched.costs import CostMeter
from adasched.errors import ConfigError
from adasched.data_parallel import generate_data_parallel, predict_trainer, score_data_parallel
from adasched.evaluation import SampleScores, evaluate_samples, load_evaluator, sample_nll
from adasched.export import write_json_atomic
from adasched.generation import Generation, generate, validation_prompts
from adasched.models.family import load_family
from adasched.plots import plot_schedule
from adasched.run_logging import log_run, samples_table
from adasched.tokenizer import load_tokenizer
from policies import Policy, make_policy

BASELINE_POLICY = "static_heavy"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def prompts_for(cfg: DictConfig, tokenizer: Any, seeds: torch.Tensor) -> torch.Tensor | None:
    """Prefix mode: the first ``prefix_len`` tokens of held-out validation blocks, chosen by sample seed."""
    if cfg.sampling.prefix_len <= 0:
        return None
    datamodule = instantiate(cfg.data.module, corpus=instantiate(cfg.data.corpus), tokenizer=tokenizer)
    datamodule.setup()
    blocks = datamodule.blocks["validation"]["input_ids"][:]
    return validation_prompts(torch.as_tensor(blocks), seeds, cfg.sampling.prefix_len)


def parallel_trainer(cfg: DictConfig) -> L.Trainer | None:
    """The Lightning Trainer that spreads sampling and scoring over ``parallel.devices`` x ``num_nodes``
    processes, or None to run in this process (one device)."""
    if cfg.parallel.devices == 1 and cfg.parallel.num_nodes == 1:
        return None
    return predict_trainer(cfg.parallel.accelerator, cfg.parallel.devices, cfg.parallel.num_nodes)


def sample_with(
    cfg: DictConfig, policy: Policy, models: list, meter: CostMeter, prompts: torch.Tensor | None, trainer: L.Trainer | None = None
) -> Generation:
    """Sample i of the run has seed ``cfg.seed + i``, in one process or spread over the trainer's."""
    seeds = cfg.seed + torch.arange(cfg.sampling.num_samples)
    settings = dict(prompts=prompts, top_p=cfg.sampling.top_p, budget=policy.budget)
    arguments = (models, policy, seeds, cfg.sampling.batch_size, cfg.sampling.num_steps, cfg.sampling.seq_len, meter)
    if trainer is None:
        return generate(*arguments, **settings)
    return generate_data_parallel(trainer, *arguments, **settings)


def score(cfg: DictConfig, texts: list[str], evaluator: Any, evaluator_tokenizer: Any, trainer: L.Trainer | None = None) -> SampleScores:
    """The evaluator's per-sample NLL of ``texts``, in one process or spread over the trainer's."""
    if trainer is None:
        return sample_nll(texts, evaluator, evaluator_tokenizer, cfg.eval.batch_size, None, evaluator.device)
    return score_data_parallel(trainer, texts, evaluator, evaluator_tokenizer, cfg.eval.batch_size)


def calibrate_to_budget(cfg: DictConfig, label: str, policy: Policy, models: list) -> Calibration | None:
    """Fit a calibratable policy's knob to its budget on the calibration seeds (none of the evaluation's)."""
    if not isinstance(policy, Calibratable) or policy.budget is None:
        return None
    check_disjoint_seeds(cfg.seed, cfg.sampling.num_samples, cfg.calibration.seed, cfg.calibration.num_samples)
    print(f"calibrating {label} to save {policy.budget:.1%} of executed FLOPs on {cfg.calibration.num_samples} calibration samples")
    return calibrate(
        policy, models, cfg.calibration.num_samples, cfg.sampling.batch_size, cfg.calibration.seed,
        cfg.sampling.num_steps, cfg.sampling.seq_len, cfg.calibration.tolerance,
    )


def calibration_record(cfg: DictConfig, calibration: Calibration) -> dict[str, Any]:
    """What results.json keeps of a calibration: the knob found, its saving and every try, on which seeds."""
    return {
        "knob": calibration.knob, "saved_executed": calibration.saved_executed, "target": calibration.target,
        "seed": cfg.calibration.seed, "num_samples": cfg.calibration.num_samples, "tries": calibration.history,
    }


def decode(tokenizer: Any, generation: Generation) -> tuple[list[str], list[list[int]]]:
    """Texts of the generated part of every sample (the prompt, if any, is left out) and its token ids."""
    ids = generation.tokens[:, generation.prefix_len :].tolist()
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids], ids


def write_samples(path: Path, generation: Generation, texts: list[str], nll: list[float], tokenizer: Any) -> None:
    """samples.jsonl: one line per sample with its seed (rerun it alone with the same seed), atomically."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with partial.open("w", encoding="utf-8") as handle:
        for i, (seed, text) in enumerate(zip(generation.seeds.tolist(), texts)):
            row = {"seed": seed, "text": text, "nll": nll[i]}
            if generation.prefix_len:
                row["prompt"] = tokenizer.decode(generation.tokens[i, : generation.prefix_len].tolist())
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)


def run(cfg: DictConfig) -> dict[str, Any]:
    policy = instantiate(cfg.policy)  # first: a bad policy value fails before any model loads
    device = resolve_device(cfg.device)
    family_dir = Path(cfg.family.dir)
    members = list(cfg.family.members)
    models = [model.to(device) for model in load_family({name: family_dir / name for name in members}).values()]
    tokenizer = load_tokenizer(cfg.family.tokenizer)
    names, depths = members, [m.config.n_blocks for m in models]
    seeds = cfg.seed + torch.arange(cfg.sampling.num_samples)
    prompts = prompts_for(cfg, tokenizer, seeds)
    evaluator, evaluator_tokenizer = load_evaluator(cfg.eval.ppl_model, device, cfg.eval.tokenizer_path)
    calibration = calibrate_to_budget(cfg, cfg.policy.name, policy, models)
    trainer = parallel_trainer(cfg)

    def sample_and_decode(policy: Policy) -> tuple[Generation, CostMeter, list[str], list[list[int]]]:
        meter = CostMeter(names, depths)
        generation = sample_with(cfg, policy, models, meter, prompts, trainer)
        texts, ids = decode(tokenizer, generation)
        return generation, meter, texts, ids

    generation, meter, texts, ids = sample_and_decode(policy)
    baseline = None
    if cfg.eval.compare_to_heavy and cfg.policy.name != BASELINE_POLICY:
        baseline = sample_and_decode(make_policy(BASELINE_POLICY))
    baseline_nll = None
    if baseline is not None:
        baseline_nll = score(cfg, baseline[2], evaluator, evaluator_tokenizer, trainer).nll
    quality = evaluate_samples(score(cfg, texts, evaluator, evaluator_tokenizer, trainer), ids, baseline_nll)

    results: dict[str, Any] = {
        "policy": cfg.policy.name,
        "policy_config": {k: v for k, v in OmegaConf.to_container(cfg.policy, resolve=True).items() if k != "_target_"},
        "family": {"dir": str(family_dir), "members": names, "n_blocks": depths},
        "num_samples": cfg.sampling.num_samples,
        "seq_len": cfg.sampling.seq_len,
        "steps": cfg.sampling.num_steps,
        "prefix_len": cfg.sampling.prefix_len,
        "top_p": cfg.sampling.top_p,
        "seed": cfg.seed,
        "device": str(device),
        "processes": 1 if trainer is None else trainer.world_size,
        "evaluator": cfg.eval.ppl_model,
        **{key: value for key, value in quality.items() if key != "nll"},
        **meter.summary(),
        "wall_s": {"sampling": generation.wall_s},
    }
    if calibration is not None:
        results["calibration"] = calibration_record(cfg, calibration)
    if baseline is not None:
        results["wall_s"]["sampling_all_heavy"] = baseline[0].wall_s
        results["speedup_vs_all_heavy"] = baseline[0].wall_s / generation.wall_s
        results["wall_saved_vs_all_heavy"] = 1 - generation.wall_s / baseline[0].wall_s

    if trainer is not None and not trainer.is_global_zero:
        return results  # every process holds the whole run; one writes it
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "results.json", results)
    write_samples(run_dir / "samples.jsonl", generation, texts, quality["nll"], tokenizer)
    schedule_png = plot_schedule(generation.actions, names, f"{cfg.policy.name}: model per step", run_dir / "schedule.png")
    log_run(cfg, cfg.run_name, results, {"samples": samples_table(generation.seeds.tolist(), quality["nll"], texts)}, {"schedule": schedule_png})
    print_summary(results)
    return results


def print_summary(results: dict[str, Any]) -> None:
    ppl, flops = results["gen_ppl"], results["flops"]
    lines = [
        f"policy              {results['policy']}",
        f"samples             {results['num_samples']} x {results['seq_len']} tokens, {results['steps']} steps",
        f"gen PPL             {ppl['mean']:.2f} +- {ppl['ci95']:.2f} (95% CI)",
        f"unigram entropy     {results['entropy']['mean']:.3f} nats",
        f"FLOPs saved         nominal {100 * flops['saved_nominal']:.1f}%, executed {100 * flops['saved_executed']:.1f}%",
        f"forwards per model  {results['forwards']}",
        f"sampling wall       {results['wall_s']['sampling']:.1f} s",
    ]
    if "gen_ppl_paired_diff" in results:
        diff = results["gen_ppl_paired_diff"]
        lines.append(f"vs all-heavy        PPL {diff['mean']:+.2f} +- {diff['ci95']:.2f} (paired), wall speedup {results['speedup_vs_all_heavy']:.2f}x")
    print("\n".join(lines))
