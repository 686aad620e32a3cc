"""MDLM's public checkpoints load as adasched denoisers that compute what MDLM's own DiT computes.

The reference below re-implements MDLM's forward (kuleshov-group/mdlm ``models/dit.py`` and the "subs"
output of ``diffusion.py``) on MDLM's weight names, with its adaLN modulation computed from
``c = SiLU(sigma_map(0))`` as MDLM does, not folded. Every modulation weight is random and non-zero, so the
comparison tests the folding.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from adasched.errors import ConfigError, DataUnavailableError
from adasched.models import DenoiserConfig, MDLMDenoiser
from adasched.models.family import load_family
from adasched.models.mdlm_checkpoint import load_mdlm_hub, load_mdlm_lightning
from adasched.sampling.costs import CostMeter
from adasched.sampling.spec import SamplingSpec
from adasched.sampling.trajectory import sample
from policies import make_policy
from tests.helpers import compose_config

VOCAB, WIDTH, HEADS, BLOCKS, COND, FREQ, LENGTH = 40, 32, 4, 2, 16, 256, 16  # FREQ: MDLM's sigma_map input width
MASK = VOCAB - 1  # MDLM appends the mask to a GPT-2-style vocabulary
NEG_INFINITY = -1_000_000.0  # MDLM's subs parameterization's "minus infinity"


def mdlm_weights(seed: int) -> dict[str, torch.Tensor]:
    """Random weights under MDLM's DIT names, in its ``state_dict`` order (the rotary buffer after sigma_map)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=generator)

    head = WIDTH // HEADS
    weights = {
        "vocab_embed.embedding": rand(VOCAB, WIDTH, std=1.0),
        "sigma_map.mlp.0.weight": rand(COND, FREQ, std=0.1),
        "sigma_map.mlp.0.bias": rand(COND, std=0.1),
        "sigma_map.mlp.2.weight": rand(COND, COND, std=0.3),
        "sigma_map.mlp.2.bias": rand(COND, std=0.3),
        "rotary_emb.inv_freq": 1.0 / 10_000 ** (torch.arange(0, head, 2).float() / head),
    }
    for i in range(BLOCKS):
        prefix = f"blocks.{i}."
        weights |= {
            prefix + "norm1.weight": rand(WIDTH, mean=1.0),
            prefix + "attn_qkv.weight": rand(3 * WIDTH, WIDTH),
            prefix + "attn_out.weight": rand(WIDTH, WIDTH),
            prefix + "norm2.weight": rand(WIDTH, mean=1.0),
            prefix + "mlp.0.weight": rand(4 * WIDTH, WIDTH),
            prefix + "mlp.0.bias": rand(4 * WIDTH),
            prefix + "mlp.2.weight": rand(WIDTH, 4 * WIDTH),
            prefix + "mlp.2.bias": rand(WIDTH),
            prefix + "adaLN_modulation.weight": rand(6 * WIDTH, COND),
            prefix + "adaLN_modulation.bias": rand(6 * WIDTH),
        }
    return weights | {
        "output_layer.norm_final.weight": rand(WIDTH, mean=1.0),
        "output_layer.linear.weight": rand(VOCAB, WIDTH, std=0.5),
        "output_layer.linear.bias": rand(VOCAB),
        "output_layer.adaLN_modulation.weight": rand(2 * WIDTH, COND),
        "output_layer.adaLN_modulation.bias": rand(2 * WIDTH),
    }


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def mdlm_log_probs(w: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """MDLM's ``Diffusion.forward`` without time conditioning: DIT(z, sigma=0), then the subs parameterization."""
    batch, length = z.shape
    sigma = torch.zeros(batch)
    freqs = torch.exp(-math.log(10_000) * torch.arange(FREQ // 2, dtype=torch.float32) / (FREQ // 2))
    args = sigma[:, None] * freqs[None]
    t_freq = torch.cat([args.cos(), args.sin()], dim=-1)
    c = F.silu(F.linear(F.silu(F.linear(t_freq, w["sigma_map.mlp.0.weight"], w["sigma_map.mlp.0.bias"])), w["sigma_map.mlp.2.weight"], w["sigma_map.mlp.2.bias"]))
    angles = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.float32), w["rotary_emb.inv_freq"])
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # MDLM's LayerNorm: no bias, eps 1e-5
        return F.layer_norm(x.float(), [WIDTH]) * weight

    x = w["vocab_embed.embedding"][z]
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        modulation = F.linear(c, w[p + "adaLN_modulation.weight"], w[p + "adaLN_modulation.bias"])[:, None]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=2)
        h = norm(x, w[p + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = F.linear(h, w[p + "attn_qkv.weight"]).view(batch, length, 3, HEADS, WIDTH // HEADS)  # b s (three h d)
        q, k, v = qkv.unbind(dim=2)  # (b, s, h, d)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(WIDTH // HEADS)
        attn = torch.einsum("bhst,bthd->bshd", scores.softmax(dim=-1), v).reshape(batch, length, WIDTH)
        x = x + gate_msa * F.linear(attn, w[p + "attn_out.weight"])
        h = norm(x, w[p + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        mlp = F.linear(F.gelu(F.linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"]), approximate="tanh"), w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
        x = x + gate_mlp * mlp
    shift, scale = F.linear(c, w["output_layer.adaLN_modulation.weight"], w["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, dim=2)
    h = norm(x, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
    logits = F.linear(h, w["output_layer.linear.weight"], w["output_layer.linear.bias"])
    logits[:, :, MASK] += NEG_INFINITY
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = z != MASK
    logits[unmasked] = NEG_INFINITY
    logits[unmasked, z[unmasked]] = 0
    return logits


def hub_config(time_conditioning: bool = False) -> dict:
    """``config.json`` as on kuleshov-group/mdlm-owt (transformers' MDLMConfig), at the test's size."""
    return {
        "architectures": ["MDLM"], "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig"}, "model_type": "mdlm",
        "vocab_size": VOCAB, "model_length": LENGTH, "hidden_dim": WIDTH, "cond_dim": COND, "n_blocks": BLOCKS,
        "n_heads": HEADS, "dropout": 0.1, "time_conditioning": time_conditioning,
    }


def write_hub_folder(folder: Path, weights: dict[str, torch.Tensor], time_conditioning: bool = False, safetensors: bool = True) -> Path:
    """A hub-style folder: config.json + model.safetensors (or pytorch_model.bin) with transformers' ``backbone.`` prefix."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hub_config(time_conditioning)), encoding="utf-8")
    state = {f"backbone.{name}": tensor.contiguous() for name, tensor in weights.items()}
    if safetensors:
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def write_lightning_checkpoint(path: Path, raw: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], time_conditioning: bool = False) -> Path:
    """A .ckpt as MDLM's main.py writes it: state_dict, EMA shadow_params in parameters() order, Hydra config and tokenizer."""
    config = OmegaConf.create({
        "mode": "train", "diffusion": "absorbing_state", "backbone": "dit", "parameterization": "subs",
        "time_conditioning": time_conditioning, "T": 0, "subs_masking": False,
        "model": {"name": "tiny", "type": "ddit", "hidden_size": WIDTH, "cond_dim": COND, "length": LENGTH, "n_blocks": BLOCKS, "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1},
        "data": {"train": "openwebtext-train", "tokenizer_name_or_path": "gpt2", "wrap": True},
        "loader": {"global_batch_size": 512, "batch_size": "${div_up:${.global_batch_size}, ${eval:${trainer.devices} * ${trainer.num_nodes}}}"},
        "trainer": {"devices": "${device_count:}", "num_nodes": 1},
    })
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])))
    checkpoint = {
        "epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.2.1",
        "state_dict": {f"backbone.{name}": tensor for name, tensor in raw.items()},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}}, "optimizer_states": [], "lr_schedulers": [],
        "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": [t for name, t in ema.items() if name != "rotary_emb.inv_freq"]},
        "sampler": {"random_state": torch.zeros(8, dtype=torch.uint8)},
        "hparams_name": "kwargs", "hyper_parameters": {"config": config, "tokenizer": tokenizer},
    }
    torch.save(checkpoint, path)
    return path


def noisy_tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    z = torch.randint(0, MASK, (3, LENGTH), generator=generator)
    return torch.where(torch.rand(3, LENGTH, generator=generator) < 0.5, MASK, z)


def assert_matches_mdlm(model: MDLMDenoiser, weights: dict[str, torch.Tensor]) -> None:
    """Same log-probabilities as MDLM at masked positions (the mask column, -inf against -1e6, left out)."""
    z = noisy_tokens()
    with torch.no_grad():
        ours, theirs = model(z), mdlm_log_probs(weights, z)
    masked = z == MASK
    keep = torch.arange(VOCAB) != MASK
    torch.testing.assert_close(ours[masked][:, keep], theirs[masked][:, keep], atol=1e-4, rtol=1e-4)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("safetensors", [True, False])
def test_hub_folder_matches_mdlm(tmp_path: Path, safetensors: bool) -> None:
    weights = mdlm_weights(seed=0)
    model = load_mdlm_hub(str(write_hub_folder(tmp_path / "mdlm", weights, safetensors=safetensors)))
    assert not model.training and model.head.weight.dtype == torch.float32
    assert (model.config.vocab_size, model.config.mask_token_id, model.config.seq_len) == (VOCAB, MASK, LENGTH)
    assert (model.config.n_blocks, model.config.d_model, model.config.n_heads, model.config.time_conditioning) == (BLOCKS, WIDTH, HEADS, False)
    assert_matches_mdlm(model, weights)


def test_lightning_checkpoint_uses_its_ema_weights(tmp_path: Path) -> None:
    raw, ema = mdlm_weights(seed=1), mdlm_weights(seed=2)
    model = load_mdlm_lightning(write_lightning_checkpoint(tmp_path / "last.ckpt", raw, ema))
    assert_matches_mdlm(model, ema)
    z = noisy_tokens()
    with torch.no_grad():
        assert (model(z) - mdlm_log_probs(raw, z))[z == MASK][:, :MASK].abs().max() > 0.1  # not the raw weights


@pytest.mark.parametrize("kind", ["hub", "lightning"])
def test_time_conditioned_checkpoint_is_refused(tmp_path: Path, kind: str) -> None:
    weights = mdlm_weights(seed=0)
    with pytest.raises(ConfigError) as error:
        if kind == "hub":
            load_mdlm_hub(str(write_hub_folder(tmp_path / "mdlm", weights, time_conditioning=True)))
        else:
            load_mdlm_lightning(write_lightning_checkpoint(tmp_path / "last.ckpt", weights, weights, time_conditioning=True))
    assert "time_conditioning" in one_line(error)


def test_family_members_load_from_hub_folders_and_lightning_checkpoints(tmp_path: Path) -> None:
    hub = write_hub_folder(tmp_path / "mdlm-owt", mdlm_weights(seed=0))
    ckpt = write_lightning_checkpoint(tmp_path / "last.ckpt", mdlm_weights(seed=1), mdlm_weights(seed=2))
    names = [f"hf:{hub}", f"mdlm:{ckpt}"]
    family = load_family({name: tmp_path / "family" / name for name in names})  # as the jobs join names to family.dir
    assert list(family) == names
    assert all(m.config.n_blocks == BLOCKS and m.config.mask_token_id == MASK for m in family.values())


@pytest.mark.parametrize("field", ["seq_len", "vocab_size"])
def test_family_refuses_a_member_of_another_vocabulary_or_length(tmp_path: Path, field: str) -> None:
    hub = write_hub_folder(tmp_path / "mdlm-owt", mdlm_weights(seed=0))
    shape = {"vocab_size": VOCAB, "seq_len": LENGTH} | {field: {"vocab_size": VOCAB + 1, "seq_len": 2 * LENGTH}[field]}
    light = DenoiserConfig(mask_token_id=MASK, n_blocks=1, d_model=WIDTH, n_heads=HEADS, **shape)
    MDLMDenoiser(light).save_pretrained(str(tmp_path / "family" / "light"))
    names = [f"hf:{hub}", "light"]
    with pytest.raises(ConfigError) as error:
        load_family({name: tmp_path / "family" / name for name in names})
    assert field in one_line(error) and "light" in str(error.value)


def test_unknown_hub_model_offline_fails_fast_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError) as error:
        load_family({"hf:adasched-test/no-such-mdlm": Path("family") / "hf:adasched-test/no-such-mdlm"})
    assert time.perf_counter() - start < 3.0
    assert "hf:adasched-test/no-such-mdlm" in one_line(error) and "hf download" in str(error.value)


class StandInTokenizer:
    """What ``build_denoiser`` reads of a tokenizer: its size, EOS and mask ids (GPT-2's 50258 is slow on CPU)."""

    eos_token_id, mask_token_id = 62, 63

    def __len__(self) -> int:
        return 64


def test_paper_configs_compose_and_sample() -> None:
    family = compose_config("run", ["family=mdlm_owt", "data=openwebtext", "eval=gpt2_large", "family.members=[hf:kuleshov-group/mdlm-owt,paper_b4]"])
    assert list(family.family.members) == ["hf:kuleshov-group/mdlm-owt", "paper_b4"]
    assert family.family.tokenizer == f"{family.family.dir}/tokenizer-gpt2" and family.data.seq_len == 1024
    nets = {}
    for depth in (12, 10, 8, 6, 4):
        cfg = compose_config("train", [f"model=paper_b{depth}", "data=openwebtext", "tokenizer=gpt2", "trainer=gpu"])
        assert (cfg.model.net.n_blocks, cfg.model.net.d_model, cfg.model.net.n_heads, cfg.model.net.mlp_ratio) == (depth, 768, 12, 4)
        assert cfg.model.net.time_conditioning is False and cfg.data.seq_len == 1024 and cfg.tokenizer.vocab_size == 50258
        nets[depth] = cfg.model.net
    torch.manual_seed(0)
    members = [instantiate(nets[depth], tokenizer=StandInTokenizer(), seq_len=64).eval() for depth in (12, 4)]
    meter = CostMeter(["paper_b12", "paper_b4"], [12, 4])
    out = sample(members, make_policy("static_sandwich"), torch.arange(2), SamplingSpec(num_steps=4, seq_len=32, batch_size=2), meter)
    assert out.tokens.shape == (2, 32) and not (out.tokens == StandInTokenizer.mask_token_id).any()
    assert set(out.actions[out.actions >= 0].tolist()) == {0, 1}
