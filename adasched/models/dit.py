"""The MDLM denoiser: a bidirectional DiT-style Transformer with rotary attention and the "subs" output.

Read in one sitting: config, rotary helpers, one block, the model. The model exposes its two halves
separately (``hidden_states`` for the trunk, ``project`` for the vocabulary head) because the sampler only
projects the positions it reveals, and the FLOPs count follows the same split.
"""


import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from adasched.errors import ConfigError
from adasched.models.kernels import DEFAULT, Kernels, kernels_for


@dataclass
class DenoiserConfig:
    """Shape of one denoiser; members of a family share everything but ``n_blocks`` (and the seed)."""

    vocab_size: int  # number of token ids, the mask token included
    mask_token_id: int  # id of the mask token m; never predicted ("subs" parameterization)
    seq_len: int = 128  # maximum sequence length (rotary tables are built for it)
    n_blocks: int = 6  # Transformer depth, the one thing that differs between heavy and light
    d_model: int = 256  # hidden width
    n_heads: int = 4  # attention heads; d_model must divide by it
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.1  # dropout on attention output and MLP (training only)
    time_conditioning: bool = False  # adaLN conditioning on t; off as in MDLM's released model
    cond_dim: int = 128  # width of the time embedding when time_conditioning is on

    def __post_init__(self) -> None:
        positive = {k: getattr(self, k) for k in ("vocab_size", "seq_len", "n_blocks", "d_model", "n_heads")}
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name}={value!r} is invalid; it must be a positive integer")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"model.mask_token_id={self.mask_token_id} must lie in [0, {self.vocab_size})")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.d_model={self.d_model} must divide into n_heads={self.n_heads} heads of even width"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must lie in [0, 1)")


def rotary_tables(seq_len: int, head_dim: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim) for rotate-half rotary embeddings (GPT-NeoX layout)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key vectors ``x`` of shape (B, H, L, D) by their position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] like DiT's integer timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP block; with a condition vector, adaLN shifts/scales/gates both halves."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_ratio * d),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.mlp_ratio * d, d),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.adaln = nn.Linear(config.cond_dim, 6 * d) if config.time_conditioning else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cond: torch.Tensor | None, kernels: Kernels = DEFAULT
    ) -> torch.Tensor:
        h = self.norm1(x)
        if self.adaln is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond)[:, None].chunk(6, dim=-1)
            h = h * (1 + scale1) + shift1
        q, k, v = rearrange(self.qkv(h), "b l (three h d) -> three b h l d", three=3, h=self.n_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = kernels.attention(q, k, v)  # bidirectional: no causal mask
        attn = self.dropout(self.attn_out(rearrange(attn, "b h l d -> b l (h d)")))
        x = x + (attn if self.adaln is None else gate1 * attn)

        h = self.norm2(x)
        if self.adaln is not None:
            h = h * (1 + scale2) + shift2
        mlp = self.dropout(self.mlp[2](kernels.mlp_in(h, self.mlp)))
        return x + (mlp if self.adaln is None else gate2 * mlp)


class MDLMDenoiser(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="adasched",
    tags=["masked-diffusion", "mdlm"],
    repo_url="https://github.com/adasched/adasched",
):
    """p_theta(x0 | z_t): token embedding, ``n_blocks`` DiT blocks, final norm, linear head to the vocabulary.

    ``save_pretrained(dir)`` / ``MDLMDenoiser.from_pretrained(dir)`` store ``config.json`` + safetensors.
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size)
        self.time_embed = None
        self.final_adaln = None
        if config.time_conditioning:
            self.time_embed = nn.Sequential(
                nn.Linear(config.cond_dim, config.cond_dim), nn.SiLU(), nn.Linear(config.cond_dim, config.cond_dim)
            )
            self.final_adaln = nn.Linear(config.cond_dim, 2 * d)
        cos, sin = rotary_tables(config.seq_len, d // config.n_heads)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self._compute_dtype: torch.dtype | None = None
        self._init_weights()

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """How the trunk computes, not what the model is (so not in the config).

        None runs in the weights' dtype; torch.bfloat16 autocasts the blocks' products while the residual
        stream, the norms and the projection stay float32, as in bf16-mixed training and MDLM's own sampling.
        """
        return self._compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Store the blocks' matrices in ``dtype`` once: autocast would round them to it at every call (the
        same values, so the same products), which cost ~8% of a bf16 forward on a CPU. Back to None they
        return to the float32 of that rounding: set a dtype for sampling, not before training."""
        self._compute_dtype = dtype
        storage = dtype or self.head.weight.dtype
        for block in self.blocks:
            for layer in block.modules():
                if isinstance(layer, nn.Linear):
                    layer.to(storage)

    def _init_weights(self) -> None:
        """GPT-2-style N(0, 0.02) weights; adaLN layers start at zero so every block starts unmodulated."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        adaln_layers = [block.adaln for block in self.blocks] + [self.final_adaln]
        for layer in filter(None, adaln_layers):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def hidden_states(self, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, L, d) of the noisy tokens ``z`` (B, L) at times ``t`` (B,)."""
        length = z.shape[1]
        if length > self.config.seq_len:
            raise ConfigError(f"sequence length {length} exceeds the model's seq_len={self.config.seq_len}")
        cond = None
        if self.time_embed is not None:
            if t is None:
                raise ConfigError("this denoiser is time-conditioned: pass t")
            cond = F.silu(self.time_embed(timestep_embedding(t, self.config.cond_dim)))
        cos, sin = self.rotary_cos[:length], self.rotary_sin[:length]
        x = self.embed(z)
        kernels = kernels_for(self.compute_dtype, z.device)
        with self._trunk_precision(z.device):
            for block in self.blocks:
                x = block(x, cos, sin, cond, kernels)
        x = self.final_norm(x)
        if self.final_adaln is not None:
            shift, scale = self.final_adaln(cond)[:, None].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        return x

    def _trunk_precision(self, device: torch.device) -> ContextManager[object]:
        """Autocast to ``compute_dtype``; without one, nothing (an enclosing autocast, as in training, stays on)."""
        return nullcontext() if self.compute_dtype is None else torch.autocast(device.type, dtype=self.compute_dtype)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for any (..., d) hidden states; the mask token gets -inf (subs)."""
        logits = self.head(hidden)
        logits[..., self.config.mask_token_id] = float("-inf")
        return logits

    def forward(self, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Log p(x0 | z_t) for every position (B, L, V), subs-parameterized: unmasked positions copy through."""
        log_probs = self.project(self.hidden_states(z, t)).log_softmax(dim=-1)
        unmasked = z != self.config.mask_token_id
        copy = torch.full_like(log_probs[unmasked], float("-inf"))
        copy.scatter_(-1, z[unmasked][:, None], 0.0)
        log_probs[unmasked] = copy
        return log_probs

    def flops_per_forward(self, seq_len: int, num_projected: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of one forward over ``seq_len`` tokens, projecting ``num_projected``.

        Per block: QKV 6Ld^2, attention scores and mixing 4L^2d, output projection 2Ld^2, MLP 4rLd^2 (r the
        MLP ratio); head: 2PdV for the P projected positions. The embedding is a gather (0 FLOPs); norms,
        rotary and adaLN are O(Ld) and left out, as in the usual 2N-per-token accounting.
        """
        d, r, v = self.config.d_model, self.config.mlp_ratio, self.config.vocab_size
        per_block = (8 + 4 * r) * seq_len * d * d + 4 * seq_len * seq_len * d
        return self.config.n_blocks * per_block + 2 * num_projected * d * v
