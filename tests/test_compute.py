"""Where and in what precision denoisers compute: what ``auto`` resolves to, and that storing the blocks in
bf16 once changes nothing autocast computes."""

from __future__ import annotations

import copy

import pytest
import torch

from adasched.compute import native_bf16, resolve_precision
from adasched.errors import ConfigError
from adasched.models import DenoiserConfig, MDLMDenoiser, dit, kernels


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx512_bf16": True}, "bf16"), ({"amx_bf16": True}, "bf16"), ({"bf16": True}, "bf16"), ({"avx512_bf16": False, "avx2": True}, "float32"), ({}, "float32")],
)
def test_auto_takes_bf16_only_on_cpus_that_multiply_it_natively(monkeypatch: pytest.MonkeyPatch, flags: dict, expected: str) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert native_bf16(torch.device("cpu")) == (expected == "bf16")


def test_a_named_precision_is_kept_and_an_unknown_one_is_a_one_line_error() -> None:
    assert resolve_precision("float32", torch.device("cpu")) == "float32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match=r"^precision='half' is unknown; choose one of: auto, float32, bf16$"):
        resolve_precision("half", torch.device("cpu"), key="precision")


def test_blocks_stored_in_bf16_compute_exactly_what_autocast_of_float32_weights_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dit, "kernels_for", lambda dtype, device: kernels.DEFAULT)  # the storage alone, same kernels
    model = time_conditioned_model()
    z, t = torch.randint(0, 99, (3, 16)), torch.full((3,), 0.5)
    rounding_each_call = copy.deepcopy(model)
    rounding_each_call._compute_dtype = torch.bfloat16  # the trunk autocast over float32 weights, as before
    with torch.no_grad():
        expected = rounding_each_call.hidden_states(z, t)
    model.compute_dtype = torch.bfloat16
    assert model.blocks[0].qkv.weight.dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
    assert model.blocks[0].norm1.weight.dtype == torch.float32  # autocast runs norms in float32: left as they are
    with torch.no_grad():
        stored = model.hidden_states(z, t)
    assert torch.equal(stored, expected)
    model.compute_dtype = None
    assert model.blocks[0].qkv.weight.dtype == torch.float32


def test_cpu_bf16_kernels_are_chosen_only_for_bf16_on_a_cpu() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert kernels.kernels_for(torch.bfloat16, cpu).attention is kernels.matmul_attention
    assert kernels.kernels_for(None, cpu) is kernels.DEFAULT
    assert kernels.kernels_for(torch.bfloat16, gpu) is kernels.DEFAULT


@pytest.mark.parametrize("mlp_in", [kernels.eager_mlp_in, kernels.fused_mlp_in])
def test_cpu_bf16_kernels_predict_what_torchs_kernels_do_within_bf16_rounding(mlp_in: kernels.MlpIn) -> None:
    """The scores' bf16 rounding and the fused GELU move predictions far less than bf16 itself does."""
    if mlp_in is kernels.fused_mlp_in and not kernels.has_fused_mlp_in():
        pytest.fail("this torch build lacks oneDNN's fused linear; kernels_for would fall back to the eager pair")
    model = time_conditioned_model()
    z, t = torch.randint(0, 99, (3, 16)), torch.full((3,), 0.5)
    with torch.no_grad():
        float32 = model.project(model.hidden_states(z, t)).softmax(-1)
        model.compute_dtype = torch.bfloat16
        with_torchs = model.project(run_with(model, kernels.DEFAULT, z, t)).softmax(-1)
        with_cpu = model.project(run_with(model, kernels.Kernels(kernels.matmul_attention, mlp_in), z, t)).softmax(-1)
    bf16_error = (with_torchs - float32).abs().sum(-1).max() / 2
    assert 0 < bf16_error < 0.05
    assert (with_cpu - with_torchs).abs().sum(-1).max() / 2 < 2 * bf16_error


def run_with(model: MDLMDenoiser, chosen: kernels.Kernels, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    original = dit.kernels_for
    dit.kernels_for = lambda dtype, device: chosen
    try:
        return model.hidden_states(z, t)
    finally:
        dit.kernels_for = original


def time_conditioned_model() -> MDLMDenoiser:
    torch.manual_seed(0)
    model = MDLMDenoiser(DenoiserConfig(vocab_size=100, mask_token_id=99, seq_len=16, n_blocks=2, d_model=32, n_heads=4, time_conditioning=True)).eval()
    for parameter in model.parameters():  # adaLN layers start at zero: give them something to compute
        torch.nn.init.normal_(parameter, std=0.1)
    return model
