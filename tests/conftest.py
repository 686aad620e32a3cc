"""Shared fixtures: a tiny random family and corpus (helpers the tests share are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from adasched.data.tokenizer import train_bpe
from adasched.models import DenoiserConfig, MDLMDenoiser

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's models are tiny: intra-op threads only add synchronization, which on a loaded 2-core machine
# made them ~40x slower. One thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """heavy (2 blocks) + light (1 block) denoisers, two more heavy seeds (heavy_seed1: path KL's floor;
    heavy_seed3: the floor routers learn the excess over), an evaluator and a tokenizer, all random and tiny."""
    root = tmp_path_factory.mktemp("family")
    tokenizer = train_bpe(["To be, or not to be, that is the question."] * 30, 300)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    for name, depth, seed in (("heavy", 2, 2), ("light", 1, 1), ("heavy_seed1", 2, 3), ("heavy_seed3", 2, 4)):
        torch.manual_seed(seed)
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
