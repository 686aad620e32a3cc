"""Path KL: zero for all-heavy, the Monte-Carlo mean matches the exact trajectory KL, per-sample values check out;
its seed floor is measured at exactly the steps the policy gave away, and equals path KL where the seed ran them."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from adasched.analysis.path_kl import categorical_kl, forward_flops, masked_sample, path_kl, step_kl
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import sample
from policies import make_policy
from tests.helpers import family, meter

VOCAB, STEPS = 6, 3  # 5 tokens and the mask


def exact_trajectory_kl(models: list, plan: list[int]) -> float:
    """KL(Q || P) for L = 2 by enumerating reveal steps and tokens, with the models' subs log-probabilities.

    Each position reveals at a step uniform over the T steps, independently and alike under Q and P; the
    tokens revealed at a step are drawn independently from the model of that step (Q) or the heavy one (P).
    """
    mask = models[0].config.mask_token_id
    tokens = range(VOCAB - 1)

    def probs(model_index: int, z: list[int]) -> torch.Tensor:
        return models[model_index](torch.tensor([z]))[0].exp()  # (2, V)

    total = 0.0
    for k1, k2 in itertools.product(range(STEPS), repeat=2):
        for x1, x2 in itertools.product(tokens, repeat=2):
            q = p = 1.0
            if k1 == k2:
                for model, side in ((plan[k1], "q"), (0, "p")):
                    both = probs(model, [mask, mask])
                    value = float(both[0, x1] * both[1, x2])
                    q, p = (value, p) if side == "q" else (q, value)
            else:
                first, second = (0, 1) if k1 < k2 else (1, 0)
                x = (x1, x2)
                for model_first, model_second, side in ((plan[min(k1, k2)], plan[max(k1, k2)], "q"), (0, 0, "p")):
                    z = [mask, mask]
                    value = float(probs(model_first, z)[first, x[first]])
                    z[first] = x[first]
                    value *= float(probs(model_second, z)[second, x[second]])
                    q, p = (value, p) if side == "q" else (q, value)
            if q > 0:
                total += q * math.log(q / p) / STEPS**2
    return total


def test_all_heavy_has_exactly_zero_path_kl_and_floor_and_costs_nothing() -> None:
    models = family((3, 1, 3), vocab=VOCAB, seq_len=2)
    out = sample(models[:2], make_policy("static_heavy"), torch.arange(50), SamplingSpec(STEPS, 2, batch_size=50), meter(models[:2]))
    measured = path_kl(models[:2], out.tokens, out.reveal_step, out.actions, seed_baseline=models[2])
    assert measured.per_sample.eq(0).all() and measured.per_step.eq(0).all() and measured.eval_flops == 0
    assert measured.floor_per_sample.eq(0).all() and measured.floor_per_step.eq(0).all()  # so the excess is the path KL, 0


def test_the_monte_carlo_mean_matches_the_exact_kl_by_enumeration() -> None:
    models = family(vocab=VOCAB, seq_len=2)
    policy = make_policy("static_segments", spec="L1,H1,L1")
    with torch.no_grad():
        exact = exact_trajectory_kl(models, policy.segments.plan(STEPS).tolist())
    n = 4000
    out = sample(models, policy, torch.arange(n), SamplingSpec(STEPS, 2, batch_size=500), meter(models))
    values = path_kl(models, out.tokens, out.reveal_step, out.actions, batch_size=500).per_sample
    mean, error = values.mean().item(), values.std().item() / math.sqrt(n)
    assert exact > 0.05  # the light model really departs from the heavy one: a test with teeth
    assert abs(mean - exact) < 3.5 * error, (mean, exact, error)


def test_each_sample_sums_the_kl_of_its_own_light_steps_and_the_seed_floor_at_those_steps_only() -> None:
    """Recomputed independently: dense forwards of the models on z_t, the KL over the vocabulary at each revealed
    position of the light steps, of the light model (path KL) and of the seed baseline (its floor)."""
    models = family((3, 1, 3), seq_len=16)
    members, seed = models[:2], models[2]
    spec = SamplingSpec(20, 16, batch_size=4)
    out = sample(members, make_policy("static_sandwich", light_fraction=0.5), torch.arange(6), spec, meter(members))
    measured = path_kl(members, out.tokens, out.reveal_step, out.actions, batch_size=3, seed_baseline=seed)
    mask = models[0].config.mask_token_id
    with torch.no_grad():
        for i in range(6):
            expected = {"kl": 0.0, "floor": 0.0}
            for step in (out.actions[:, i] == 1).nonzero().squeeze(1).tolist():
                z = torch.where(out.reveal_step[i] < step, out.tokens[i], mask)[None]
                revealed = out.reveal_step[i] == step
                t = torch.tensor([1 - step / 20], dtype=torch.float64)
                log_p = models[0](z, t)[0, revealed]
                kept = torch.arange(log_p.shape[1]) != mask
                for key, model in (("kl", members[1]), ("floor", seed)):
                    log_q = model(z, t)[0, revealed]
                    expected[key] += float((log_q[:, kept].exp() * (log_q[:, kept] - log_p[:, kept])).sum())
            assert measured.per_sample[i].item() == pytest.approx(expected["kl"], rel=1e-9, abs=1e-12)
            assert measured.floor_per_sample[i].item() == pytest.approx(expected["floor"], rel=1e-9, abs=1e-12)
    for per_sample, per_step in ((measured.per_sample, measured.per_step), (measured.floor_per_sample, measured.floor_per_step)):
        assert per_step.sum().item() == pytest.approx(per_sample.sum().item())
        assert per_step[out.actions.max(1).values <= 0].eq(0).all()  # no light decision, no KL and no floor at that step
    assert measured.floor_per_sample.gt(0).all()  # a seed baseline that differs from the heavy: a test with teeth


def test_the_floor_is_the_path_kl_where_the_seed_ran_the_light_steps_for_one_more_forward_each() -> None:
    models = family(seq_len=16)
    spec = SamplingSpec(20, 16, batch_size=4)
    out = sample(models, make_policy("static_sandwich", light_fraction=0.5), torch.arange(6), spec, meter(models))
    without = path_kl(models, out.tokens, out.reveal_step, out.actions, batch_size=3)
    seed = copy.deepcopy(models[1])  # loaded apart, as a seed baseline that is also a member is
    measured = path_kl(models, out.tokens, out.reveal_step, out.actions, batch_size=3, seed_baseline=seed)
    assert torch.equal(measured.floor_per_sample, measured.per_sample) and torch.equal(measured.floor_per_step, measured.per_step)
    assert torch.equal(measured.per_sample, without.per_sample) and without.floor_per_sample is None  # the floor changes nothing else
    light_steps = (out.actions == 1).sum().item()
    revealed_then = (out.reveal_step >= 0) & (out.actions.T.gather(1, out.reveal_step.clamp(min=0)) == 1)  # each position once
    one_forward_each = forward_flops(seed, 1, 0, 16) * light_steps + forward_flops(seed, 0, int(revealed_then.sum()), 16)
    assert measured.eval_flops - without.eval_flops == pytest.approx(one_forward_each)


def test_nucleus_kl_is_infinite_where_q_can_draw_what_p_cannot() -> None:
    q = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    p = torch.log(torch.tensor([[0.1, 0.3, 0.6]]))
    assert categorical_kl(q, q).item() == 0.0 and categorical_kl(q, p).item() > 0
    assert categorical_kl(q, p, top_p=0.5).item() == math.inf  # q keeps token 0, p's nucleus drops it


def test_one_steps_kl_over_rows_on_several_members_is_each_rows_own() -> None:
    """step_kl runs the heavy and the seed baseline once on every non-heavy row and each member on its own rows:
    every row gets what it would alone, and the FLOPs count each forward once."""
    members = family((3, 1, 2))
    seed = family((3,))[0]
    torch.manual_seed(1)
    tokens = torch.randint(0, 28, (6, 16))
    reveal = torch.rand(6, 16) < 0.3
    reveal[3] = False  # a row revealing nothing adds nothing
    tokens[reveal] = 29  # the revealing positions are masked in z_t
    t = torch.full((6,), 0.6, dtype=torch.float64)
    action = torch.tensor([0, 1, 2, 1, 2, 0])
    together = step_kl(members, tokens, t, reveal, action, seed_baseline=seed)
    for row in range(6):
        alone = step_kl(members, tokens[row : row + 1], t[row : row + 1], reveal[row : row + 1], action[row : row + 1], seed_baseline=seed)
        assert together.kl[row].item() == pytest.approx(alone.kl[0].item(), rel=1e-9, abs=1e-12)
        assert together.floor[row].item() == pytest.approx(alone.floor[0].item(), rel=1e-9, abs=1e-12)
    assert together.kl[[0, 5]].tolist() == [0.0, 0.0] and (together.kl[[1, 2, 4]] > 0).all() and together.kl[3] == 0
    projected = int(reveal[[1, 2, 3, 4]].sum())  # the heavy and the seed on the four rows off the heavy
    expected = forward_flops(members[0], 4, projected, 16) + forward_flops(seed, 4, projected, 16)
    expected += forward_flops(members[1], 2, int(reveal[[1, 3]].sum()), 16) + forward_flops(members[2], 2, int(reveal[[2, 4]].sum()), 16)
    assert together.flops == pytest.approx(expected)


def test_expected_step_kl_averages_the_revealed_kl_over_which_masked_positions_reveal() -> None:
    """Given k of M masked positions reveal, each k-subset is equally likely: averaged over all M, the expected
    increment (and floor) is the mean of the revealed ones over every k-subset; averaged over a uniform sample of
    the masked positions it is that mean on average over the samples. The revealed ones and logits are step_kl's own."""
    members = family((3, 1, 2))
    seed = family((3,))[0]
    torch.manual_seed(2)
    tokens = torch.randint(0, 28, (3, 16))
    masked = torch.rand(3, 16) < 0.5
    masked[:, :2] = True
    tokens[masked] = 29
    reveal = torch.zeros(3, 16, dtype=torch.bool)
    reveal[0, 0] = reveal[1, 0] = reveal[1, 1] = True  # one of M, two of M; row 2 runs the heavy
    t = torch.full((3,), 0.5, dtype=torch.float64)
    action = torch.tensor([1, 2, 0])
    measured = step_kl(members, tokens, t, reveal, action, seed_baseline=seed, averaged=masked)
    plain = step_kl(members, tokens, t, reveal, action, seed_baseline=seed)
    assert torch.allclose(measured.kl, plain.kl) and torch.allclose(measured.floor, plain.floor)
    assert all(torch.allclose(measured.logits[m], plain.logits[m]) for m in plain.logits)
    assert measured.expected_kl[2] == 0 and measured.expected_floor[2] == 0
    for row, k in ((0, 1), (1, 2)):
        columns = masked[row].nonzero().flatten().tolist()

        def mean_over(subsets: list[tuple[int, ...]], averaged: bool) -> tuple[float, float]:
            """The mean over ``subsets`` of the revealed increments there, or of the expected ones averaged there."""
            kl = floor = 0.0
            for subset in subsets:
                chosen = torch.zeros(1, 16, dtype=torch.bool)
                chosen[0, list(subset)] = True
                args = (reveal[row : row + 1], action[row : row + 1], 1.0, seed) if averaged else (chosen, action[row : row + 1], 1.0, seed)
                one = step_kl(members, tokens[row : row + 1], t[:1], *args, averaged=chosen if averaged else None)
                kl += (one.expected_kl if averaged else one.kl).item() / len(subsets)
                floor += (one.expected_floor if averaged else one.floor).item() / len(subsets)
            return kl, floor

        kl, floor = mean_over(list(itertools.combinations(columns, k)), averaged=False)
        assert measured.expected_kl[row].item() == pytest.approx(kl, rel=1e-9)
        assert measured.expected_floor[row].item() == pytest.approx(floor, rel=1e-9)
        assert mean_over(list(itertools.combinations(columns, 3)), averaged=True) == pytest.approx((kl, floor), rel=1e-9)
    projected = int(masked[:2].sum())  # every masked position of the rows off the heavy
    flops = forward_flops(members[0], 2, projected, 16) + forward_flops(seed, 2, projected, 16)
    flops += forward_flops(members[1], 1, int(masked[0].sum()), 16) + forward_flops(members[2], 1, int(masked[1].sum()), 16)
    assert measured.flops == pytest.approx(flops)


def test_a_masked_sample_draws_that_many_masked_positions_uniformly() -> None:
    tokens = torch.zeros(2, 8, dtype=torch.int64)
    tokens[0, :6] = tokens[1, :2] = 29
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([masked_sample(tokens, 29, 3, generator) for _ in range(3000)]).double()
    assert (draws.sum(2) == torch.tensor([3.0, 2.0])).all() and (draws[:, :, 6:] == 0).all()  # all of row 1's two
    assert draws[:, 0, :6].mean(0) == pytest.approx(torch.full((6,), 0.5, dtype=torch.float64), abs=0.04)  # 3 of 6, alike
    assert torch.equal(masked_sample(tokens, 29, None, generator), tokens == 29)
