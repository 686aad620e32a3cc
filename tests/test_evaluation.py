"""Sample evaluation: generative perplexity against a hand loop, windows, diversity, intervals, one-line errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from adasched.analysis.evaluation import (
    distinct_n,
    evaluate_samples,
    load_evaluator,
    mean_ci95,
    paired_difference,
    sample_nll,
    unigram_entropy,
)
from adasched.data.tokenizer import train_bpe
from adasched.errors import ConfigError, DataUnavailableError

CONTEXT = 16
TEXTS = ["the cat sat", "on the mat, the dog sat by the door", "a fox"]
LONG_TEXT = " ".join(f"the cat {i} sat on the mat" for i in range(12))


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny GPT-2 (context 16) saved without a tokenizer, and a BPE saved in its own folder, like the shipped pair."""
    root = tmp_path_factory.mktemp("evaluator")
    tokenizer = train_bpe(["the cat sat on the mat, the dog sat by the door, a fox 0123456789"] * 20, 300)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=CONTEXT)
    GPT2LMHeadModel(config).save_pretrained(str(root / "model"))
    return root / "model", root / "tokenizer"


@pytest.fixture(scope="module")
def loaded(evaluator: tuple[Path, Path]):
    model_dir, tokenizer_dir = evaluator
    return load_evaluator(str(model_dir), "cpu", tokenizer_path=str(tokenizer_dir))


def hand_nll(model, tokenizer, ids: list[int]) -> torch.Tensor:
    """Summed NLL of ``ids`` after a BOS (the tokenizer's EOS), by a direct forward pass."""
    x = torch.tensor([[tokenizer.eos_token_id, *ids]])
    with torch.no_grad():
        logp = model(x).logits[0, :-1].log_softmax(-1)
    return -logp.gather(-1, x[0, 1:, None]).sum().double()


def test_load_evaluator_gives_a_float32_model_in_eval_mode(loaded) -> None:
    model, tokenizer = loaded
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is not None  # exercises the EOS fallback


def test_sample_nll_equals_a_hand_loop_with_the_bos_prefix(loaded) -> None:
    model, tokenizer = loaded
    ids = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    assert 1 < len(ids) < CONTEXT
    scores = sample_nll([TEXTS[1]], model, tokenizer, 1, None, "cpu")
    assert scores.nll.dtype == torch.float64 and scores.nll.shape == (1,)
    assert scores.tokens.tolist() == [len(ids)]
    assert scores.nll.item() == pytest.approx((hand_nll(model, tokenizer, ids) / len(ids)).item(), abs=1e-5)


def test_batching_and_padding_do_not_change_scores(loaded) -> None:
    model, tokenizer = loaded
    one = sample_nll(TEXTS, model, tokenizer, 1, None, "cpu")
    three = sample_nll(TEXTS, model, tokenizer, 3, None, "cpu")
    assert len({len(tokenizer(t)["input_ids"]) for t in TEXTS}) == 3  # the batch of 3 really is padded
    torch.testing.assert_close(one.nll, three.nll, rtol=0, atol=1e-5)
    assert torch.equal(one.tokens, three.tokens)


def test_a_text_longer_than_the_context_is_scored_over_all_its_tokens(loaded) -> None:
    model, tokenizer = loaded
    ids = tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * CONTEXT
    scores = sample_nll([TEXTS[0], LONG_TEXT], model, tokenizer, 2, None, "cpu")
    assert scores.tokens[1].item() == len(ids)
    chunks = [ids[i : i + CONTEXT - 1] for i in range(0, len(ids), CONTEXT - 1)]
    expected = sum(hand_nll(model, tokenizer, chunk) for chunk in chunks) / len(ids)
    assert scores.nll[1].item() == pytest.approx(expected.item(), abs=1e-5)
    shorter = sample_nll([LONG_TEXT], model, tokenizer, 4, 5, "cpu")  # max_length overrides the config
    assert shorter.tokens.item() == len(ids) and not torch.isclose(shorter.nll, scores.nll[1:]).item()


def test_a_continuation_scored_after_its_prompt_obeys_the_chain_rule(loaded) -> None:
    """NLL(prompt) + NLL(continuation | prompt) = NLL(prompt + continuation), where the tokens split cleanly."""
    model, tokenizer = loaded
    prompt, continuation = "the cat sat", " on the mat"
    prompt_ids, continuation_ids = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prompt, continuation))
    assert tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"] == prompt_ids + continuation_ids
    whole, alone, conditioned = (
        sample_nll([text], model, tokenizer, 1, None, "cpu", contexts) for text, contexts in
        ((prompt + continuation, None), (prompt, None), (continuation, [prompt]))
    )
    assert conditioned.tokens.item() == len(continuation_ids)  # the prompt is context, never scored
    chained = alone.nll * len(prompt_ids) + conditioned.nll * len(continuation_ids)
    assert chained.item() == pytest.approx((whole.nll * (len(prompt_ids) + len(continuation_ids))).item(), abs=1e-4)
    unconditioned = sample_nll([continuation], model, tokenizer, 1, None, "cpu")
    assert not torch.isclose(unconditioned.nll, conditioned.nll).item()


