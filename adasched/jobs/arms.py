"""Evaluating one policy (an "arm") on a run's seeds: the code ``run`` and every arm of ``sweep`` share.

An arm is calibrated to its budget (if it has one), sampled on the run's seeds, decoded, scored by the
evaluator and summarized in one record: quality (with paired differences to a reference arm when given),
costs and wall clock. Every arm of a process runs after the same warm-up, so their wall clocks compare. A router
is never judged by the seed baseline it learned against (``check_judged_by_another_seed``). A policy gets the
family through ``Policy.bind`` before it calibrates; an analysis-only one (the oracle) runs it to decide, so its
record has no wall clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from adasched.analysis.evaluation import (
    SampleScores,
    evaluate_samples,
    load_evaluator,
    mean_ci95,
    sample_nll,
)
from adasched.analysis.path_kl import forward_flops, path_kl
from adasched.analysis.plots import plot_path_kl_per_step, plot_schedule
from adasched.analysis.schedule_profile import member_shares, saving_by_quarter
from adasched.data.tokenizer import load_tokenizer
from adasched.compute import resolve_device, resolve_precision
from adasched.errors import ConfigError
from adasched.io import write_text_atomic
from adasched.models.dit import MDLMDenoiser
from adasched.models.family import HUB_PREFIX, LIGHTNING_PREFIX, denoiser_names, load_family
from adasched.parallel import generate_data_parallel, score_data_parallel
from adasched.sampling.calibration import (
    Calibratable,
    Calibration,
    calibrate,
    check_disjoint_seeds,
)
from adasched.sampling.costs import CostMeter
from adasched.sampling.generation import Generation, generate, validation_prompts
from adasched.sampling.policy import Policy
from adasched.sampling.spec import SamplingSpec


def sampling_precision(cfg: DictConfig) -> str:
    """``sampling.precision`` with ``auto`` resolved for the run's device: what the samples were computed in."""
    return resolve_precision(cfg.sampling.precision, resolve_device(cfg.device))


def sampling_spec(cfg: DictConfig) -> SamplingSpec:
    """The ``sampling`` config group as a checked ``SamplingSpec`` (fails before any model loads)."""
    sampling = cfg.sampling
    return SamplingSpec(num_steps=sampling.num_steps, seq_len=sampling.seq_len, batch_size=sampling.batch_size, top_p=sampling.top_p)


def evaluation_seeds(cfg: DictConfig) -> torch.Tensor:
    """Sample i of a run has seed ``cfg.seed + i`` under every policy (common random numbers)."""
    return cfg.seed + torch.arange(cfg.sampling.num_samples)


@dataclass
class ArmSetting:
    """What every arm of a run or a sweep shares: the family, the evaluator, the seeds and how to sample."""

    cfg: DictConfig
    names: list[str]
    models: list[MDLMDenoiser]
    tokenizer: Any
    evaluator: Any
    evaluator_tokenizer: Any
    spec: SamplingSpec
    seeds: torch.Tensor
    prompts: torch.Tensor | None
    seed_baseline: MDLMDenoiser | None = None  # path KL's floor: a heavy from another seed, never a policy's choice
    trainer: L.Trainer | None = None  # data-parallel sampling and scoring; None: this process only

    @property
    def depths(self) -> list[int]:
        return [m.config.n_blocks for m in self.models]


def heldout_blocks(cfg: DictConfig, tokenizer: Any, seeds: torch.Tensor) -> torch.Tensor:
    """One held-out validation block of the samples' length per sample, chosen by its seed (N, seq_len)."""
    datamodule = instantiate(cfg.data.module, corpus=instantiate(cfg.data.corpus), tokenizer=tokenizer, seq_len=cfg.sampling.seq_len)
    datamodule.setup()
    blocks = datamodule.blocks["validation"]["input_ids"][:]
    return validation_prompts(torch.as_tensor(blocks), seeds, cfg.sampling.seq_len)


