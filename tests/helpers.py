"""Helpers the tests share (the fixtures live in conftest.py): configs composed as the entry points compose
them, and tiny random model families with their costs."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import adasched.cli  # noqa: F401  (registers the ${project_root:} resolver)
from adasched.analysis.step_statistics import rollout_records
from adasched.models import DenoiserConfig, MDLMDenoiser
from adasched.sampling.costs import CostMeter
from adasched.sampling.spec import SamplingSpec
from policies import kl_router, make_policy

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "configs"
SHIPPED = ROOT / "checkpoints" / "shakespeare"
VOCAB, MASK = 30, 29


TINY_MEMBERS = "family.members=[heavy,light]"  # the tiny family's members (the shipped family has three more)


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The entry point's config with ``overrides``; one that points ``family.dir`` at a tiny family and names no
    members gets the tiny family's two (``TINY_MEMBERS``)."""
    tiny = any(o.startswith("family.dir=") for o in overrides) and not any(o.startswith("family.members=") for o in overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=[*overrides, *([TINY_MEMBERS] if tiny else [])], return_hydra_config=False)


def family(depths: tuple[int, ...] = (3, 1), vocab: int = VOCAB, seq_len: int = 16, dtype: torch.dtype = torch.float64) -> list[MDLMDenoiser]:
    """Random denoisers with sharp, varied predictions (a stronger test of exactness than near-uniform ones)."""
    torch.manual_seed(0)
    members = []
    for depth in depths:
        config = DenoiserConfig(vocab_size=vocab, mask_token_id=vocab - 1, seq_len=seq_len, n_blocks=depth, d_model=32, n_heads=4)
        model = MDLMDenoiser(config).eval().to(dtype)
        torch.nn.init.normal_(model.head.weight, std=1.0)
        members.append(model)
    return members


def meter(models: list[MDLMDenoiser]) -> CostMeter:
    return CostMeter([f"m{i}" for i in range(len(models))], [m.config.n_blocks for m in models])


def fitted_kl_router(models: list[MDLMDenoiser], folder: Path, num_steps: int = 40, seq_len: int = 16) -> Path:
    """A KL router fitted (briefly) on all-heavy rollouts of ``models``, saved in ``folder``."""
    records = rollout_records(models, torch.arange(500, 508), SamplingSpec(num_steps, seq_len, 8), make_policy("static_heavy"), record_every=2)
    model, metadata = kl_router.fit(kl_router.examples(records.features, records.kl, len(models)), steps=100)
    kl_router.save(model, folder, len(models), metadata)
    return folder


def fit_kl_router_config(family_dir: Path, out_dir: Path, *overrides: str) -> DictConfig:
    """A fit_kl_router config that runs in seconds on the tiny family: 4 short trajectories, 20 fit steps."""
    return compose_config("fit_kl_router", [
        f"family.dir={family_dir}", "num_trajectories=4", "batch_size=4", "num_steps=20", "seq_len=16", "fit.steps=20", "device=cpu",
        f"out_dir={out_dir}", *overrides,
    ])


def tiny_train_config(tmp_path: Path, corpus: dict[str, str], model: str = "light", extra: list[str] | None = None) -> DictConfig:
    """A train config that runs in seconds: width 32, 1 block, 4 steps, own tiny tokenizer and cache."""
    overrides = [
        f"model={model}",
        "data=text_files",
        f"data.corpus.train_files=[{corpus['train']}]",
        f"data.corpus.validation_files=[{corpus['validation']}]",
        "data.seq_len=32",
        "data.module.batch_size=8",
        "tokenizer.vocab_size=300",
        f"tokenizer.path={tmp_path / 'tokenizer'}",
        f"paths.cache={tmp_path / 'cache'}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "logger.mode=disabled",
        "optim.warmup_steps=2",
        "optim.compile=false",  # compiling takes longer than these trainings; tested on its own
        "checkpoint_every_n_steps=2",
    ]
    if model == "ar_evaluator":
        overrides += ["model.net.n_layer=1", "model.net.n_embd=32", "model.net.n_head=2"]
    else:
        overrides += ["model.net.n_blocks=1", "model.net.d_model=32", "model.net.n_heads=2"]
    cfg = compose_config("train", overrides + (extra or []))
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
        cfg.export_dir = str(tmp_path / "export")
    return cfg


def sweep_config(family: Path, run_dir: Path, *overrides: str) -> DictConfig:
    cfg = compose_config(
        "sweep",
        [
            f"family.dir={family}", "sampling.num_samples=6", "sampling.batch_size=6", "sampling.num_steps=20",
            "sampling.seq_len=16", "eval.batch_size=6", "logger.mode=disabled", "device=cpu",
            "calibration.num_samples=6", "calibration.tolerance=0.03", *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        for name in ("kl_router", "kl_router_excess", "learned_router"):  # routers fitted to the shipped family, not the tiny one
            cfg.experiment.arms.pop(name, None)
    return cfg
