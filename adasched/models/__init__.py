"""Denoisers of a model family and the autoregressive evaluator."""

from adasched.models.dit import DenoiserConfig, MDLMDenoiser
from adasched.models.factory import build_causal_lm, build_denoiser

__all__ = ["DenoiserConfig", "MDLMDenoiser", "build_causal_lm", "build_denoiser"]
