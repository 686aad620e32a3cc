"""Data pipelines: blocks of the right length, no token lost at block edges, local stand-ins for hub data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from adasched.data.corpus import (
    HubCorpus,
    ShakespeareCorpus,
    TextDataModule,
    TextFilesCorpus,
    pack_blocks,
    tokenize_documents,
)
from adasched.data.tokenizer import load_or_train_tokenizer, special_ids, train_bpe
from adasched.errors import ConfigError, DataUnavailableError
from tests.helpers import SHIPPED, compose_config


def test_pack_blocks_keeps_every_token_in_order() -> None:
    rng = np.random.default_rng(0)
    documents = [list(rng.integers(1, 50, size=n)) for n in rng.integers(1, 40, size=30)]
    blocks = list(pack_blocks(iter(documents), seq_len=16, pad_id=0))
    assert all(len(b["input_ids"]) == 16 and len(b["attention_mask"]) == 16 for b in blocks)
    kept = np.concatenate([b["input_ids"][b["attention_mask"] == 1] for b in blocks])
    assert kept.tolist() == [token for document in documents for token in document]
    assert all(b["attention_mask"].all() for b in blocks[:-1])  # only the last block is padded


def test_shakespeare_blocks_wrap_the_tokenized_plays_exactly(tmp_path: Path) -> None:
    corpus = ShakespeareCorpus(["hamlet", "macbeth", "tempest", "twelfth_night"])
    tokenizer = load_or_train_tokenizer("bpe", SHIPPED / "tokenizer", 4096, None)
    module = TextDataModule(corpus, tokenizer, seq_len=128, batch_size=4, separator="\n\n", cache_dir=str(tmp_path))
    module.setup()
    validation = module.blocks["validation"]
    assert validation[0]["input_ids"].shape == (128,)
    stream = torch.cat([row["input_ids"][row["attention_mask"] == 1] for row in validation])
    expected = [t for ids in tokenize_documents(corpus.load()["validation"], tokenizer, "\n\n")["input_ids"] for t in ids]
    assert stream.tolist() == expected
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == (4, 128)
    assert 5 * validation.num_rows < module.blocks["train"].num_rows  # four held-out plays: about a tenth


def test_play_split_is_disjoint_and_rejects_unknown_plays() -> None:
    files = ShakespeareCorpus(["hamlet"]).files()
    assert any("hamlet" in f for f in files["validation"]) and not any("hamlet" in f for f in files["train"])
    with pytest.raises(ConfigError, match="unknown play 'hamlett'"):
        ShakespeareCorpus(["hamlett"]).files()


def test_text_files_corpus_and_missing_files(tmp_corpus_files: dict[str, str]) -> None:
    corpus = TextFilesCorpus([tmp_corpus_files["train"]], validation_fraction=0.1)
    splits = corpus.load()
    assert splits["train"].num_rows > splits["validation"].num_rows > 0
    with pytest.raises(ConfigError, match="corpus file not found: nowhere.txt"):
        TextFilesCorpus(["nowhere.txt"])


@pytest.fixture
def tmp_corpus_files(tiny_corpus: dict[str, str]) -> dict[str, str]:
    return tiny_corpus


def test_hub_corpus_loads_a_local_copy_with_the_owt_split(tmp_path: Path) -> None:
    folder = tmp_path / "openwebtext"
    folder.mkdir()
    rows = [{"text": f"document number {i} about nothing in particular."} for i in range(50)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    corpus = HubCorpus(name="openwebtext", path=str(folder), validation_split=None, validation_size=5)
    splits = corpus.load()
    assert splits["train"].num_rows == 45 and splits["validation"]["text"][0] == rows[45]["text"]
    tokenizer = load_or_train_tokenizer("gpt2", None, 50258, None)
    module = TextDataModule(corpus, tokenizer, seq_len=8, batch_size=2, separator="eos", cache_dir=str(tmp_path / "cache"))
    module.setup()
    stream = torch.cat([row["input_ids"][row["attention_mask"] == 1] for row in module.blocks["validation"]])
    eos, _ = special_ids(tokenizer)
    assert (stream == eos).sum() == 5  # one separator after each validation document


def test_hub_dataset_unreachable_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = HubCorpus(name="openwebtext", path="Skylion007/openwebtext", validation_split=None)
    with pytest.raises(DataUnavailableError) as error:
        corpus.load()
    message = str(error.value)
    assert "Skylion007/openwebtext" in message and "\n" not in message and "data.corpus.path" in message


@pytest.mark.parametrize("name", ["shakespeare", "openwebtext", "lm1b", "text_files"])
def test_every_data_config_composes(name: str) -> None:
    cfg = compose_config("train", [f"data={name}"])
    assert cfg.data.module.seq_len == cfg.data.seq_len


def test_a_block_cache_is_built_by_one_process_at_a_time(tmp_path: Path, tiny_corpus: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two trainings started together must not build (and delete) the same cache under each other: while one
    builds, another process cannot take the cache's lock, so it waits and then reads the finished blocks."""
    corpus = TextFilesCorpus([tiny_corpus["train"]], validation_files=[tiny_corpus["validation"]])
    tokenizer = train_bpe(["The quick brown fox jumps over the lazy dog."] * 20, 300)
    cache = tmp_path / "cache"
    held_during_builds = []
    build = Dataset.from_generator

    def build_while_probing(*args: object, **kwargs: object) -> Dataset:
        locks = [str(path) for path in (cache / corpus.name).glob("blocks-*.lock")]
        probe = (
            "import sys; from filelock import FileLock, Timeout\nheld = 0\nfor path in sys.argv[1:]:\n"
            " try:\n  FileLock(path).acquire(timeout=0)\n except Timeout:\n  held += 1\nprint(held)"
        )
        held_during_builds.extend(subprocess.run([sys.executable, "-c", probe, *locks], capture_output=True, text=True, check=True).stdout.split())
        return build(*args, **kwargs)

    monkeypatch.setattr(Dataset, "from_generator", build_while_probing)
    module = TextDataModule(corpus, tokenizer, seq_len=16, batch_size=2, separator="\n\n", cache_dir=str(cache))
    module.setup()
    assert held_during_builds == ["1", "1"]  # each split was built under its own lock, which no other process could take
    assert not list((cache / corpus.name).glob("generator*"))  # the scratch folders are gone
    assert module.blocks["train"].num_rows > 0