def prompts_for(cfg: DictConfig, tokenizer: Any, seeds: torch.Tensor) -> torch.Tensor | None:
    """Prefix mode: the first ``prefix_len`` tokens of each sample's held-out block."""
    if cfg.sampling.prefix_len <= 0:
        return None
    return heldout_blocks(cfg, tokenizer, seeds)[:, : cfg.sampling.prefix_len]


@torch.inference_mode()
def warm_up(models: list[MDLMDenoiser], spec: SamplingSpec) -> None:
    """One untimed forward of every model at the run's batch shape, so no arm pays for first-call setup."""
    for model in models:
        device = next(model.parameters()).device
        z = torch.full((spec.batch_size, spec.seq_len), model.config.mask_token_id, device=device)
        model.project(model.hidden_states(z, torch.ones(spec.batch_size, device=device))[:, :1])


def check_seed_baseline(key: str, name: str, family_dir: str, otherwise: str) -> None:
    """A seed baseline (``key=name``) must name a model folder of the family (or an MDLM source), so a typo fails
    before any model loads; ``otherwise`` says how to go without one."""
    if name.startswith((HUB_PREFIX, LIGHTNING_PREFIX)):
        return
    available = denoiser_names(Path(family_dir))
    if name not in available:
        raise ConfigError(
            f"{key}={name!r} names no denoiser folder in {family_dir}; choose from: "
            f"{', '.join(available) or 'none (no denoiser folders there)'}, or {otherwise}"
        )


def seed_baseline_name(cfg: DictConfig) -> str | None:
    """``eval.seed_baseline`` where path KL is measured, checked; None where no floor is measured."""
    name = cfg.eval.seed_baseline if cfg.eval.path_kl else None
    if name is not None:
        check_seed_baseline("eval.seed_baseline", name, cfg.family.dir, "pass eval.seed_baseline=null to measure path KL without its floor")
    return name


def training_seed_baseline(options: DictConfig, prefix: str, family_dir: str) -> str | None:
    """The seed baseline a router's ``excess`` objective subtracts (``<prefix>seed_baseline``), checked before any
    model loads; None for ``raw``, which learns path KL itself. ``options`` holds ``objective`` and ``seed_baseline``."""
    if options.objective == "raw":
        return None
    otherwise = f"pass {prefix}objective=raw to learn path KL itself"
    if options.seed_baseline is None:
        raise ConfigError(f"{prefix}objective=excess subtracts a seed baseline's increment: set {prefix}seed_baseline to a heavy from another seed, or {otherwise}")
    check_seed_baseline(f"{prefix}seed_baseline", options.seed_baseline, family_dir, otherwise)
    return options.seed_baseline


def check_judged_by_another_seed(cfg: DictConfig, label: str, policy: Policy) -> None:
    """Refuse, before any model loads, to judge a router by the seed baseline it was fitted or trained against: its
    excess over that floor is what it learned to minimize, so the run's excess would flatter it."""
    judge = cfg.eval.seed_baseline if cfg.eval.path_kl else None
    if judge is None or policy.trained_against != judge:
        return
    other = cfg.family.seed_baseline if cfg.family.seed_baseline not in (None, judge) else "<a heavy from another seed>"
    raise ConfigError(
        f"policy {label} was trained against {judge}; judge it with another seed baseline (eval.seed_baseline={other}) or eval.seed_baseline=null"
    )


def check_trained_members(cfg: DictConfig, label: str, policy: Policy) -> None:
    """Refuse, before any model loads, a router whose members are not the family's first ones: its action m means
    the m-th member it was trained on."""
    trained = policy.trained_members
    if trained is None or tuple(cfg.family.members[: len(trained)]) == trained:
        return
    raise ConfigError(
        f"policy {label} chooses among the members it was trained on, [{', '.join(trained)}], but family.members is "
        f"[{', '.join(cfg.family.members)}]; pass family.members=[{','.join(trained)}] (more members may follow)"
    )


