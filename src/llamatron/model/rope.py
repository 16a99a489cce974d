"""Rotary position embedding with Llama 3.1 frequency scaling, in HF's rotate_half convention."""

from __future__ import annotations

import math

import torch

from llamatron.model.config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), fp32, with the llama3 scaling when configured:
    wavelength above original/low_freq_factor -> f/factor; below original/high_freq_factor -> f;
    in between a linear blend in original/wavelength (HF rope_type "llama3")."""
    dim = config.dim_per_head
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    original = scaling.original_max_position_embeddings
    low_freq_wavelen = original / scaling.low_freq_factor
    high_freq_wavelen = original / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, *, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` ((seq,) or (batch, seq)), shaped (batch or 1, 1, seq, head_dim) to
    broadcast over heads; computed in fp32 and cast to the activations' dtype as HF does."""
    if positions.dim() == 1:
        positions = positions[None]
    freqs = positions[..., None].float() * inv_freq.float()  # (batch, seq, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (batch, 1, seq, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (batch, heads, seq, head_dim), k: (batch, kv_heads, seq, head_dim)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
