"""``check_policy``: the policies' ``check_env``, run on every registered policy in CI.

It feeds a policy plausible states offline (no model) and checks what the samplers rely on: actions are
well-formed and in range, the same states give the same actions, and a row's action depends on that row's
state alone, not on which other rows share the batch or in which order (the event-driven sampler batches
rows at different steps, and the reference sampler asks about rows it will not run).
"""

from __future__ import annotations

import torch

from adasched.sampling.policy import (
    MASKED,
    PROBE_ENTROPY,
    PROBE_MARGIN,
    PROBE_MAX_PROB,
    REVEALING,
    DenoiseState,
    Policy,
    StepOutput,
)

SEQ_LEN = 16  # of the synthetic states' reveal layouts


def synthetic_states(batch_size: int, num_steps: int, num_models: int, seed: int) -> list[DenoiseState]:
    """Rows draining their masks at random speeds, each visited at its own increasing steps, with what the sampler
    computes on request in ``extras`` (the probe's statistics, the reveal layout; no tokens)."""
    generator = torch.Generator().manual_seed(seed)
    model_flops = tuple(float(12 - 8 * m / max(num_models - 1, 1)) for m in range(num_models))
    step = torch.zeros(batch_size, dtype=torch.int64)
    mask = torch.ones(batch_size, dtype=torch.float64)
    previous = torch.ones(batch_size, dtype=torch.float64)
    flops = torch.zeros(batch_size, dtype=torch.float64)
    last_action = torch.full((batch_size,), -1)
    states = []
    while bool((step < num_steps).all()):
        t = 1.0 - step.double() / num_steps
        masked = torch.rand(batch_size, SEQ_LEN, generator=generator, dtype=torch.float64) < mask[:, None]
        revealing = masked & (torch.rand(batch_size, SEQ_LEN, generator=generator) < 0.3)
        probe = torch.rand(batch_size, 3, generator=generator, dtype=torch.float64).sort(1).values  # margin <= top probability
        states.append(
            DenoiseState(
                num_steps=num_steps, step=step.clone(), t=t, mask_fraction=mask.clone(), previous_mask_fraction=previous.clone(),
                reveal_count=torch.randint(1, 6, (batch_size,), generator=generator), flops=flops.clone(),
                all_heavy_flops=flops.clone() * 1.5, model_flops=model_flops, last_action=last_action.clone(),
                last_entropy=torch.rand(batch_size, generator=generator, dtype=torch.float64) * 5, seeds=torch.arange(batch_size),
                extras={
                    PROBE_ENTROPY: probe[:, 2] * 5, PROBE_MAX_PROB: probe[:, 1], PROBE_MARGIN: probe[:, 0], REVEALING: revealing, MASKED: masked,
                },
            )
        )
        previous, mask = mask, (mask - 0.05 * torch.rand(batch_size, generator=generator, dtype=torch.float64)).clamp(min=0)
        flops = flops + 4.0
        last_action = torch.randint(0, num_models, (batch_size,), generator=generator)
        step = step + torch.randint(1, max(2, num_steps // 10), (batch_size,), generator=generator)
    return states


def check_policy(policy: Policy, num_models: int = 2, batch_size: int = 8, num_steps: int = 40, seed: int = 0) -> None:
    """Raise AssertionError naming the first property ``policy`` violates."""
    states = synthetic_states(batch_size, num_steps, num_models, seed)
    runs = []
    for _ in range(2):
        policy.reset(num_steps, num_models)
        actions = []
        for state in states:
            action = policy.act(state)
            assert isinstance(action, torch.Tensor), f"{policy.name}: act returned {type(action).__name__}, not a tensor"
            assert action.shape == (batch_size,), f"{policy.name}: action shape {tuple(action.shape)} != ({batch_size},)"
            assert action.dtype == torch.int64, f"{policy.name}: action dtype {action.dtype} != torch.int64"
            assert 0 <= int(action.min()) and int(action.max()) < num_models, f"{policy.name}: action out of [0, {num_models})"
            costs = torch.tensor(state.model_flops, dtype=torch.float64)
            output = StepOutput(state.reveal_count, torch.rand(batch_size, dtype=torch.float64), costs[action], costs[0].expand(batch_size))
            policy.observe(state, action, output)
            actions.append(action)
        runs.append(torch.stack(actions))
    assert torch.equal(runs[0], runs[1]), f"{policy.name}: the same states gave different models"
    order = torch.randperm(batch_size, generator=torch.Generator().manual_seed(seed))
    for state, expected in zip(states, runs[0]):
        subset = order[: batch_size // 2]
        alone = policy.act(select_rows(state, subset))
        assert torch.equal(alone, expected[subset]), f"{policy.name}: a row's model depends on the other rows of its batch"
    if policy.budget is not None:
        flops = torch.tensor(states[0].model_flops, dtype=torch.float64)
        saved = 1 - flops[runs[0]].mean() / flops[0]
        assert saved >= policy.budget - 0.05, f"{policy.name}: saved {saved:.3f} of FLOPs, budget {policy.budget}"


def select_rows(state: DenoiseState, rows: torch.Tensor) -> DenoiseState:
    """The state of ``rows`` only, in that order."""
    per_row = {
        name: value[rows] for name, value in vars(state).items() if isinstance(value, torch.Tensor)
    }
    return DenoiseState(num_steps=state.num_steps, model_flops=state.model_flops, extras={k: v[rows] for k, v in state.extras.items()}, **per_row)