def check_decision_baseline(cfg: DictConfig, prefix: str, policy: Policy) -> None:
    """The seed baseline a policy runs to decide (the oracle's, ``<prefix>seed_baseline``) must name a model folder of
    the family: a typo fails before any model loads."""
    if policy.decision_baseline is not None:
        otherwise = f"pass {prefix}objective=raw to decide on path KL itself"
        check_seed_baseline(f"{prefix}seed_baseline", policy.decision_baseline, cfg.family.dir, otherwise)


def load_members(
    family_dir: str, members: list[str], seed_baseline: str | None, precision: str, device: torch.device
) -> tuple[list[MDLMDenoiser], MDLMDenoiser | None]:
    """The members in order and the seed baseline, on ``device``: checked as one family (its floor is measured at
    the members' tokens), the baseline loaded once where it is also a member."""
    paths = {name: Path(family_dir) / name for name in members}
    if seed_baseline is not None:
        paths[seed_baseline] = Path(family_dir) / seed_baseline
    loaded = load_family(paths, precision)
    return [loaded[name].to(device) for name in members], None if seed_baseline is None else loaded[seed_baseline].to(device)


def load_setting(cfg: DictConfig, trainer: L.Trainer | None = None) -> ArmSetting:
    """Load the family (and the seed baseline, as its members load), tokenizer, evaluator and prompts once;
    warm the models up."""
    baseline = seed_baseline_name(cfg)
    spec, seeds = sampling_spec(cfg), evaluation_seeds(cfg)
    device = resolve_device(cfg.device)
    names = list(cfg.family.members)
    precision = sampling_precision(cfg)
    print(f"sampling precision: {precision}" + (f" ({cfg.sampling.precision}: chosen for {device})" if precision != cfg.sampling.precision else ""))
    models, seed_baseline = load_members(cfg.family.dir, names, baseline, precision, device)
    tokenizer = load_tokenizer(cfg.family.tokenizer)
    prompts = prompts_for(cfg, tokenizer, seeds)
    spec.check(models, prompts)
    evaluator, evaluator_tokenizer = load_evaluator(cfg.eval.ppl_model, device, cfg.eval.tokenizer_path)
    warm_up(models, spec)
    return ArmSetting(cfg, names, models, tokenizer, evaluator, evaluator_tokenizer, spec, seeds, prompts, seed_baseline, trainer)


def bind(setting: ArmSetting, policy: Policy) -> None:
    """Hand ``policy`` the family, how it samples and the seed baseline it decides against (if it names one), that
    baseline loaded with the members as one family (the members load again only to check it against them)."""
    baseline = None
    if policy.decision_baseline is not None:
        cfg, device = setting.cfg, next(setting.models[0].parameters()).device
        _, baseline = load_members(cfg.family.dir, setting.names, policy.decision_baseline, sampling_precision(cfg), device)
    policy.bind(setting.models, setting.spec, baseline)


def calibrate_to_budget(setting: ArmSetting, label: str, policy: Policy) -> Calibration | None:
    """Fit a calibratable policy's knob to its budget on the calibration seeds (none of the evaluation's), each
    continuing a held-out prompt in prefix mode as the evaluation's samples do."""
    cfg = setting.cfg
    if not isinstance(policy, Calibratable) or policy.budget is None:
        return None
    check_disjoint_seeds(cfg.seed, cfg.sampling.num_samples, cfg.calibration.seed, cfg.calibration.num_samples)
    print(f"calibrating {label} to save {policy.budget:.1%} of executed FLOPs on {cfg.calibration.num_samples} calibration samples")
    seeds = cfg.calibration.seed + torch.arange(cfg.calibration.num_samples)
    prompts = prompts_for(cfg, setting.tokenizer, seeds)
    return calibrate(policy, setting.models, seeds, setting.spec, cfg.calibration.tolerance, prompts=prompts)


