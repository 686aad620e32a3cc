"""Counter-based uniforms: the hash is splitmix64 bit for bit, draws are uniform and independent of batching."""

import math

import torch

from adasched.sampling.random_streams import (
    REVEAL,
    TOKEN,
    splitmix64,
    uniform_grid,
    uniforms,
    uniforms_at,
)


def reference_splitmix64(x: int) -> int:
    """Steele et al.'s splitmix64 in Python's unbounded ints, reduced mod 2^64."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_torch_hash_matches_the_reference_bit_for_bit() -> None:
    inputs = [0, 1, 2, 12345, 2**40 + 7, -1, -(2**63)]
    got = splitmix64(torch.tensor(inputs, dtype=torch.int64)).tolist()
    assert [value & ((1 << 64) - 1) for value in got] == [reference_splitmix64(x & ((1 << 64) - 1)) for x in inputs]


def test_draws_do_not_depend_on_batch_company() -> None:
    positions = torch.arange(50)
    together = uniforms(torch.tensor([3, 7, 11]), step=5, positions=positions, stream=TOKEN)
    alone = uniforms(torch.tensor([7]), step=5, positions=positions[10:20], stream=TOKEN)
    assert torch.equal(together[1, 10:20], alone[0])


def test_streams_steps_and_seeds_differ() -> None:
    positions = torch.arange(64)
    base = uniforms(torch.tensor([1]), 0, positions, REVEAL)
    for other in (uniforms(torch.tensor([1]), 0, positions, TOKEN), uniforms(torch.tensor([1]), 1, positions, REVEAL), uniforms(torch.tensor([2]), 0, positions, REVEAL)):
        assert not torch.equal(base, other)


def test_draws_are_uniform() -> None:
    u = uniforms(torch.arange(200), step=3, positions=torch.arange(500), stream=REVEAL).flatten()
    assert u.dtype == torch.float64 and u.min() >= 0.0 and u.max() < 1.0
    counts = torch.histc(u.float(), bins=20, min=0.0, max=1.0)
    expected = len(u) / 20
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 43.8  # 99.9% quantile of chi-square with 19 degrees of freedom
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / len(u))


def test_per_row_elementwise_and_grid_draws_equal_the_lockstep_ones() -> None:
    seeds, positions = torch.tensor([3, 7, 11]), torch.arange(20)
    steps = torch.tensor([0, 4, 9])
    per_row = uniforms(seeds, steps, positions, TOKEN)
    grid = uniform_grid(seeds, torch.arange(10), positions, TOKEN)
    for row, step in enumerate(steps.tolist()):
        lockstep = uniforms(seeds[row : row + 1], step, positions, TOKEN)[0]
        assert torch.equal(per_row[row], lockstep) and torch.equal(grid[row, step], lockstep)
    rows, columns = torch.tensor([2, 0, 1]), torch.tensor([5, 19, 0])
    assert torch.equal(uniforms_at(seeds[rows], steps[rows], positions[columns], TOKEN), per_row[rows, columns])
