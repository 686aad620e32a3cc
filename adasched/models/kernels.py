"""Which kernels a denoiser's blocks call: torch's defaults, or faster ones for bf16 sampling on a CPU.

Profiled on the shipped heavy at 16 rows (docs/benchmark.md), a bf16 forward on the 2-core AVX-512 BF16 CPU
spent a third of its time in torch's CPU flash-attention kernel (~80 GFLOP/s where the same products as two
batched matmuls run at ~450) and a sixth in the tanh GELU, which cost twice the matmul feeding it. oneDNN
fuses the GELU into that matmul. Both replacements are for inference; training keeps torch's defaults.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) of shape (B, H, L, D) -> same
MlpIn = Callable[[torch.Tensor, nn.Sequential], torch.Tensor]  # (x, Sequential(Linear, GELU, Linear)) -> GELU(Linear(x))


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention as two bf16 batched products and a softmax.

    The scores are rounded to bf16 before the softmax (flash keeps them float32): the shipped heavy's
    predictions move from float32's by a KL of 3e-5 nats per token, against 1e-5 with flash and 0.6
    between two heavy seeds.
    """
    dtype = torch.bfloat16
    scores = (q.to(dtype) * q.shape[-1] ** -0.5) @ k.to(dtype).transpose(-1, -2)
    return scores.softmax(dim=-1) @ v.to(dtype)


def eager_mlp_in(x: torch.Tensor, mlp: nn.Sequential) -> torch.Tensor:
    linear, gelu, _ = mlp
    return gelu(linear(x))


def fused_mlp_in(x: torch.Tensor, mlp: nn.Sequential) -> torch.Tensor:
    """oneDNN's matmul with the GELU applied to its float32 accumulator, rounded once to bf16 (eager rounds
    the product, then the GELU)."""
    linear, gelu, _ = mlp
    return torch.ops.mkldnn._linear_pointwise(x.to(linear.weight.dtype), linear.weight, linear.bias, "gelu", [], gelu.approximate)


@dataclass(frozen=True)
class Kernels:
    attention: Attention
    mlp_in: MlpIn


DEFAULT = Kernels(F.scaled_dot_product_attention, eager_mlp_in)


@functools.cache
def has_fused_mlp_in() -> bool:
    """oneDNN's fused linear is in CPU builds of torch with mkldnn; a build without it keeps the eager pair."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def kernels_for(compute_dtype: torch.dtype | None, device: torch.device) -> Kernels:
    """The CPU bf16 kernels where the blocks compute in bf16 on a CPU; torch's defaults elsewhere (GPUs have flash)."""
    if compute_dtype != torch.bfloat16 or device.type != "cpu":
        return DEFAULT
    return Kernels(matmul_attention, fused_mlp_in if has_fused_mlp_in() else eager_mlp_in)
