"""Where and in what precision the denoisers compute, and what ``auto`` picks on this machine.

bfloat16 halves the bytes a matrix product moves and runs natively on GPUs and on CPUs with AVX-512 BF16 or
AMX (a bare bf16 matmul ran 2.7x float32 on the 2-core AVX-512 BF16 CPU of docs/benchmark.md); elsewhere a
CPU emulates it and float32 is faster. The family was trained in bf16 autocast, so bf16 is also the precision
it was built for.
"""

from __future__ import annotations

import torch

from adasched.errors import ConfigError

# float32, or the Transformer blocks' products in bfloat16 (autocast; the residual stream, norms and projection
# stay float32, as in bf16-mixed training).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bf16": torch.bfloat16}
AUTO = "auto"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # x86 and ARM names in torch.cpu.get_capabilities()


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU if one is visible, else the CPU; a named GPU that is not there is a one-line error."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware (CUDA: compute capability 8.0+; CPU: its feature flags)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return any(capabilities.get(flag, False) is True for flag in CPU_BF16_FLAGS)
    return False


def resolve_precision(name: str, device: torch.device, key: str = "sampling.precision") -> str:
    """``name`` itself, or for ``auto`` bf16 where ``device`` has native bf16 and float32 elsewhere."""
    if name == AUTO:
        return "bf16" if native_bf16(device) else "float32"
    compute_dtype(name, key)
    return name


def compute_dtype(precision: str, key: str = "sampling.precision") -> torch.dtype | None:
    """The ``compute_dtype`` of a resolved precision's name; a one-line error naming the config ``key`` for an unknown one."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is unknown; choose one of: {AUTO}, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]