def calibration_record(cfg: DictConfig, calibration: Calibration) -> dict[str, Any]:
    """What a record keeps of a calibration: the knob found, its saving and every try with its sampling time
    (how many tries a budget took, and what they cost), on which seeds."""
    return {
        "knob": calibration.knob, "saved_executed": calibration.saved_executed, "target": calibration.target,
        "seed": cfg.calibration.seed, "num_samples": cfg.calibration.num_samples,
        "tries": [{"knob": t.knob, "saved_executed": t.saved, "seconds": t.seconds} for t in calibration.history],
        "seconds": sum(t.seconds for t in calibration.history),
    }


@dataclass
class Decoded:
    """The generated part of every sample as text and token ids, and its prompt's text (prefix mode)."""

    texts: list[str]
    ids: list[list[int]]
    prompts: list[str] | None


def decode(tokenizer: Any, tokens: torch.Tensor, prefix_len: int) -> Decoded:
    """Texts and ids of every sequence after its first ``prefix_len`` tokens (the prompt) and, in prefix mode, the prompts' texts."""
    ids = tokens[:, prefix_len:].tolist()
    prompts = None
    if prefix_len:
        prompts = [tokenizer.decode(row, skip_special_tokens=True) for row in tokens[:, :prefix_len].tolist()]
    return Decoded([tokenizer.decode(row, skip_special_tokens=True) for row in ids], ids, prompts)


def score(setting: ArmSetting, decoded: Decoded) -> SampleScores:
    """The evaluator's per-sample NLL of the generated texts (continuations of their prompts in prefix mode),
    in one process or spread over the trainer's."""
    cfg = setting.cfg
    if setting.trainer is None:
        return sample_nll(decoded.texts, setting.evaluator, setting.evaluator_tokenizer, cfg.eval.batch_size, None, setting.evaluator.device, decoded.prompts)
    return score_data_parallel(setting.trainer, decoded.texts, setting.evaluator, setting.evaluator_tokenizer, cfg.eval.batch_size, decoded.prompts)


def heldout_text_record(setting: ArmSetting) -> dict[str, Any]:
    """The evaluator's perplexity of held-out text, scored exactly as the samples are: each sample's held-out
    block (in prefix mode the rest of the block its prompt came from), decoded and scored the same way. It is
    what a sampler that had learned the corpus perfectly would get: the mark to read gen PPL against."""
    blocks = heldout_blocks(setting.cfg, setting.tokenizer, setting.seeds)
    decoded = decode(setting.tokenizer, blocks, setting.cfg.sampling.prefix_len)
    quality = evaluate_samples(score(setting, decoded), decoded.ids)
    return {"gen_ppl": quality["gen_ppl"], "entropy": quality["entropy"], "num_texts": len(decoded.texts)}


def write_samples(path: Path, generation: Generation, decoded: Decoded, nll: list[float]) -> None:
    """samples.jsonl: one line per sample with its seed (rerun it alone with the same seed), atomically."""
    lines = []
    for i, (seed, text) in enumerate(zip(generation.seeds.tolist(), decoded.texts)):
        row = {"seed": seed, "text": text, "nll": nll[i]}
        if decoded.prompts is not None:
            row["prompt"] = decoded.prompts[i]
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text_atomic(path, "".join(lines))


PER_SAMPLE_KEYS = ("seeds", "nll", "path_kl_per_sample", "path_kl_excess_per_sample")  # kept for pairing, left out of summaries


def kl_summary(per_sample: torch.Tensor, per_step: torch.Tensor, generated_tokens: int) -> dict[str, Any]:
    """Mean and 95% interval per sequence and per generated token, and the mean over samples per step (nats)."""
    per_sequence, per_token = mean_ci95(per_sample), mean_ci95(per_sample / generated_tokens)
    return {
        "per_sequence": {"mean": per_sequence[0], "ci95": per_sequence[1]},
        "per_token": {"mean": per_token[0], "ci95": per_token[1]},
        "per_step": per_step.div(len(per_sample)).tolist(),
    }


