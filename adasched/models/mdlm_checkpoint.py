"""MDLM's public checkpoints as adasched denoisers: a hub model (``kuleshov-group/mdlm-owt``) or a Lightning ``.ckpt``.

MDLM's DiT (kuleshov-group/mdlm, ``models/dit.py``) differs from ``MDLMDenoiser`` only in its conditioning.
Each block computes (shift, scale, gate) for attention and again for the MLP, and the final layer computes
(shift, scale), all as linear maps of ``c = SiLU(sigma_map(sigma))``. Without time conditioning MDLM always
passes ``sigma = 0``, so ``c`` and every modulation are constant vectors, and each one folds exactly into a
plain layer:

- ``LayerNorm(x) * g * (1 + scale) + shift`` is a LayerNorm with weight ``g * (1 + scale)`` and bias ``shift``.
  MDLM's norms have no bias, use eps 1e-5 and compute in float32, like ``nn.LayerNorm`` here.
- ``gate * (W h + b)`` is a Linear with rows ``gate * W`` and bias ``gate * b``. This applies to ``attn_out``
  and to the MLP's last layer. MDLM's dropout acts before the gate and is elementwise, so it commutes.

The rest maps one to one: the qkv output is split as (three, heads, head_dim), rotary embeddings are
rotate-half with base 10000 on q and k, the MLP uses GELU(tanh), the output layer is linear, and the "subs"
output drops the mask logit, takes a log-softmax and copies unmasked tokens through. A time-conditioned
checkpoint has no constant to fold, so it is refused. MDLM runs its blocks under bf16 autocast; here they run
in float32.
"""

from __future__ import annotations

import collections
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode
from safetensors.torch import load_file

from adasched.errors import ConfigError, DataUnavailableError, first_line
from adasched.hub import cached_or_downloaded
from adasched.models.dit import DenoiserConfig, MDLMDenoiser

BLOCK_PARAMETERS = (
    "norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias",
    "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias",
)
OUTPUT_PARAMETERS = (
    "output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
    "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias",
)
ROTARY_BUFFER = "rotary_emb.inv_freq"
# What the hyper_parameters' Hydra config unpickles into (omegaconf containers and the types they name).
CONFIG_GLOBALS = (
    DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, StringNode, IntegerNode, FloatNode, BooleanNode,
    typing.Any, collections.defaultdict, dict, list, tuple, set, int, float, str, bool,
)


class _Skipped:
    """Inert stand-in for what a Lightning checkpoint pickles beside the weights (MDLM pickles its tokenizer)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Skipped:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def parameter_names(n_blocks: int) -> list[str]:
    """MDLM's ``DIT.parameters()`` order, the order of the EMA's ``shadow_params`` (buffers excluded)."""
    names = ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias", "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    names += [f"blocks.{i}.{name}" for i in range(n_blocks) for name in BLOCK_PARAMETERS]
    return names + list(OUTPUT_PARAMETERS)


def load_mdlm_hub(source: str) -> MDLMDenoiser:
    """A hub MDLM (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``): a local folder or a hub id."""
    folder = hub_folder(source)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DataUnavailableError(f"MDLM model {source!r} has no config.json in {folder}")
    if (folder / "model.safetensors").is_file():
        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise DataUnavailableError(f"MDLM model {source!r} has no model.safetensors or pytorch_model.bin in {folder}")
    return convert(json.loads(config_file.read_text(encoding="utf-8")), backbone_weights(state), source)


def hub_folder(source: str) -> Path:
    """``source`` itself when it is a folder; else the hub repo's snapshot, from the cache first (no network)."""
    if Path(source).is_dir():
        return Path(source)
    patterns = ["config.json", "model.safetensors"]
    how = f"run `hf download {source} config.json model.safetensors` once online, or name a local folder"
    try:
        return cached_or_downloaded(lambda name, **kw: Path(snapshot_download(name, allow_patterns=patterns, **kw)), source, "MDLM model hf:", how)
    except HFValidationError as error:
        raise DataUnavailableError(f"MDLM model 'hf:{source}' names neither a folder nor a valid hub id") from error


def load_mdlm_lightning(path: str | Path) -> MDLMDenoiser:
    """A Lightning checkpoint written by MDLM's training code, with its EMA weights when it kept them."""
    checkpoint = read_lightning_checkpoint(path)
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ConfigError(f"MDLM checkpoint {path} has no state_dict; expected a .ckpt written by MDLM's main.py")
    hyper_parameters = checkpoint.get("hyper_parameters")
    config = hyper_parameters.get("config") if isinstance(hyper_parameters, Mapping) else None
    if isinstance(config, DictConfig):
        try:
            config = OmegaConf.to_container(config, resolve=False)  # unresolved: MDLM's resolvers are not registered
        except Exception as error:
            raise ConfigError(f"MDLM checkpoint {path}: its Hydra config cannot be read ({type(error).__name__})") from error
    if not isinstance(config, Mapping):
        raise ConfigError(f"MDLM checkpoint {path} has no hyper_parameters['config'] (MDLM's Hydra config)")
    weights = backbone_weights(checkpoint["state_dict"])
    ema = checkpoint.get("ema")
    if ema is not None:
        weights = ema_weights(weights, ema, path)
    return convert(config, weights, str(path))


