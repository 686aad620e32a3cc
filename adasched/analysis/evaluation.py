"""Evaluation of generated samples as in the MDLM paper family: generative perplexity and diversity.

Generative perplexity scores decoded samples under an independent autoregressive LM (the evaluator), so
models with different tokenizers or samplers are compared on the same footing; the diversity metrics
(unigram entropy, distinct-n) catch the low-entropy, repetitive samples that a low perplexity alone rewards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy.stats import t as student_t
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adasched.errors import ConfigError
from adasched.hub import cached_or_downloaded

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class SampleScores:
    """Per-text mean NLL (nats per scored token, float64) and the number of scored tokens (int64)."""

    nll: torch.Tensor
    tokens: torch.Tensor


def load_evaluator(
    name_or_path: str, device: torch.device | str, tokenizer_path: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM (hub name or local folder) in float32 and eval mode, with its tokenizer.

    The tokenizer comes from ``tokenizer_path`` when given, else from the model's own folder; a local model
    folder without tokenizer files (like the shipped ``ar_evaluator``) needs ``tokenizer_path``.
    """
    folder = Path(name_or_path)
    if tokenizer_path is None and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"evaluator folder {name_or_path} has no tokenizer; pass tokenizer_path (e.g. checkpoints/shakespeare/tokenizer)")
    model = cached_or_downloaded(AutoModelForCausalLM.from_pretrained, name_or_path, "evaluator")
    tokenizer = cached_or_downloaded(AutoTokenizer.from_pretrained, tokenizer_path or name_or_path, "evaluator tokenizer")
    return model.float().to(device).eval(), tokenizer


def _context_length(model: PreTrainedModel, max_length: int | None) -> int:
    """The longest input the evaluator takes: ``max_length``, else what its config allows."""
    config = model.config
    length = max_length or getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if length is None or length < 2:
        raise ConfigError(f"evaluator context max_length={length} is unusable; give max_length >= 2 (BOS plus one token)")
    return length


@dataclass(frozen=True)
class Window:
    """One evaluator input: [BOS] + context + the tokens it scores, which are the last ``scored`` ids."""

    owner: int  # index of the text the scored tokens belong to
    ids: list[int]
    scored: int


