"""Shared fixtures: tiny configs composed exactly as the entry points compose them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from transformers import GPT2Config, GPT2LMHeadModel

import adasched.cli  # noqa: F401  (registers the ${project_root:} resolver)
from adasched.models import DenoiserConfig, MDLMDenoiser
from adasched.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "configs"
SHIPPED = ROOT / "checkpoints" / "shakespeare"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's models are tiny: intra-op threads only add synchronization, which on a loaded 2-core machine
# made them ~40x slower. One thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=False)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """heavy (2 blocks) + light (1 block) denoisers, an evaluator and a tokenizer, all random and tiny."""
    root = tmp_path_factory.mktemp("family")
    tokenizer = train_bpe(["To be, or not to be, that is the question."] * 30, 300)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    for name, depth in (("heavy", 2), ("light", 1)):
        torch.manual_seed(depth)
        config = DenoiserConfig(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, seq_len=16, n_blocks=depth, d_model=32, n_heads=2)
        MDLMDenoiser(config).save_pretrained(str(root / name))
    evaluator = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_layer=1, n_embd=16, n_head=2))
    evaluator.save_pretrained(str(root / "ar_evaluator"))
    return root


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> dict[str, str]:
    """Two small text files (train / validation) with paragraphs, like the Shakespeare texts."""
    lines = [f"Speaker {i}.\nThe quick brown fox {i} jumps over the lazy dog {i % 7}." for i in range(300)]
    train = tmp_path / "train.txt"
    valid = tmp_path / "valid.txt"
    train.write_text("\n\n".join(lines[:260]), encoding="utf-8")
    valid.write_text("\n\n".join(lines[260:]), encoding="utf-8")
    return {"train": str(train), "validation": str(valid)}


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
