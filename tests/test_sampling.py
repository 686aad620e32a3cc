"""The fast sampler is exact: identical tokens to the reference sampler, and the right distribution."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chi2

from adasched.costs import CostMeter
from adasched.errors import ConfigError
from adasched.models import DenoiserConfig, MDLMDenoiser
from adasched.reference_sampler import reference_sample
from adasched.sampling import sample, sample_categorical
from policies import make_policy
from policies.base import ENTROPY, PROBE_ENTROPY, DenoiseState, Policy

VOCAB, MASK = 30, 29


def family(depths: tuple[int, ...] = (3, 1), vocab: int = VOCAB, seq_len: int = 16, dtype: torch.dtype = torch.float64) -> list[MDLMDenoiser]:
    torch.manual_seed(0)
    members = []
    for depth in depths:
        config = DenoiserConfig(vocab_size=vocab, mask_token_id=vocab - 1, seq_len=seq_len, n_blocks=depth, d_model=32, n_heads=4)
        model = MDLMDenoiser(config).eval().to(dtype)
        torch.nn.init.normal_(model.head.weight, std=1.0)  # sharp, varied predictions: a stronger test
        members.append(model)
    return members


def meter(models: list[MDLMDenoiser]) -> CostMeter:
    return CostMeter([f"m{i}" for i in range(len(models))], [m.config.n_blocks for m in models])


class ByRowParity(Policy):
    """Even rows heavy, odd rows light: one batch, two models (grouped forwards)."""

    name = "by_row_parity"

    def act(self, state: DenoiseState) -> torch.Tensor:
        return state.seeds.remainder(2).to(torch.int64)


class EscalateUncertainRows(Policy):
    """Probe with the light model; rows whose probe entropy is above the batch median go to the heavy one."""

    name = "escalate_uncertain_rows"
    features = frozenset({PROBE_ENTROPY, ENTROPY})
    probe_model = 1

    def act(self, state: DenoiseState) -> torch.Tensor:
        entropy = state.extras[PROBE_ENTROPY]
        return torch.where(entropy > entropy.nanmedian(), 0, 1).to(torch.int64)


POLICIES = [
    ("static_heavy", {}, 2),
    ("static_light", {}, 2),
    ("static_sandwich", {"light_fraction": 0.4}, 2),
    ("static_quarter", {"quarter": 2, "light_fraction": 0.25}, 2),
    ("static_segments", {"spec": "L0.2,M0.3,H0.3,L0.2", "letters": {"H": 0, "M": 1, "L": 2}}, 3),
    ("static_segment_mask", {"num_segments": 5, "light_segments": [1, 3]}, 2),
]


@pytest.mark.parametrize(("name", "kwargs", "members"), POLICIES)
def test_fast_and_reference_samplers_give_identical_tokens(name: str, kwargs: dict, members: int) -> None:
    models = family((3, 2, 1)[:members] if members == 3 else (3, 1))
    seeds = torch.arange(100, 112)
    fast = sample(models, make_policy(name, **kwargs), seeds, num_steps=50, seq_len=16, meter=meter(models))
    slow = reference_sample(models, make_policy(name, **kwargs), seeds, num_steps=50, seq_len=16, meter=meter(models))
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.reveal_step, slow.reveal_step)
    assert torch.equal(fast.actions, slow.actions)
    assert not (fast.tokens == MASK).any()


def test_identical_with_mixed_models_in_a_batch_prefix_and_top_p() -> None:
    models = family()
    seeds = torch.arange(20)
    prefix = torch.randint(0, MASK, (20, 4), generator=torch.Generator().manual_seed(3))
    runs = [
        sampler(models, ByRowParity(), seeds, num_steps=30, seq_len=16, meter=meter(models), prefix=prefix, top_p=0.8)
        for sampler in (sample, reference_sample)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].tokens[:, :4], prefix)
    assert (runs[0].reveal_step[:, :4] == -1).all() and (runs[0].reveal_step[:, 4:] >= 0).all()


def test_identical_when_a_probe_decides_and_the_probe_is_reused() -> None:
    models = family()
    seeds = torch.arange(16)
    fast_meter = meter(models)
    runs = [sampler(models, EscalateUncertainRows(), seeds, 40, 16, m) for sampler, m in ((sample, fast_meter), (reference_sample, meter(models)))]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].actions, runs[1].actions)
    assert set(runs[0].actions.unique().tolist()) == {0, 1}
    # the probe runs the light model on every row that reveals; rows staying light reuse it: no second forward
    light_rows_probed = fast_meter.forwards[1]
    assert light_rows_probed == int((runs[0].reveal_step[:, :, None] == torch.arange(40)).any(1).sum())


def test_rows_do_not_depend_on_their_batch_company() -> None:
    models = family()
    together = sample(models, ByRowParity(), torch.arange(10), 40, 16, meter(models)).tokens
    alone = sample(models, ByRowParity(), torch.tensor([7]), 40, 16, meter(models)).tokens
    assert torch.equal(together[7], alone[0])


def test_float32_models_agree_almost_everywhere() -> None:
    models = family(dtype=torch.float32)
    seeds = torch.arange(64)
    fast = sample(models, make_policy("static_sandwich"), seeds, 64, 16, meter(models)).tokens
    slow = reference_sample(models, make_policy("static_sandwich"), seeds, 64, 16, meter(models)).tokens
    # batching may move float32 logits by ~1e-7; a draw within that of a CDF edge can differ (rarely)
    assert (fast == slow).float().mean() > 0.995


def exact_two_token_distribution(models: list[MDLMDenoiser], plan: list[int]) -> torch.Tensor:
    """P(x1, x2) of MDLM's sampler for L = 2 by enumeration: each position reveals at a step uniform over
    the T steps, independently; at a step both reveal they are drawn independently from the same model."""
    steps, vocab = len(plan), models[0].config.vocab_size
    mask = models[0].config.mask_token_id

    def p(model: MDLMDenoiser, z: list[int]) -> torch.Tensor:
        return model(torch.tensor([z]))[0].exp().double()  # (2, V), mask column 0, subs for revealed

    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    for k1, k2 in itertools.product(range(steps), repeat=2):
        first, second = models[plan[min(k1, k2)]], models[plan[max(k1, k2)]]
        both_masked = p(first, [mask, mask])
        if k1 == k2:
            joint += torch.outer(both_masked[0], both_masked[1]) / steps**2
        elif k1 < k2:  # position 0 first, then position 1 given it
            for x1 in range(vocab - 1):
                joint[x1] += both_masked[0, x1] * p(second, [x1, mask])[1] / steps**2
        else:
            for x2 in range(vocab - 1):
                joint[:, x2] += both_masked[1, x2] * p(second, [mask, x2])[0] / steps**2
    return joint


@pytest.mark.parametrize("sampler", [sample, reference_sample])
def test_sequences_follow_the_exact_distribution(sampler) -> None:
    models = family(vocab=6, seq_len=2)
    steps, n = 4, 20_000
    policy = make_policy("static_segments", spec="L1,H2,L1")
    with torch.no_grad():
        exact = exact_two_token_distribution(models, policy.segments.plan(steps).tolist())[:5, :5].flatten()
    tokens = sampler(models, policy, torch.arange(n), steps, 2, meter(models)).tokens
    counts = torch.bincount(tokens[:, 0] * 5 + tokens[:, 1], minlength=25).double()
    expected = exact * n
    assert abs(exact.sum().item() - 1) < 1e-9
    rare = expected < 5  # pool rare outcomes into one cell: chi-square's validity condition
    counts = torch.cat([counts[~rare], counts[rare].sum(0, keepdim=True)])
    expected = torch.cat([expected[~rare], expected[rare].sum(0, keepdim=True)])
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < chi2.ppf(0.999, df=len(counts) - 1)


def test_float64_categorical_and_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    u = torch.tensor([0.49, 0.51, 0.79, 0.81, 0.999], dtype=torch.float64)
    draws, _ = sample_categorical(logits.expand(5, -1), u)
    assert draws.tolist() == [0, 1, 1, 2, 2]  # the zero-probability token is never drawn
    nucleus, _ = sample_categorical(logits.expand(5, -1), u, top_p=0.75)  # keeps {0.5, 0.3}
    assert nucleus.tolist() == [0, 0, 1, 1, 1]


def test_costs_count_only_what_ran() -> None:
    models = family()
    fast_meter, slow_meter = meter(models), meter(models)
    sample(models, make_policy("static_sandwich", light_fraction=0.25), torch.arange(8), 100, 16, fast_meter)
    reference_sample(models, make_policy("static_sandwich", light_fraction=0.25), torch.arange(8), 100, 16, slow_meter)
    assert fast_meter.saved_nominal() == pytest.approx(0.25 * (3 - 1) / 3)
    assert sum(fast_meter.forwards) <= 8 * 16  # a row runs a model only at steps where it reveals something
    assert sum(fast_meter.flops) < sum(slow_meter.flops) / 2
    assert 0 < fast_meter.saved_executed() < 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 0}, "sampling.num_steps=0"),
        ({"seq_len": 17}, "sampling.seq_len=17"),
        ({"top_p": 0.0}, "sampling.top_p=0.0"),
    ],
)
def test_bad_sampling_arguments_fail_by_name(kwargs: dict, message: str) -> None:
    models = family()
    arguments = {"num_steps": 10, "seq_len": 16, "top_p": 1.0} | kwargs
    with pytest.raises(ConfigError, match=message):
        sample(models, make_policy("static_heavy"), torch.arange(2), meter=meter(models), **arguments)
