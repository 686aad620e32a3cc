"""The denoiser: subs outputs, save/load round trips, the analytic FLOPs count, and family checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from adasched.errors import ConfigError, DataUnavailableError
from adasched.models import DenoiserConfig, MDLMDenoiser
from adasched.models.export import export_model, read_metadata
from adasched.models.family import check_family, load_denoiser, load_family

MASK = 99


def tiny(n_blocks: int = 2, time_conditioning: bool = False, **changes) -> MDLMDenoiser:
    torch.manual_seed(0)
    config = dict(vocab_size=100, mask_token_id=MASK, seq_len=16, n_blocks=n_blocks, d_model=32, n_heads=4, time_conditioning=time_conditioning)
    return MDLMDenoiser(DenoiserConfig(**(config | changes))).eval()


def noisy_batch() -> torch.Tensor:
    z = torch.randint(0, MASK, (3, 16), generator=torch.Generator().manual_seed(0))
    z[:, ::3] = MASK
    return z


def test_subs_never_predicts_mask_and_copies_unmasked_tokens() -> None:
    z = noisy_batch()
    log_probs = tiny()(z)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 16))
    assert torch.all(log_probs[..., MASK] == float("-inf"))
    unmasked = z != MASK
    assert torch.all(log_probs[unmasked].argmax(-1) == z[unmasked])
    assert torch.all(log_probs[unmasked].max(-1).values == 0.0)


def test_time_conditioning_uses_t() -> None:
    model = tiny(time_conditioning=True)
    for layer in [model.final_adaln, *(block.adaln for block in model.blocks)]:
        torch.nn.init.normal_(layer.weight, std=0.1)  # adaLN starts at zero: give it something to modulate
    z = noisy_batch()
    assert not torch.allclose(model(z, torch.full((3,), 0.2)), model(z, torch.full((3,), 0.8)))
    with pytest.raises(ConfigError, match="pass t"):
        model(z)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, time_conditioning: bool) -> None:
    model = tiny(time_conditioning=time_conditioning)
    model.save_pretrained(str(tmp_path / "m"))
    loaded = MDLMDenoiser.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    z, t = noisy_batch(), torch.rand(3)
    assert torch.equal(model(z, t), loaded(z, t))


def test_16bit_export_round_trips_its_16bit_weights(tmp_path: Path) -> None:
    model = tiny()
    folder = export_model(model, tmp_path / "export", "float16", {"note": "x"})
    loaded = load_denoiser(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.half().float(), b), name
    assert read_metadata(folder) == {"note": "x"}
    assert model.embed.weight.dtype == torch.float32  # exporting does not change the live model


@pytest.mark.parametrize("projected", [0, 5, 16])
def test_flops_formula_matches_counted_matmuls(projected: int) -> None:
    model = tiny(n_blocks=3)
    z = noisy_batch()[:1]
    # the math backend decomposes attention into counted matmuls (the CPU fused kernel is not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        hidden = model.hidden_states(z)
        model.project(hidden[0, :projected])
    assert model.flops_per_forward(16, projected) == counter.get_total_flops()


def test_config_rejects_bad_values_by_name() -> None:
    with pytest.raises(ConfigError, match="n_blocks=0"):
        DenoiserConfig(vocab_size=10, mask_token_id=9, n_blocks=0)
    with pytest.raises(ConfigError, match="mask_token_id=10"):
        DenoiserConfig(vocab_size=10, mask_token_id=10)


def test_family_refuses_members_that_disagree(tmp_path: Path) -> None:
    check_family({"heavy": tiny(n_blocks=2), "light": tiny(n_blocks=1)})
    with pytest.raises(ConfigError, match="'odd' has vocab_size=101"):
        check_family({"heavy": tiny(), "odd": tiny(vocab_size=101)})
    with pytest.raises(ConfigError, match="'odd' has seq_len=32"):
        check_family({"heavy": tiny(), "odd": tiny(seq_len=32)})
    tiny().save_pretrained(str(tmp_path / "heavy"))
    tiny(mask_token_id=0).save_pretrained(str(tmp_path / "light"))
    with pytest.raises(ConfigError, match="mask_token_id=0"):
        load_family({"heavy": tmp_path / "heavy", "light": tmp_path / "light"})
    with pytest.raises(DataUnavailableError, match="no denoiser at"):
        load_denoiser(tmp_path / "missing")


def test_a_truncated_member_file_is_named_in_one_line(tiny_family: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_family / "light", tmp_path / "light")
    weights = tmp_path / "light" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DataUnavailableError) as error:
        load_family({"heavy": tiny_family / "heavy", "light": tmp_path / "light"})
    message = str(error.value)
    assert "\n" not in message and "family member 'light'" in message and str(weights) in message


def test_a_bf16_trunk_predicts_almost_what_float32_does_and_leaves_training_autocast_alone(tiny_family: Path) -> None:
    models = load_family({name: tiny_family / name for name in ("heavy", "light")}, precision="bf16")
    assert all(model.compute_dtype == torch.bfloat16 for model in models.values())
    model, z, t = models["heavy"], noisy_batch(), torch.full((3,), 0.5)
    with torch.no_grad():
        hidden = model.hidden_states(z, t)
        mixed = model.project(hidden).softmax(-1)
        model.compute_dtype = None
        full_hidden = model.hidden_states(z, t)
        full = model.project(full_hidden).softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as Lightning's bf16-mixed training runs it
            in_training = model.hidden_states(z, t)
    assert hidden.dtype == torch.float32  # the residual stream and the final norm stay float32
    total_variation = (mixed - full).abs().sum(-1) / 2
    assert 0 < total_variation.max() < 0.02
    # no compute_dtype: an enclosing autocast still applies (with torch's kernels, not the CPU sampling ones)
    assert not torch.equal(in_training, full_hidden)
    torch.testing.assert_close(in_training, hidden, atol=0.05, rtol=0)
    with pytest.raises(ConfigError, match="sampling.precision='fp16' is unknown; choose one of: auto, float32, bf16"):
        load_family({"heavy": tiny_family / "heavy"}, precision="fp16")