def _windows(texts: list[str], tokenizer: PreTrainedTokenizerBase, context: int, contexts: list[str] | None = None) -> list[Window]:
    """Each text's tokens cut into consecutive chunks, each after [BOS] and the text's context (if any).

    The BOS before each chunk lets every token of the text be scored. A chunk after the first restarts from
    BOS and the context, not from the earlier chunks (so long texts score slightly worse than under a sliding
    window, but every token is scored exactly once). A context (a prefix-mode prompt) conditions every chunk
    and is never scored itself; it keeps at most half the evaluator's window, its last tokens.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ConfigError("the evaluator tokenizer has neither a BOS nor an EOS token to start each text with")
    if contexts is not None and len(contexts) != len(texts):
        raise ConfigError(f"{len(contexts)} contexts for {len(texts)} texts; give one per text")
    prefixes = tokenizer(contexts, add_special_tokens=False)["input_ids"] if contexts is not None else [[] for _ in texts]
    windows = []
    for index, (ids, prefix) in enumerate(zip(tokenizer(texts, add_special_tokens=False)["input_ids"], prefixes)):
        if not ids:
            raise ConfigError(f"sample {index} is empty; the evaluator cannot score an empty text")
        prefix = prefix[len(prefix) - min(len(prefix), (context - 1) // 2) :]
        chunk = context - 1 - len(prefix)
        windows += [Window(index, [bos, *prefix, *ids[start : start + chunk]], len(ids[start : start + chunk])) for start in range(0, len(ids), chunk)]
    return windows


@torch.inference_mode()
def _window_nll_sums(model: PreTrainedModel, windows: list[Window], device: torch.device | str) -> torch.Tensor:
    """Summed NLL (float64) of the scored tokens of each window, as one right-padded batch."""
    length = max(len(w.ids) for w in windows)
    ids = torch.zeros(len(windows), length, dtype=torch.long)
    mask = torch.zeros(len(windows), length, dtype=torch.long)
    scored = torch.zeros(len(windows), length, dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, : len(window.ids)] = torch.tensor(window.ids)
        mask[row, : len(window.ids)] = 1
        scored[row, len(window.ids) - window.scored : len(window.ids)] = 1
    ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    token_logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(token_logp.double() * scored[:, 1:]).sum(-1).cpu()


def sample_nll(
    texts: list[str],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_length: int | None,
    device: torch.device | str,
    contexts: list[str] | None = None,
) -> SampleScores:
    """Mean NLL per token of each decoded text under the evaluator, retokenized with its own tokenizer;
    with ``contexts`` (prefix mode's prompts) each text is scored as the continuation of its context.

    ``max_length`` (default: the model's context) bounds each window; longer texts are split as in ``_windows``
    and their NLL is averaged over all their tokens.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    windows = _windows(texts, tokenizer, _context_length(model, max_length), contexts)
    sums = torch.zeros(len(texts), dtype=torch.float64)
    tokens = torch.zeros(len(texts), dtype=torch.long)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        owner = torch.tensor([window.owner for window in batch])
        sums.index_add_(0, owner, _window_nll_sums(model, batch, device))
        tokens.index_add_(0, owner, torch.tensor([window.scored for window in batch]))
    return SampleScores(nll=sums / tokens, tokens=tokens)


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval, t_{0.975, n-1} * std / sqrt(n).

    Student's t rather than the normal 1.96 because sample sets can be small. Needs at least two values.
    """
    values = values.double().flatten()
    if values.numel() < 2:
        raise ConfigError(f"a 95% interval needs at least 2 values, got {values.numel()}")
    half_width = student_t.ppf(0.975, values.numel() - 1) * values.std().item() / math.sqrt(values.numel())
    return values.mean().item(), half_width


def paired_difference(values: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% half-width of ``values - baseline`` paired by index (same prompts / seeds): much tighter
    than comparing two independent intervals when the pairs are correlated."""
    if values.shape != baseline.shape:
        raise ConfigError(f"paired values have shape {tuple(values.shape)} but the baseline {tuple(baseline.shape)}")
    return mean_ci95(values.double() - baseline.double())


def unigram_entropy(token_ids: list[list[int]]) -> torch.Tensor:
    """Entropy (nats, float64) of each sample's own token histogram: the MDLM / ReMDM diversity measure,
    which drops when a sampler collapses onto repeated tokens."""
    entropies = torch.zeros(len(token_ids), dtype=torch.float64)
    for index, ids in enumerate(token_ids):
        if not ids:
            raise ConfigError(f"sample {index} has no tokens; its unigram entropy is undefined")
        p = torch.unique(torch.tensor(ids), return_counts=True)[1].double() / len(ids)
        entropies[index] = -(p * p.log()).sum()
    return entropies


def distinct_n(token_ids: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams of all samples (n-grams do not cross samples); 0.0 when there are none."""
    if n < 1:
        raise ConfigError(f"distinct-n needs n >= 1, got n={n}")
    ngrams = [tuple(ids[i : i + n]) for ids in token_ids for i in range(len(ids) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def evaluate_samples(scores: SampleScores, token_ids: list[list[int]], baseline_nll: torch.Tensor | None = None) -> dict[str, Any]:
    """JSON-ready metrics of one sample set: the evaluator's ``scores`` of the decoded texts (``sample_nll``),
    ``token_ids`` (the generator's own ids) for diversity; ``baseline_nll`` (per-sample, same order) adds the
    paired perplexity difference."""
    if len(scores.nll) != len(token_ids):
        raise ConfigError(f"{len(scores.nll)} scores but {len(token_ids)} token id lists; they must be the same samples")
    perplexity = scores.nll.exp()
    ppl_mean, ppl_ci = mean_ci95(perplexity)
    corpus_nll = (scores.nll * scores.tokens).sum() / scores.tokens.sum()
    entropy_mean, entropy_ci = mean_ci95(unigram_entropy(token_ids))
    result: dict[str, Any] = {
        "gen_ppl": {"mean": ppl_mean, "ci95": ppl_ci, "corpus": corpus_nll.exp().item()},
        "nll": scores.nll.tolist(),
        "entropy": {"mean": entropy_mean, "ci95": entropy_ci},
        "distinct": {str(n): distinct_n(token_ids, n) for n in (1, 2, 3, 4)},
    }
    if baseline_nll is not None:
        diff_mean, diff_ci = paired_difference(perplexity, baseline_nll.double().exp())
        result["gen_ppl_paired_diff"] = {"mean": diff_mean, "ci95": diff_ci}
    return result