def read_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a .ckpt: its Hydra config (omegaconf) is read, other objects skipped.

    MDLM's ``save_hyperparameters()`` pickles the tokenizer too, which ``weights_only`` refuses. Every global the
    pickle names outside torch's and omegaconf's safe set is mapped to the inert ``_Skipped``, so nothing
    of the file's choosing runs, and the tensors and plain containers load as usual.
    """
    if not Path(path).is_file():
        raise DataUnavailableError(f"no MDLM checkpoint at {path}: expected a Lightning .ckpt file")
    with torch.serialization.safe_globals(list(CONFIG_GLOBALS)):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            with torch.serialization.safe_globals([(_Skipped, name) for name in unsafe]):
                checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError(
                f"MDLM checkpoint {path} cannot be read with weights_only=True ({type(error).__name__}: "
                f"{first_line(error)}); expected a torch.save'd Lightning .ckpt"
            ) from error
    if not isinstance(checkpoint, Mapping):
        raise ConfigError(f"MDLM checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict")
    return dict(checkpoint)


def backbone_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DiT's own tensors: keys under ``backbone.`` (Lightning and transformers checkpoints) without it."""
    if any(key.startswith("backbone.") for key in state):
        return {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    return dict(state)


def ema_weights(weights: dict[str, torch.Tensor], ema: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA's ``shadow_params`` (a list in ``backbone.parameters()`` order, then the noise's) by name."""
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    names = parameter_names(count_blocks(weights))
    if not isinstance(shadow, list | tuple) or len(shadow) < len(names):
        raise ConfigError(f"MDLM checkpoint {path} has an ema entry without {len(names)} shadow_params for its backbone")
    averaged = dict(weights)
    for name, tensor in zip(names, shadow):
        if name not in weights or not isinstance(tensor, torch.Tensor) or tensor.shape != weights[name].shape:
            raise ConfigError(f"MDLM checkpoint {path}: ema.shadow_params do not follow backbone.parameters() at {name}")
        averaged[name] = tensor
    return averaged


def count_blocks(weights: Mapping[str, torch.Tensor]) -> int:
    """Number of DiT blocks, from the block indices present."""
    return len({key.split(".")[1] for key in weights if key.startswith("blocks.")})


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the conversion needs, from a transformers ``config.json`` or from MDLM's Hydra config."""
    if "model" in config or "config" in config:  # Hydra: a Lightning checkpoint's, or the hub-mixin DIT's config.json
        hydra = config.get("config", config)
        model = hydra.get("model", {})
        return {
            "time_conditioning": hydra.get("time_conditioning", False),
            "parameterization": hydra.get("parameterization", "subs"),
            "backbone": hydra.get("backbone", "dit"),
            "tokenizer": str(hydra.get("data", {}).get("tokenizer_name_or_path", "gpt2")),
            "n_heads": model.get("n_heads"), "length": model.get("length"), "dropout": model.get("dropout", 0.1),
        }
    return {  # transformers (kuleshov-group/mdlm-owt): flat keys, GPT-2 vocabulary
        "time_conditioning": config.get("time_conditioning", False), "model_type": config.get("model_type", "mdlm"),
        "tokenizer": "gpt2", "n_heads": config.get("n_heads"), "length": config.get("model_length"),
        "dropout": config.get("dropout", 0.1),
    }


def architecture(config: Mapping[str, Any], source: str) -> tuple[int, int, float]:
    """(n_heads, seq_len, dropout) of an MDLM config; refuses models whose conditioning or output cannot fold."""
    found = settings(config)
    if found["time_conditioning"]:
        raise ConfigError(f"MDLM model {source!r} has time_conditioning=true; only models without time conditioning (constant adaLN) convert")
    for name, allowed in (("parameterization", "subs"), ("backbone", "dit"), ("model_type", "mdlm")):
        if name in found and found[name] != allowed:
            raise ConfigError(f"MDLM model {source!r} has {name}={found[name]!r}; only {name}={allowed!r} converts")
    if "gpt2" not in found["tokenizer"].lower():  # MDLM appends the mask id only to tokenizers without one (GPT-2)
        raise ConfigError(f"MDLM model {source!r} uses tokenizer {found['tokenizer']!r}; only GPT-2 tokenizers (mask = last id) convert")
    n_heads, seq_len = found["n_heads"], found["length"]
    if not isinstance(n_heads, int) or not isinstance(seq_len, int):
        raise ConfigError(f"MDLM model {source!r}: its config gives n_heads={n_heads!r}, length={seq_len!r}; both must be integers")
    return n_heads, seq_len, float(found["dropout"])


def check_rotary(weights: Mapping[str, torch.Tensor], head_dim: int, source: str) -> None:
    """Refuse a stored rotary ``inv_freq`` other than base 10000 (the base adasched's rotary tables use)."""
    if ROTARY_BUFFER not in weights:
        return
    expected = 1.0 / 10_000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    stored = weights[ROTARY_BUFFER].float()
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-5):
        raise ConfigError(f"MDLM model {source!r}: its rotary inv_freq is not base 10000 over head width {head_dim}")


