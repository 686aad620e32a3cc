"""Counter-based uniforms: one independent U[0, 1) per (sample seed, step, position, stream).

Every sampler draws its random numbers from here, so a draw never depends on which rows share a batch,
which positions a forward projects, or how many steps were skipped: with the same seeds and policy, the
reference, the step and the event-driven sampler reveal the same positions and sample with the same numbers.
The hash is splitmix64 (Steele et al. 2014), computed with wrapping int64 arithmetic in torch.
"""

import torch

REVEAL = 1  # stream: does a masked position reveal at this step
TOKEN = 2  # stream: which token a revealed position takes (inverse-CDF draw)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's increment-and-finalize on int64 tensors (bit pattern of the uint64 result)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    return z ^ _shift_right(z, 31)


def _to_unit(bits: torch.Tensor) -> torch.Tensor:
    """53 random bits -> float64 in [0, 1)."""
    return _shift_right(bits, 11).to(torch.float64) * 2.0**-53


def _step_keys(seeds: torch.Tensor, steps: torch.Tensor | int, stream: int) -> torch.Tensor:
    """The key of (seed, step, stream); ``steps`` broadcasts against ``seeds``."""
    key = splitmix64(seeds.to(torch.int64) * 4 + stream)
    return splitmix64(key ^ (steps.to(key.device, torch.int64) if isinstance(steps, torch.Tensor) else steps))


def uniforms(seeds: torch.Tensor, step: torch.Tensor | int, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """float64 uniforms of shape (len(seeds), len(positions)) for one step per row and one stream.

    Row r, column c holds the draw of sample ``seeds[r]`` at step ``step`` (or ``step[r]``) and position
    ``positions[c]``: rows at different steps (the event-driven sampler) draw what they would in lockstep.
    """
    key = _step_keys(seeds, step, stream)
    return _to_unit(splitmix64(key[:, None] ^ positions.to(device=seeds.device, dtype=torch.int64)[None, :]))


def uniforms_at(seeds: torch.Tensor, steps: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """float64 uniforms, elementwise: the draw of (``seeds[i]``, ``steps[i]``, ``positions[i]``) for every i."""
    return _to_unit(splitmix64(_step_keys(seeds, steps, stream) ^ positions.to(torch.int64)))


def uniform_grid(seeds: torch.Tensor, steps: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """float64 uniforms of shape (len(seeds), len(steps), len(positions)): every step of every row at once."""
    key = _step_keys(seeds[:, None], steps[None, :].to(seeds.device), stream)
    return _to_unit(splitmix64(key[..., None] ^ positions.to(device=seeds.device, dtype=torch.int64)))
