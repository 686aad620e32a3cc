"""The samplers are exact: the event-driven, step and reference samplers give identical tokens, and the right distribution."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from scipy.stats import chi2

from adasched.errors import ConfigError
from adasched.models import MDLMDenoiser
from adasched.sampling import trajectory
from adasched.sampling.policy import ENTROPY, PROBE_ENTROPY, DenoiseState, Policy
from adasched.sampling.reference import reference_sample, step_sample
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import EventTrajectory, reveal_steps, run_policy, sample, sample_categorical
from policies import make_policy, registered_policies
from tests.helpers import MASK, family, fitted_kl_router, meter


class ByRowParity(Policy):
    """Even rows heavy, odd rows light: one batch, two models (grouped forwards)."""

    name = "by_row_parity"

    def act(self, state: DenoiseState) -> torch.Tensor:
        return state.seeds.remainder(2).to(torch.int64)


class EscalateUncertainRows(Policy):
    """Probe with the light model; rows whose probe entropy is above 1 nat go to the heavy one."""

    name = "escalate_uncertain_rows"
    features = frozenset({PROBE_ENTROPY, ENTROPY})
    probe_model = 1

    def act(self, state: DenoiseState) -> torch.Tensor:
        entropy = state.extras[PROBE_ENTROPY]
        return torch.where(entropy > 1.0, 0, 1).to(torch.int64)


SAMPLERS = {"event": sample, "step": step_sample, "reference": reference_sample}
STATIC_POLICIES = [
    ("static_heavy", {}, 2),
    ("static_light", {}, 2),
    ("static_sandwich", {"light_fraction": 0.4}, 2),
    ("static_quarter", {"quarter": 2, "light_fraction": 0.25}, 2),
    ("static_segments", {"spec": "L0.2,M0.3,H0.3,L0.2", "letters": {"H": 0, "M": 1, "L": 2}}, 3),
    ("static_segment_mask", {"num_segments": 5, "light_segments": [1, 3]}, 2),
]


def spec(num_steps: int = 50, seq_len: int = 16, batch_size: int = 5, top_p: float = 1.0) -> SamplingSpec:
    return SamplingSpec(num_steps=num_steps, seq_len=seq_len, batch_size=batch_size, top_p=top_p)


def assert_identical_runs(runs: list) -> None:
    for other in runs[1:]:
        assert torch.equal(runs[0].tokens, other.tokens)
        assert torch.equal(runs[0].reveal_step, other.reveal_step)
        assert torch.equal(runs[0].actions, other.actions)


@pytest.mark.parametrize(("name", "kwargs", "members"), STATIC_POLICIES)
def test_event_step_and_reference_samplers_give_identical_tokens(name: str, kwargs: dict, members: int) -> None:
    models = family((3, 2, 1)[:members] if members == 3 else (3, 1))
    seeds = torch.arange(100, 112)  # 12 samples in slots of 5: continuous batching refills finished rows
    runs = [sampler(models, make_policy(name, **kwargs), seeds, spec(), meter(models)) for sampler in SAMPLERS.values()]
    assert_identical_runs(runs)
    assert not (runs[0].tokens == MASK).any()
    decided = runs[0].actions >= 0  # a decision exactly where a row reveals
    assert torch.equal(decided, (runs[0].reveal_step.T[None] == torch.arange(50)[:, None, None]).any(1))


def test_cpu_forwards_split_into_chunks_give_identical_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    models = family()
    seeds = torch.arange(100, 112)
    reference = reference_sample(models, make_policy("static_sandwich"), seeds, spec(), meter(models))
    monkeypatch.setattr(trajectory, "CPU_FORWARD_TOKENS", 2 * 16)  # two rows of 16 tokens per call: a 5-row forward splits in 3
    rows_per_call: list[int] = []
    for model in models:
        monkeypatch.setattr(model, "hidden_states", lambda z, t, trunk=model.hidden_states: rows_per_call.append(len(z)) or trunk(z, t))
    assert_identical_runs([reference, sample(models, make_policy("static_sandwich"), seeds, spec(), meter(models))])
    assert max(rows_per_call) == 2  # without the split, calls of up to 5 rows


DYNAMIC_POLICIES = [
    ("entropy_router", {"mode": "probe", "threshold": 1.0}),  # tiny models' entropies lie around 0.5-2 nats
    ("entropy_router", {"mode": "lagged", "threshold": 1.0}),
    ("mask_fraction_router", {"light_mass": 0.4, "skew": 0.3}),
    ("kl_router", {}),
]


def test_every_registered_policy_is_tested_for_exactness() -> None:
    tested = {name for name, _, _ in STATIC_POLICIES} | {name for name, _ in DYNAMIC_POLICIES}
    assert set(registered_policies()) - tested == {"learned_router", "oracle"}  # their identical-token tests: test_env, test_oracle


@pytest.mark.parametrize(("name", "kwargs"), DYNAMIC_POLICIES)
def test_dynamic_policies_give_identical_tokens_in_every_sampler(name: str, kwargs: dict, tmp_path: Path) -> None:
    """Each is a function of the row's state, which every sampler builds alike, whatever the row's company."""
    models = family()
    if name == "kl_router":
        kwargs = {"path": str(fitted_kl_router(models, tmp_path))}
    runs = [sampler(models, make_policy(name, **kwargs), torch.arange(9), spec(40), meter(models)) for sampler in SAMPLERS.values()]
    assert_identical_runs(runs)
    assert {0, 1} <= set(runs[0].actions.unique().tolist())  # both models ran: the agreement is not trivial


def test_identical_with_mixed_models_in_a_batch_prefix_and_top_p() -> None:
    models = family()
    seeds = torch.arange(20)
    prefix = torch.randint(0, MASK, (20, 4), generator=torch.Generator().manual_seed(3))
    runs = [sampler(models, ByRowParity(), seeds, spec(30, top_p=0.8), meter(models), prompts=prefix) for sampler in SAMPLERS.values()]
    assert_identical_runs(runs)
    assert torch.equal(runs[0].tokens[:, :4], prefix)
    assert (runs[0].reveal_step[:, :4] == -1).all() and (runs[0].reveal_step[:, 4:] >= 0).all()


def test_identical_when_a_probe_decides_and_the_probe_is_reused() -> None:
    models = family()
    seeds = torch.arange(16)
    event_meter = meter(models)
    runs = [sampler(models, EscalateUncertainRows(), seeds, spec(40), m) for sampler, m in ((sample, event_meter), (step_sample, meter(models)), (reference_sample, meter(models)))]
    assert_identical_runs(runs)
    assert set(runs[0].actions.unique().tolist()) == {-1, 0, 1}
    # the probe runs the light model on every row that reveals; rows staying light reuse it: no second forward
    assert event_meter.forwards[1] == int((runs[0].actions >= 0).sum())


def test_rows_do_not_depend_on_their_batch_company() -> None:
    models = family()
    together = sample(models, ByRowParity(), torch.arange(10), spec(40), meter(models)).tokens
    alone = sample(models, ByRowParity(), torch.tensor([7]), spec(40, batch_size=1), meter(models)).tokens
    assert torch.equal(together[7], alone[0])


def test_the_reveal_plan_is_what_stepping_draws() -> None:
    """A position reveals at the first step whose REVEAL uniform falls under 1 / (T - k); each step equally likely."""
    seeds, steps = torch.arange(400), 10
    plan = reveal_steps(seeds, steps, 16, prefix_len=3)
    assert (plan[:, :3] == -1).all() and plan[:, 3:].min() >= 0 and plan[:, 3:].max() < steps
    counts = torch.bincount(plan[:, 3:].flatten(), minlength=steps).double()
    expected = counts.sum() / steps
    assert ((counts - expected) ** 2 / expected).sum().item() < chi2.ppf(0.999, df=steps - 1)


def test_float32_models_agree_almost_everywhere() -> None:
    models = family(dtype=torch.float32)
    seeds = torch.arange(64)
    fast = sample(models, make_policy("static_sandwich"), seeds, spec(64, batch_size=16), meter(models)).tokens
    slow = reference_sample(models, make_policy("static_sandwich"), seeds, spec(64, batch_size=16), meter(models)).tokens
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
def test_sequences_follow_the_exact_distribution(sampler: object) -> None:
    models = family(vocab=6, seq_len=2)
    steps, n = 4, 20_000
    policy = make_policy("static_segments", spec="L1,H2,L1")
    with torch.no_grad():
        exact = exact_two_token_distribution(models, policy.segments.plan(steps).tolist())[:5, :5].flatten()
    tokens = sampler(models, policy, torch.arange(n), spec(steps, seq_len=2, batch_size=512), meter(models)).tokens
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
    out = sample(models, make_policy("static_sandwich", light_fraction=0.25), torch.arange(8), spec(100, batch_size=8), fast_meter)
    reference_sample(models, make_policy("static_sandwich", light_fraction=0.25), torch.arange(8), spec(100, batch_size=8), slow_meter)
    decisions = out.actions[out.actions >= 0]
    assert fast_meter.saved_nominal() == pytest.approx(float((decisions == 1).double().mean()) * (3 - 1) / 3)
    assert sum(fast_meter.forwards) == len(decisions) <= 8 * 16  # a row runs a model only at steps where it reveals
    assert sum(fast_meter.flops) < sum(slow_meter.flops) / 2
    assert 0 < fast_meter.saved_executed() < 1


def test_one_forward_per_model_covers_every_unfinished_row() -> None:
    models = family()
    event_meter, step_meter = meter(models), meter(models)
    sample(models, make_policy("static_heavy"), torch.arange(24), spec(200, batch_size=8), event_meter)
    step_sample(models, make_policy("static_heavy"), torch.arange(24), spec(200, batch_size=8), step_meter)
    assert event_meter.forwards == step_meter.forwards  # the same row-forwards...
    assert event_meter.batched_forwards[0] < step_meter.batched_forwards[0] / 3  # ...in far fewer, fuller calls
    assert event_meter.forwards[0] / event_meter.batched_forwards[0] > 6  # about 8 rows a call while samples remain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 0}, "sampling.num_steps=0"),
        ({"batch_size": -1}, "sampling.batch_size=-1"),
        ({"seq_len": 17}, "sampling.seq_len=17"),
        ({"top_p": 0.0}, "sampling.top_p=0.0"),
    ],
)
def test_bad_sampling_arguments_fail_by_name(kwargs: dict, message: str) -> None:
    models = family()
    arguments = {"num_steps": 10, "seq_len": 16, "top_p": 1.0} | kwargs
    with pytest.raises(ConfigError, match=message):
        sample(models, make_policy("static_heavy"), torch.arange(2), SamplingSpec(**arguments), meter(models))


class Constant(Policy):
    """Every row gets ``index``, valid or not."""

    name = "constant"

    def __init__(self, index: int) -> None:
        self.index = index

    def act(self, state: DenoiseState) -> torch.Tensor:
        return torch.full_like(state.step, self.index)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("index", [-1, 2])
def test_an_action_outside_the_family_is_a_one_line_error(index: int, sampler: str) -> None:
    """Also for rows that reveal nothing at the step (the lockstep samplers ask those too)."""
    models = family()
    with pytest.raises(ValueError, match=r"action must hold 3 model indices in \[0, 2\), got \[" + str(index)):
        SAMPLERS[sampler](models, Constant(index), torch.arange(3), spec(batch_size=3), meter(models))


def test_bf16_trunks_give_identical_tokens_in_every_sampler() -> None:
    models = family(dtype=torch.float32)
    for model in models:
        model.compute_dtype = torch.bfloat16
    seeds = torch.arange(24)
    runs = [sampler(models, make_policy("static_sandwich"), seeds, spec(64, batch_size=8), meter(models)) for sampler in SAMPLERS.values()]
    assert_identical_runs(runs)


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "kwargs"), [("static_sandwich", {"light_fraction": 0.4}), ("mask_fraction_router", {})])
def test_the_event_loop_never_waits_for_the_gpu(name: str, kwargs: dict) -> None:
    """Policies that read no entropy decide on the host: the loop queues its work and never synchronizes."""
    cpu_models = family(dtype=torch.float32)
    models = [model.to("cuda") for model in cpu_models]
    seeds = torch.arange(12)
    policy = make_policy(name, **kwargs)
    path = EventTrajectory(models, seeds.cuda(), spec(64, batch_size=4), meter(models), features=policy.features)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        on_gpu = run_policy(path, policy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = sample(cpu_models, make_policy(name, **kwargs), seeds, spec(64, batch_size=4), meter(cpu_models))
    assert (on_gpu.tokens.cpu() == on_cpu.tokens).float().mean() > 0.99  # float32 on another device: near-identical
