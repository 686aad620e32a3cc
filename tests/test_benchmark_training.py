"""The training benchmark on a tiny corpus and model: every (recipe, depth) cell timed, ratios to the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from adasched.errors import ConfigError
from adasched.jobs.benchmark_training import benchmark_training
from tests.helpers import compose_config


def tiny_config(tmp_path: Path, corpus: dict[str, str], *overrides: str) -> DictConfig:
    cfg = compose_config(
        "benchmark_training",
        [
            "data=text_files", f"data.corpus.train_files=[{corpus['train']}]", f"data.corpus.validation_files=[{corpus['validation']}]",
            "data.seq_len=32", "data.module.batch_size=8", "tokenizer.vocab_size=300", f"tokenizer.path={tmp_path / 'tokenizer'}",
            f"paths.cache={tmp_path / 'cache'}", "model.net.d_model=32", "model.net.n_heads=2", "depths=[1,2]",
            "recipes.new.compile=false",  # compilation outlasts a tiny benchmark; the recipe's other changes stay
            "warmup_steps=1", "timed_steps=3", *overrides,
        ],
    )
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    return cfg


def test_every_recipe_is_timed_at_every_depth(tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    from adasched.data.tokenizer import train_bpe

    train_bpe(Path(tiny_corpus["train"]).read_text().split("\n\n"), 300).save_pretrained(str(tmp_path / "tokenizer"))
    result = benchmark_training(tiny_config(tmp_path, tiny_corpus))
    written = json.loads((tmp_path / "run" / "benchmark_training.json").read_text())
    assert written["cells"] == result["cells"]
    assert {(c["recipe"], c["n_blocks"]) for c in result["cells"]} == {(r, d) for r in ("old", "new") for d in (1, 2)}
    for cell in result["cells"]:
        assert 3 * 8 * 32 - 32 < cell["timed_tokens"] <= 3 * 8 * 32 and cell["tokens_per_second"] > 0  # 3 steps of 8 x 32
        if cell["recipe"] == "old":
            assert cell["ratio_to_baseline"] == 1.0


def test_an_unknown_baseline_is_refused_by_name(tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="baseline='fast' is not a recipe"):
        benchmark_training(tiny_config(tmp_path, tiny_corpus, "baseline=fast"))


def test_a_recipe_missing_a_setting_is_refused_by_name(tmp_path: Path, tiny_corpus: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="recipes.quick lacks compile, fused_loop; a recipe sets each of"):
        benchmark_training(tiny_config(tmp_path, tiny_corpus, "+recipes.quick={precision: 32-true, dropout: 0.0}"))
