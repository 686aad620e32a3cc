"""The MDLM forward process and its training objective (Sahoo et al. 2024, linear schedule a_t = 1 - t).

Each token of x is replaced by the mask token with probability t; the continuous-time NELBO is
E_t [ (1/t) * sum over masked positions of -log p_theta(x_l | z_t) ], reported per (non-padding) token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adasched.models.dit import MDLMDenoiser


def sample_times(batch_size: int, eps: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Antithetic (stratified) t in [eps, 1]: one uniform offset, then evenly spaced, to cut loss variance."""
    offset = torch.rand(1, generator=generator, device=device)
    u = (offset + torch.arange(batch_size, device=device) / batch_size) % 1.0
    return eps + (1.0 - eps) * u


def corrupt(x: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_t ~ q(z_t | x): every token independently becomes ``mask_id`` with probability t (per row)."""
    masked = torch.rand(x.shape, generator=generator, device=x.device) < t[:, None]
    return torch.where(masked, torch.full_like(x, mask_id), x)


def masked_position_nll(
    model: MDLMDenoiser, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p_theta(x_l | z_t) at every masked, non-padding position of ``z``, and the (B, L) mask of those positions.

    Only masked positions are projected to the vocabulary: "subs" puts zero loss on the others.
    """
    masked = (z == model.config.mask_token_id) & attention_mask.bool()
    logits = model.project(model.hidden_states(z, t)[masked]).float()
    return F.cross_entropy(logits, x[masked], reduction="none"), masked


def nelbo_of_corruption(
    model: MDLMDenoiser, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The NELBO estimate in nats per token for given clean ``x``, corrupted ``z`` and times ``t``."""
    nll, masked = masked_position_nll(model, x, z, t, attention_mask)
    weight = (1.0 / t)[:, None].expand_as(x)[masked]
    return (nll * weight).sum() / attention_mask.sum()


def masked_cross_entropy_sum(
    model: MDLMDenoiser, x: torch.Tensor, attention_mask: torch.Tensor, t: float, generator: torch.Generator | None = None
) -> tuple[float, int]:
    """Summed -log p_theta(x_l | z_t) over the positions masked at one fixed rate ``t``, and their count.

    The NELBO averages this per-position loss over t; at a single t it shows where along the diffusion (and so
    along the sampler's steps) one model predicts better than another.
    """
    times = torch.full((x.shape[0],), t, device=x.device)
    nll, masked = masked_position_nll(model, x, corrupt(x, times, model.config.mask_token_id, generator), times, attention_mask)
    return float(nll.sum()), int(masked.sum())


def masked_nelbo(
    model: MDLMDenoiser,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte-Carlo NELBO in nats per token of a batch ``x`` (B, L); one (t, z_t) draw per row."""
    if attention_mask is None:
        attention_mask = torch.ones_like(x)
    t = sample_times(x.shape[0], eps, generator, x.device)
    z = corrupt(x, t, model.config.mask_token_id, generator)
    return nelbo_of_corruption(model, x, z, t, attention_mask)