def path_kl_record(setting: ArmSetting, generation: Generation) -> dict[str, Any]:
    """Path KL to the all-heavy sampler: per sample (for paired differences), summarized by ``kl_summary``, and the
    evaluation forwards' FLOPs. With a seed baseline also its floor and the excess over it (path KL minus the floor,
    per sample, paired like path KL), summarized alike: what the policy loses beyond being another good network."""
    measured = path_kl(
        setting.models, generation.tokens, generation.reveal_step, generation.actions, setting.spec.top_p, setting.spec.batch_size,
        setting.seed_baseline,
    )
    summary = kl_summary(measured.per_sample, measured.per_step, measured.generated_tokens) | {"eval_flops": measured.eval_flops}
    record = {"path_kl": summary, "path_kl_per_sample": measured.per_sample.tolist()}
    if measured.floor_per_sample is not None:
        excess = measured.per_sample - measured.floor_per_sample
        floor = kl_summary(measured.floor_per_sample, measured.floor_per_step, measured.generated_tokens)
        summary["floor"] = {"seed_baseline": setting.cfg.eval.seed_baseline, **floor}
        summary["excess"] = kl_summary(excess, measured.per_step - measured.floor_per_step, measured.generated_tokens)
        record["path_kl_excess_per_sample"] = excess.tolist()
    return record


@dataclass
class ArmOutcome:
    record: dict[str, Any]  # label, policy, seeds, quality (per-sample nll included), costs, wall clock, calibration
    generation: Generation
    texts: list[str]


def schedule_record(setting: ArmSetting, generation: Generation) -> dict[str, Any]:
    """Where along the trajectory the run saved (per quarter of the steps) and each member's share of its decisions."""
    length = setting.spec.seq_len
    trunk = [forward_flops(model, 1, 0, length) for model in setting.models]
    projection = [forward_flops(model, 0, 1, length) for model in setting.models]
    return {
        "saved_by_quarter": saving_by_quarter(generation.actions, generation.reveal_step, trunk, projection),
        "member_shares": dict(zip(setting.names, member_shares(generation.actions, len(setting.models)))),
    }


def evaluate_arm(
    setting: ArmSetting, label: str, policy: Policy, reference_nll: torch.Tensor | None = None,
    samples_path: Path | None = None, schedule_path: Path | None = None,
) -> ArmOutcome:
    """Bind, calibrate, sample, score and summarize one arm; writes its samples and schedule figure where asked.

    An analysis-only policy's record says so and holds no wall clock: its sampling ran its own evaluation forwards.
    """
    bind(setting, policy)
    calibration = calibrate_to_budget(setting, label, policy)
    meter = CostMeter(setting.names, setting.depths)
    if setting.trainer is None:
        generation = generate(setting.models, policy, setting.seeds, setting.spec, meter, prompts=setting.prompts)
    else:
        generation = generate_data_parallel(setting.trainer, setting.models, policy, setting.seeds, setting.spec, meter, prompts=setting.prompts)
    decoded = decode(setting.tokenizer, generation.tokens, generation.prefix_len)
    quality = evaluate_samples(score(setting, decoded), decoded.ids, reference_nll)
    record: dict[str, Any] = {
        "label": label, "policy": policy.name, "analysis_only": policy.analysis_only, "seeds": generation.seeds.tolist(), **quality,
        **meter.summary(), **({} if policy.analysis_only else {"wall_s": {"sampling": generation.wall_s}}),
    }
    record |= schedule_record(setting, generation)
    if setting.cfg.eval.path_kl:
        record |= path_kl_record(setting, generation)
    if calibration is not None:
        record["calibration"] = calibration_record(setting.cfg, calibration)
    if samples_path is not None:
        write_samples(samples_path, generation, decoded, quality["nll"])
    if schedule_path is not None:
        if "path_kl" in record:
            plot_path_kl_per_step([record], schedule_path.with_name(f"{schedule_path.stem}_path_kl.png"))
        shown = min(32, generation.actions.shape[1])
        plot_schedule(generation.actions, setting.names, f"{label}: model per step ({shown} of {generation.actions.shape[1]} samples)", schedule_path)
    return ArmOutcome(record, generation, decoded.texts)
