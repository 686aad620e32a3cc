"""Build the models of a family from config: denoisers and the autoregressive evaluator share a tokenizer."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from adasched.data.tokenizer import special_ids
from adasched.models.dit import DenoiserConfig, MDLMDenoiser


def build_denoiser(tokenizer: PreTrainedTokenizerFast, seq_len: int, **architecture: Any) -> MDLMDenoiser:
    """A fresh MDLM denoiser whose vocabulary and mask id come from the family tokenizer."""
    _, mask_id = special_ids(tokenizer)
    config = DenoiserConfig(vocab_size=len(tokenizer), mask_token_id=mask_id, seq_len=seq_len, **architecture)
    return MDLMDenoiser(config)


def build_causal_lm(tokenizer: PreTrainedTokenizerFast, seq_len: int, model_type: str = "gpt2", **architecture: Any) -> nn.Module:
    """A fresh ``transformers`` causal LM (any registered ``model_type``) over the family tokenizer."""
    eos_id, _ = special_ids(tokenizer)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), n_positions=seq_len, bos_token_id=eos_id, eos_token_id=eos_id, **architecture
    )
    return AutoModelForCausalLM.from_config(config)