def check_keys(weights: Mapping[str, torch.Tensor], n_blocks: int, source: str) -> None:
    """Refuse weights that are not exactly MDLM's DiT (missing or extra tensors mean another architecture)."""
    expected = set(parameter_names(n_blocks))
    missing = sorted(expected - set(weights))
    extra = sorted(set(weights) - expected - {ROTARY_BUFFER})
    if not n_blocks or missing or extra:
        raise ConfigError(f"MDLM model {source!r} is not MDLM's DiT: {n_blocks} blocks, missing {missing[:3]}, unexpected {extra[:3]}")


def constant_condition(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``c = SiLU(sigma_map(0))`` in float64; sigma_map's sinusoidal features of 0 are cos 1 and sin 0 (zero-padded)."""
    first, second = weights["sigma_map.mlp.0.weight"].double(), weights["sigma_map.mlp.2.weight"].double()
    width = first.shape[1]
    features = torch.cat([torch.ones(width // 2), torch.zeros(width - width // 2)]).double()
    hidden = F.silu(first @ features + weights["sigma_map.mlp.0.bias"].double())
    return F.silu(second @ hidden + weights["sigma_map.mlp.2.bias"].double())


def modulation(weights: Mapping[str, torch.Tensor], prefix: str, cond: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """The constant adaLN output of layer ``prefix`` split into its ``chunks`` (shift, scale[, gate] ...)."""
    out = weights[f"{prefix}adaLN_modulation.weight"].double() @ cond + weights[f"{prefix}adaLN_modulation.bias"].double()
    return out.chunk(chunks)


@torch.no_grad()
def fold_norm(norm: torch.nn.LayerNorm, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """``LayerNorm(x) * weight`` then modulated by (shift, scale) is LayerNorm(x) * weight(1 + scale) + shift."""
    norm.weight.copy_(weight.double() * (1 + scale))
    norm.bias.copy_(shift)


@torch.no_grad()
def fold_gate(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor) -> None:
    """``gate * (W h + b)`` is the Linear with rows ``gate * W`` and bias ``gate * b``."""
    linear.weight.copy_(gate[:, None] * weight.double())
    if bias is not None:
        linear.bias.copy_(gate * bias.double())


def convert(config: Mapping[str, Any], weights: dict[str, torch.Tensor], source: str) -> MDLMDenoiser:
    """An ``MDLMDenoiser`` (float32, eval) computing what MDLM's DiT computes with these weights at sigma = 0."""
    n_heads, seq_len, dropout = architecture(config, source)
    n_blocks = count_blocks(weights)
    check_keys(weights, n_blocks, source)
    vocab_size, d_model = weights["vocab_embed.embedding"].shape
    mlp_ratio = weights["blocks.0.mlp.0.weight"].shape[0] // d_model
    denoiser_config = DenoiserConfig(
        vocab_size=vocab_size, mask_token_id=vocab_size - 1, seq_len=seq_len, n_blocks=n_blocks, d_model=d_model,
        n_heads=n_heads, mlp_ratio=mlp_ratio, dropout=dropout, time_conditioning=False,
    )
    check_rotary(weights, d_model // n_heads, source)
    model = MDLMDenoiser(denoiser_config)
    fold(model, weights)
    return model.float().eval()


@torch.no_grad()
def fold(model: MDLMDenoiser, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy MDLM's weights into ``model`` with the constant modulations folded in (computed in float64)."""
    cond = constant_condition(weights)
    model.embed.weight.copy_(weights["vocab_embed.embedding"])
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(weights, prefix, cond, 6)
        fold_norm(block.norm1, weights[prefix + "norm1.weight"], shift1, scale1)
        block.qkv.weight.copy_(weights[prefix + "attn_qkv.weight"])  # same (three, heads, head_dim) row layout
        fold_gate(block.attn_out, weights[prefix + "attn_out.weight"], None, gate1)
        fold_norm(block.norm2, weights[prefix + "norm2.weight"], shift2, scale2)
        block.mlp[0].weight.copy_(weights[prefix + "mlp.0.weight"])
        block.mlp[0].bias.copy_(weights[prefix + "mlp.0.bias"])
        fold_gate(block.mlp[2], weights[prefix + "mlp.2.weight"], weights[prefix + "mlp.2.bias"], gate2)
    shift, scale = modulation(weights, "output_layer.", cond, 2)
    fold_norm(model.final_norm, weights["output_layer.norm_final.weight"], shift, scale)
    model.head.weight.copy_(weights["output_layer.linear.weight"])
    model.head.bias.copy_(weights["output_layer.linear.bias"])