def test_unigram_entropy_of_hand_histograms() -> None:
    entropy = unigram_entropy([[1, 1, 2, 2], [5, 5, 5], [1, 2, 3]])
    assert entropy.dtype == torch.float64
    torch.testing.assert_close(entropy, torch.tensor([math.log(2), 0.0, math.log(3)], dtype=torch.float64))


def test_distinct_n_counts_ngrams_within_samples() -> None:
    samples = [[1, 2, 1, 2], [1, 2]]
    assert distinct_n(samples, 1) == pytest.approx(2 / 6)
    assert distinct_n(samples, 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) | (1,2)
    assert distinct_n(samples, 3) == pytest.approx(2 / 2)
    assert distinct_n([[1], [2]], 2) == 0.0  # no n-gram spans two samples


T_TABLE = [([0.0, 1.0], 12.7062047), ([1.0, 2.0, 3.0, 4.0, 5.0], 2.7764451), (list(range(31)), 2.0422725)]  # t_0.975 at 1, 4, 30 dof


@pytest.mark.parametrize(("values", "t_quantile"), T_TABLE)
def test_mean_ci95_uses_the_student_t_quantile(values: list[float], t_quantile: float) -> None:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    got_mean, got_half = mean_ci95(torch.tensor(values))
    assert got_mean == pytest.approx(mean)
    assert got_half == pytest.approx(t_quantile * std / math.sqrt(n), rel=1e-6)


def test_paired_difference_pairs_by_index() -> None:
    values = torch.tensor([3.0, 5.0, 9.0])
    assert paired_difference(values, values.clone()) == (0.0, 0.0)
    mean, half = paired_difference(values, values - torch.tensor([1.0, 2.0, 3.0]))
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.3026527 * 1.0 / math.sqrt(3), rel=1e-6)


def test_evaluate_samples_is_json_ready_and_consistent(loaded) -> None:
    model, tokenizer = loaded
    token_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    scores = sample_nll(TEXTS, model, tokenizer, 2, None, "cpu")
    result = evaluate_samples(scores, token_ids, baseline_nll=scores.nll - 0.5)
    json.dumps(result, allow_nan=False)
    assert result["nll"] == pytest.approx(scores.nll.tolist(), abs=1e-9)
    corpus = math.exp((scores.nll * scores.tokens).sum().item() / scores.tokens.sum().item())
    assert result["gen_ppl"]["corpus"] == pytest.approx(corpus)
    assert result["gen_ppl"]["mean"] == pytest.approx(scores.nll.exp().mean().item())
    expected_diff = (scores.nll.exp() * (1 - math.exp(-0.5))).mean().item()
    assert result["gen_ppl_paired_diff"]["mean"] == pytest.approx(expected_diff)
    assert set(result["distinct"]) == {"1", "2", "3", "4"}
    assert result["entropy"]["mean"] == pytest.approx(unigram_entropy(token_ids).mean().item())
    assert "gen_ppl_paired_diff" not in evaluate_samples(scores, token_ids)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_inputs_fail_on_one_line(loaded, evaluator: tuple[Path, Path]) -> None:
    model, tokenizer = loaded
    with pytest.raises(ConfigError) as error:
        distinct_n([[1, 2]], 0)
    assert "n=0" in one_line(error)
    with pytest.raises(ConfigError) as error:
        paired_difference(torch.zeros(3), torch.zeros(4))
    one_line(error)
    with pytest.raises(ConfigError) as error:
        sample_nll(["a fox", ""], model, tokenizer, 2, None, "cpu")
    assert "sample 1" in one_line(error)
    with pytest.raises(ConfigError) as error:
        mean_ci95(torch.tensor([1.0]))
    one_line(error)
    with pytest.raises(ConfigError) as error:
        load_evaluator(str(evaluator[0]), "cpu")
    assert "tokenizer_path" in one_line(error)


def test_an_unloadable_evaluator_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailableError) as error:
        load_evaluator("adasched-test/no-such-evaluator", "cpu")
    message = one_line(error)
    assert "adasched-test/no-such-evaluator" in message and "local path" in message


def test_an_uncached_hub_name_fails_at_once_in_one_line_when_the_hub_is_out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    from adasched import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    tries = []

    def load(name: str, **kwargs: object) -> None:
        tries.append(kwargs)
        raise OSError(f"{name} is not cached")

    started = time.perf_counter()
    with pytest.raises(DataUnavailableError) as error:
        hub.cached_or_downloaded(load, "some-org/some-model", "evaluator")
    assert tries == [{"local_files_only": True}]  # the cache only: no download attempt, no retries
    assert time.perf_counter() - started < 1 and "\n" not in str(error.value) and "'some-org/some-model'" in str(error.value)
